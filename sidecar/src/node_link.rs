//! The sidecar's client of its node's `fold.sidecar.v1.PeerRequests` service. The channel
//! (re)connects on demand, so the node may start later or restart; while it is away, inbound
//! requests are answered `UNAVAILABLE` at once.

use std::sync::Arc;
use std::time::Duration;

use fold_middleware::metrics::{GrpcMetrics, GrpcMetricsLayer, GrpcMetricsService};
use fold_proto::sidecar::peer_requests_client::PeerRequestsClient;
use fold_proto::sidecar::{InboundForward, ServedSchemasRequest};
use fold_proto::wire::{ForwardResponse, forward_response};
use local_link::LinkAddr;
use local_link::token::{LinkToken, TokenLayer, WithToken};
use tonic::transport::Channel;
use tonic::{Code, Status};

type Svc = GrpcMetricsService<WithToken<Channel>>;

/// What the sidecar needs of its node: run an inbound forward, say which schemas it serves. The
/// real one is [`NodeLink`] (gRPC over the local link); tests put a fake behind it.
#[tonic::async_trait]
pub trait NodeHandler: Send + Sync + 'static {
    /// Hand an inbound forward to the node, with what is left of the origin's deadline. Any
    /// failure is a typed error answer.
    async fn handle_forward(
        &self,
        req: InboundForward,
        remaining: Option<Duration>,
    ) -> ForwardResponse;

    /// Which of `names` the node serves (has approved), for a peer's schema check.
    async fn served_schemas(
        &self,
        origin: String,
        names: Vec<String>,
    ) -> Result<Vec<String>, Status>;
}

#[tonic::async_trait]
impl NodeHandler for NodeLink {
    async fn handle_forward(
        &self,
        req: InboundForward,
        remaining: Option<Duration>,
    ) -> ForwardResponse {
        NodeLink::handle_forward(self, req, remaining).await
    }

    async fn served_schemas(
        &self,
        origin: String,
        names: Vec<String>,
    ) -> Result<Vec<String>, Status> {
        NodeLink::served_schemas(self, origin, names).await
    }
}

#[derive(Clone)]
pub struct NodeLink {
    addr: LinkAddr,
    client: PeerRequestsClient<Svc>,
    timeout: Duration,
}

impl NodeLink {
    pub fn new(
        addr: LinkAddr,
        token: Option<LinkToken>,
        timeout: Duration,
        max_message_bytes: usize,
        metrics: Arc<GrpcMetrics>,
    ) -> NodeLink {
        let channel = local_link::channel(&addr, Duration::from_secs(1));
        let svc = tower::ServiceBuilder::new()
            .layer(GrpcMetricsLayer::new(metrics))
            .layer(TokenLayer(token))
            .service(channel);
        let client = PeerRequestsClient::new(svc)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        NodeLink {
            addr,
            client,
            timeout,
        }
    }

    fn unavailable(&self, s: &Status) -> Status {
        Status::unavailable(format!(
            "the node behind this sidecar is unavailable ({}): {}",
            self.addr,
            s.message()
        ))
    }

    /// Hand an inbound forward to the node, with what is left of the origin's deadline (or this
    /// sidecar's request timeout, whichever is shorter). Any failure becomes a typed error
    /// answer.
    pub async fn handle_forward(
        &self,
        req: InboundForward,
        remaining: Option<Duration>,
    ) -> ForwardResponse {
        let mut client = self.client.clone();
        let mut r = tonic::Request::new(req);
        r.set_timeout(remaining.map_or(self.timeout, |d| d.min(self.timeout)));
        fold_telemetry::otel::inject_metadata(
            &fold_telemetry::otel::inject_current(),
            r.metadata_mut(),
        );
        match client.handle_forward(r).await {
            Ok(resp) => resp.into_inner(),
            Err(s) => {
                let s = match s.code() {
                    Code::Unavailable | Code::Unknown => self.unavailable(&s),
                    Code::Cancelled => Status::deadline_exceeded(format!(
                        "the node did not answer within the request's deadline: {}",
                        s.message()
                    )),
                    _ => s,
                };
                ForwardResponse {
                    request_id: String::new(),
                    result: Some(forward_response::Result::Error(
                        fold_proto::status::to_wire(&s),
                    )),
                }
            }
        }
    }

    /// Which of `names` the node serves (has approved).
    pub async fn served_schemas(
        &self,
        origin: String,
        names: Vec<String>,
    ) -> Result<Vec<String>, Status> {
        let mut client = self.client.clone();
        let mut r = tonic::Request::new(ServedSchemasRequest {
            origin_node_id: origin,
            names,
        });
        r.set_timeout(self.timeout);
        match client.served_schemas(r).await {
            Ok(resp) => Ok(resp.into_inner().names),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) =>
            {
                Err(self.unavailable(&s))
            }
            Err(s) => Err(s),
        }
    }
}
