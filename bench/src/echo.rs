//! The throughput reference: a bare tonic unary server answering `Query` with a fixed 1 KiB
//! record, no storage, no middleware — what tonic alone costs on this machine.

use fold_proto::json::map_to_struct;
use fold_proto::v1::fold_node_server::{FoldNode, FoldNodeServer};
use fold_proto::v1::*;
use serde_json::json;
use tonic::{Request, Response, Status};

struct Echo {
    answer: QueryResponse,
}

#[tonic::async_trait]
impl FoldNode for Echo {
    async fn load_schema(
        &self,
        _: Request<LoadSchemaRequest>,
    ) -> Result<Response<LoadSchemaResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list_schemas(
        &self,
        _: Request<ListSchemasRequest>,
    ) -> Result<Response<ListSchemasResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_schema(
        &self,
        _: Request<GetSchemaRequest>,
    ) -> Result<Response<GetSchemaResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn set_schema_state(
        &self,
        _: Request<SetSchemaStateRequest>,
    ) -> Result<Response<SetSchemaStateResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn query(&self, _: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        Ok(Response::new(self.answer.clone()))
    }
    async fn mutate(&self, _: Request<MutateRequest>) -> Result<Response<MutateResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn batch_mutate(
        &self,
        _: Request<BatchMutateRequest>,
    ) -> Result<Response<BatchMutateResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn history(
        &self,
        _: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type ScanStream = tokio_stream::Empty<Result<Record, Status>>;
    async fn scan(&self, _: Request<QueryRequest>) -> Result<Response<Self::ScanStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type SubscribeStream = tokio_stream::Empty<Result<SubscribeResponse, Status>>;
    async fn subscribe(
        &self,
        _: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

pub async fn serve() -> anyhow::Result<()> {
    let fields = json!({"payload": "x".repeat(super::PAYLOAD)});
    let answer = QueryResponse {
        answers: Vec::new(),
        attempts: 0,
        next_page_token: String::new(),
        records: vec![Record {
            fields_json: String::new(),
            range_key: "r1".into(),
            fields: fields.as_object().map(map_to_struct),
        }],
        node_id: String::new(),
        replica: None,
        group: None,
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true));
    println!("echo ready addr={addr}");
    tonic::transport::Server::builder()
        .add_service(FoldNodeServer::new(Echo { answer }))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
