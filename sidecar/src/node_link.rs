//! The sidecar's client of its node's `fold.sidecar.v1.PeerRequests` service. The channel
//! (re)connects on demand, so the node may start later or restart; while it is away, inbound
//! requests are answered `UNAVAILABLE` at once.

use std::sync::Arc;
use std::time::Duration;

use fold_middleware::metrics::{GrpcMetrics, GrpcMetricsLayer, GrpcMetricsService};
use fold_proto::sidecar::peer_requests_client::PeerRequestsClient;
use fold_proto::sidecar::{
    InboundForward, InboundStreamRequest, InboundStreamResponse, ServedSchemasRequest,
    inbound_stream_response,
};
use fold_proto::wire::{ForwardResponse, forward_response};
use local_link::LinkAddr;
use local_link::mux::{Codec, MuxError, StreamMux};
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

    /// Which of `names` the node serves (has approved), with each one's definition hash, for a
    /// peer's schema check.
    async fn served_schemas(
        &self,
        origin: String,
        names: Vec<String>,
    ) -> Result<fold_proto::wire::SchemaNames, Status>;
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
    ) -> Result<fold_proto::wire::SchemaNames, Status> {
        NodeLink::served_schemas(self, origin, names).await
    }
}

/// Inbound forwards waiting for the node's answer on the stream at once (beyond:
/// RESOURCE_EXHAUSTED; the inbound gate's own queue is far smaller).
const MAX_PENDING: usize = 65_536;

type InboundMux = StreamMux<InboundStreamRequest, InboundStreamResponse, ForwardResponse>;

fn answer(r: InboundStreamResponse) -> Result<ForwardResponse, Status> {
    match r.result {
        Some(inbound_stream_response::Result::Response(r)) => Ok(r),
        Some(inbound_stream_response::Result::Error(e)) => {
            Err(fold_proto::status::from_wire_local(e))
        }
        None => Err(Status::internal("the node sent an empty stream answer")),
    }
}

const CODEC: Codec<InboundStreamRequest, InboundStreamResponse, ForwardResponse> = Codec {
    set_id: |r, id| r.id = id,
    id_of: |r| r.id,
    answer,
};

#[derive(Clone)]
pub struct NodeLink {
    addr: LinkAddr,
    client: PeerRequestsClient<Svc>,
    timeout: Duration,
    /// Inbound forwards on one long-lived stream (`--link-forward stream`), else `None`: one
    /// unary HandleForward call each.
    mux: Option<Arc<InboundMux>>,
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
            mux: Some(Arc::new(
                StreamMux::new("the node", MAX_PENDING, CODEC)
                    .with_max_message_bytes(max_message_bytes),
            )),
        }
    }

    /// Hand inbound forwards to the node with one unary call each instead of the stream.
    pub fn unary(mut self) -> Self {
        self.mux = None;
        self
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
        let timeout = remaining.map_or(self.timeout, |d| d.min(self.timeout));
        let trace = fold_telemetry::otel::inject_current();
        let mut client = self.client.clone();
        let req = match &self.mux {
            None => req,
            Some(mux) => {
                let msg = InboundStreamRequest {
                    id: 0,
                    forward: Some(req),
                    timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
                    trace_context: trace.clone(),
                };
                let opener = client.clone();
                let r = mux
                    .call(msg, timeout, move |requests| async move {
                        let mut c = opener;
                        c.handle_forward_stream(requests)
                            .await
                            .map(|r| r.into_inner())
                    })
                    .await;
                match r {
                    Ok(resp) => return resp,
                    Err(MuxError::Status(s)) => return self.refusal(s),
                    // An older node: the unary call.
                    Err(MuxError::Unsupported(msg)) => msg.forward.unwrap_or_default(),
                }
            }
        };
        let mut r = tonic::Request::new(req);
        r.set_timeout(timeout);
        fold_telemetry::otel::inject_metadata(&trace, r.metadata_mut());
        match client.handle_forward(r).await {
            Ok(resp) => resp.into_inner(),
            Err(s) => self.refusal(s),
        }
    }

    /// A failure to get the node's answer, as the typed error answer the peer gets.
    fn refusal(&self, s: Status) -> ForwardResponse {
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

    /// Which of `names` the node serves (has approved), with their definition hashes.
    pub async fn served_schemas(
        &self,
        origin: String,
        names: Vec<String>,
    ) -> Result<fold_proto::wire::SchemaNames, Status> {
        let mut client = self.client.clone();
        let mut r = tonic::Request::new(ServedSchemasRequest {
            origin_node_id: origin,
            names,
        });
        r.set_timeout(self.timeout);
        match client.served_schemas(r).await {
            Ok(resp) => {
                let r = resp.into_inner();
                Ok(fold_proto::wire::SchemaNames {
                    names: r.names,
                    definition_hashes: r.definition_hashes,
                })
            }
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
