//! Forwards to the sidecar on one long-lived `Mesh.ForwardStream` instead of a unary call per
//! request (issue 13: "the same idea on the node ⇄ sidecar link"), multiplexed by
//! [`local_link::mux`]. A sidecar without ForwardStream (UNIMPLEMENTED) is used with unary calls
//! from then on; `--link-forward unary` keeps the unary call (docs/BENCHMARKS.md compares them).

use std::collections::HashMap;
use std::time::Duration;

use fold_proto::sidecar::mesh_client::MeshClient;
use fold_proto::sidecar::{
    ForwardRequest, ForwardStreamRequest, ForwardStreamResponse, forward_stream_response,
};
use fold_proto::wire::ForwardResponse;
use local_link::mux::{Codec, MuxError, StreamMux};
use tonic::Status;

use crate::error::NodeError;

/// Requests waiting for an answer on the stream at once; beyond it, RESOURCE_EXHAUSTED.
const MAX_PENDING: usize = 65_536;

/// How forwards travel to the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkForward {
    /// One long-lived bidirectional stream (the default).
    Stream,
    /// One unary `Mesh.Forward` call per request.
    Unary,
}

impl std::str::FromStr for LinkForward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stream" => Ok(LinkForward::Stream),
            "unary" => Ok(LinkForward::Unary),
            other => Err(format!("'{other}' is not stream or unary")),
        }
    }
}

/// The sidecar's answer on the stream. The link ([`local_link::mux`]) carries gRPC statuses, so
/// an error of this node's own becomes one here.
fn answer(r: ForwardStreamResponse) -> Result<ForwardResponse, Status> {
    match r.result {
        Some(forward_stream_response::Result::Response(r)) => Ok(r),
        Some(forward_stream_response::Result::Error(e)) => {
            Err(fold_proto::status::from_wire_local(e))
        }
        None => Err(NodeError::internal("the sidecar sent an empty stream answer").into()),
    }
}

const CODEC: Codec<ForwardStreamRequest, ForwardStreamResponse, ForwardResponse> = Codec {
    set_id: |r, id| r.id = id,
    id_of: |r| r.id,
    answer,
};

pub struct StreamLink<S> {
    client: MeshClient<S>,
    mode: LinkForward,
    mux: StreamMux<ForwardStreamRequest, ForwardStreamResponse, ForwardResponse>,
}

impl<S> StreamLink<S>
where
    S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    pub fn new(client: MeshClient<S>, mode: LinkForward) -> Self {
        StreamLink {
            client,
            mode,
            mux: StreamMux::new("the p2p-sidecar", MAX_PENDING, CODEC),
        }
    }

    /// A forward whose request is over `n` bytes (the link's --max-message-bytes) fails alone
    /// with RESOURCE_EXHAUSTED instead of resetting the stream.
    pub fn with_max_message_bytes(mut self, n: usize) -> Self {
        self.mux = self.mux.with_max_message_bytes(n);
        self
    }

    /// One forward, on the stream (or the unary call). `timeout` is how long the caller waits;
    /// `trace` its trace context.
    pub async fn forward(
        &self,
        req: ForwardRequest,
        timeout: Duration,
        trace: HashMap<String, String>,
    ) -> Result<ForwardResponse, Status> {
        if self.mode == LinkForward::Unary {
            return self.unary(req, timeout, &trace).await;
        }
        let msg = ForwardStreamRequest {
            id: 0,
            request: Some(req),
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            trace_context: trace,
        };
        let client = self.client.clone();
        match self
            .mux
            .call(msg, timeout, move |requests| async move {
                let mut client = client;
                client
                    .forward_stream(requests)
                    .await
                    .map(|r| r.into_inner())
            })
            .await
        {
            Ok(r) => Ok(r),
            Err(MuxError::Status(s)) => Err(s),
            Err(MuxError::Unsupported(msg)) => {
                let req = msg.request.unwrap_or_default();
                self.unary(req, timeout, &msg.trace_context).await
            }
        }
    }

    async fn unary(
        &self,
        req: ForwardRequest,
        timeout: Duration,
        trace: &HashMap<String, String>,
    ) -> Result<ForwardResponse, Status> {
        let mut request = tonic::Request::new(req);
        fold_telemetry::otel::inject_metadata(trace, request.metadata_mut());
        request.set_timeout(timeout);
        self.client
            .clone()
            .forward(request)
            .await
            .map(tonic::Response::into_inner)
    }
}
