//! The public gRPC API: `fold.v1.FoldNode` (data) and `fold.v1.Network` (the mesh, as seen from
//! this node). Requests on this port come from clients: anonymous ([`Principal::LocalClient`]) or,
//! under mutual TLS, identified by their certificate ([`Principal::CertClient`]).
//! Query, History, Mutate and BatchMutate for another node go to the sidecar ([`MeshLink`]);
//! reads addressed by schema (route any/all) go through the [`Router`]; everything else runs
//! here.

use fold_middleware::metrics::code_name;
use fold_proto::json::map_to_struct;
use fold_proto::v1::fold_node_server::FoldNode;
use fold_proto::v1::network_server::Network;
use fold_proto::v1::*;
use fold_proto::wire::operation;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::bounds::Bounded;
use crate::data::{self, Data};
use crate::error::NodeError;
use crate::identity::{CertIdentity, Principal};
use crate::mesh::{MeshLink, grpc_timeout};
use crate::pipeline::Pipeline;
use crate::route::Router;
use crate::store::{SchemaState, TrustRecord};
use crate::topology;
use std::sync::Arc;
use std::time::Duration;

/// Run `fut` inside `span` and record its gRPC outcome on the span.
pub async fn traced<T, E: Into<Status>>(
    span: tracing::Span,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Status> {
    let r = fut.instrument(span.clone()).await.map_err(Into::into);
    span.record(
        "outcome",
        match &r {
            Ok(_) => "OK",
            Err(s) => code_name(s.code()),
        },
    );
    r
}

/// Marks requests that came in on the owner listener (`--owner-listen`). Set by the server for
/// that listener only; nothing a client sends can add it.
#[derive(Debug, Clone, Copy)]
pub struct OwnerConnection;

/// Who sent a client request: the owner (owner listener), the verified client certificate under
/// mutual TLS, otherwise an anonymous client.
pub fn principal_of<T>(request: &Request<T>) -> Principal {
    if request.extensions().get::<OwnerConnection>().is_some() {
        return Principal::Owner;
    }
    request
        .peer_certs()
        .and_then(|certs| {
            certs
                .first()
                .and_then(|c| CertIdentity::from_der(c.as_ref()))
        })
        .map(Principal::CertClient)
        .unwrap_or(Principal::LocalClient)
}

/// Refuse with PERMISSION_DENIED, naming the right, unless the caller holds the admin right.
/// The right follows from the authenticated identity only (see `Identities::is_admin`).
pub fn require_admin<T>(data: &Data, request: &Request<T>, action: &str) -> Result<(), Status> {
    let who = principal_of(request);
    let ids = data.identities();
    let r = ids.resolve(&who).map_err(crate::error::status)?;
    if ids.is_admin(&who, &r) {
        return Ok(());
    }
    let at = match r.distance {
        Some(d) => format!("at trust distance {d}"),
        None => "denied".to_string(),
    };
    Err(NodeError::permission_denied(format!(
        "{action} needs the admin right, and {} ({at}) does not hold it; it belongs to {}",
        r.label,
        ids.admin_rule()
    ))
    .into())
}

#[derive(Clone)]
pub struct FoldNodeApi {
    data: Data,
    mesh: MeshLink,
    router: Router,
    pipeline: Pipeline,
}

impl FoldNodeApi {
    pub fn new(data: Data, mesh: MeshLink, router: Router) -> Self {
        let pipeline = Pipeline::new(router.clone());
        FoldNodeApi {
            data,
            mesh,
            router,
            pipeline,
        }
    }
}

/// What the API edge takes of a request: who sends it, its deadline, and the request itself
/// (its strings checked against their bounds first).
fn extract<T: Bounded>(request: Request<T>) -> Result<(Principal, Option<Duration>, T), Status> {
    let deadline = grpc_timeout(request.metadata());
    let principal = principal_of(&request);
    let req = request.into_inner();
    req.check_bounds()?;
    Ok((principal, deadline, req))
}

#[tonic::async_trait]
impl FoldNode for FoldNodeApi {
    async fn load_schema(
        &self,
        request: Request<LoadSchemaRequest>,
    ) -> Result<Response<LoadSchemaResponse>, Status> {
        require_admin(&self.data, &request, "loading a schema")?;
        let req = request.into_inner();
        let (name, out) = self.data.load_schema(&req.schema_json, req.approve).await?;
        if out.state == SchemaState::Approved {
            self.mesh.schemas_changed();
        }
        tracing::info!(schema = %name, created = out.created, state = out.state.as_str(), "schema loaded");
        Ok(Response::new(LoadSchemaResponse {
            name,
            state: data::state_to_proto(out.state) as i32,
            created: out.created,
            hash: out.hash,
            definition_hash: out.definition_hash,
        }))
    }

    async fn list_schemas(
        &self,
        request: Request<ListSchemasRequest>,
    ) -> Result<Response<ListSchemasResponse>, Status> {
        let want = request.into_inner().state;
        let filter = if want == fold_proto::v1::SchemaState::Unspecified as i32 {
            None
        } else {
            Some(data::state_from_proto(want).ok_or_else(|| {
                NodeError::invalid_argument(format!("unknown schema state {want}"))
            })?)
        };
        let schemas = self
            .data
            .store()
            .schemas()
            .into_iter()
            .filter(|(_, st)| filter.is_none_or(|f| f == *st))
            .map(|(s, st)| data::summary(&s, st))
            .collect();
        Ok(Response::new(ListSchemasResponse { schemas }))
    }

    async fn get_schema(
        &self,
        request: Request<GetSchemaRequest>,
    ) -> Result<Response<GetSchemaResponse>, Status> {
        let name = request.into_inner().name;
        crate::bounds::schema_name(&name)?;
        let Some((schema, state)) = self.data.store().schema(&name) else {
            return Err(NodeError::not_found(format!("schema '{name}' not found")).into());
        };
        let definition = schema
            .definition
            .as_object()
            .map(map_to_struct)
            .unwrap_or_default();
        Ok(Response::new(GetSchemaResponse {
            summary: Some(data::summary(&schema, state)),
            schema: Some(definition),
        }))
    }

    async fn set_schema_state(
        &self,
        request: Request<SetSchemaStateRequest>,
    ) -> Result<Response<SetSchemaStateResponse>, Status> {
        require_admin(&self.data, &request, "changing a schema's state")?;
        let req = request.into_inner();
        crate::bounds::schema_name(&req.name)?;
        let prev = self.data.set_state(&req.name, req.state).await?;
        self.mesh.schemas_changed();
        tracing::info!(schema = %req.name, from = prev.as_str(), to = req.state, "schema state changed");
        Ok(Response::new(SetSchemaStateResponse {
            name: req.name,
            state: req.state,
            previous_state: data::state_to_proto(prev) as i32,
        }))
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let (principal, deadline, req) = extract(request)?;
        let span = tracing::info_span!(
            "fold.query",
            schema = %req.schema,
            target_node = %req.target_node_id,
            forwarded = !self.mesh.is_local(&req.target_node_id),
            route = req.route,
            outcome = tracing::field::Empty,
        );
        let op = operation::Kind::Query(req);
        traced(
            span,
            self.pipeline
                .call::<QueryResponse>(&principal, op, deadline),
        )
        .await
        .map(Response::new)
    }

    async fn mutate(
        &self,
        request: Request<MutateRequest>,
    ) -> Result<Response<MutateResponse>, Status> {
        let (principal, deadline, req) = extract(request)?;
        let span = tracing::info_span!(
            "fold.mutate",
            schema = %req.schema,
            target_node = %req.target_node_id,
            forwarded = !self.mesh.is_local(&req.target_node_id),
            outcome = tracing::field::Empty,
        );
        let op = operation::Kind::Mutate(req);
        traced(
            span,
            self.pipeline
                .call::<MutateResponse>(&principal, op, deadline),
        )
        .await
        .map(Response::new)
    }

    async fn batch_mutate(
        &self,
        request: Request<BatchMutateRequest>,
    ) -> Result<Response<BatchMutateResponse>, Status> {
        let (principal, deadline, req) = extract(request)?;
        let span = tracing::info_span!(
            "fold.batch_mutate",
            schema = %req.schema,
            mutations = req.mutations.len(),
            target_node = %req.target_node_id,
            outcome = tracing::field::Empty,
        );
        let op = operation::Kind::BatchMutate(req);
        traced(
            span,
            self.pipeline
                .call::<BatchMutateResponse>(&principal, op, deadline),
        )
        .await
        .map(Response::new)
    }

    type ScanStream = tokio_stream::wrappers::ReceiverStream<Result<Record, Status>>;

    async fn scan(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<Self::ScanStream>, Status> {
        let principal = principal_of(&request);
        let mut req = request.into_inner();
        crate::bounds::Bounded::check_bounds(&req)?;
        if !self.mesh.is_local(&req.target_node_id) || req.route != 0 {
            return Err(NodeError::invalid_argument(
                "Scan reads this node only (no target_node_id, no route); for other nodes, page through them with Query (page_size, page_token)",
            ).into());
        }
        if req.page_size == 0 {
            req.page_size = 1000;
        }
        req.page_token.clear();
        let slot = self.data.scan_slot(&principal)?;
        // The first page runs before the stream starts, so a bad request fails the call itself.
        let first = self.data.query(&principal, req.clone()).await?;
        // A small buffer: a slow reader slows the scan, never the node.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let data = self.data.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut page = first;
            loop {
                for r in page.records {
                    if tx.send(Ok(r)).await.is_err() {
                        return; // The client went away.
                    }
                }
                if page.next_page_token.is_empty() {
                    return;
                }
                req.page_token = std::mem::take(&mut page.next_page_token);
                page = match data.query(&principal, req.clone()).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type SubscribeStream = crate::subscribe::SubscriptionStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let principal = principal_of(&request);
        let mut req = request.into_inner();
        crate::bounds::Bounded::check_bounds(&req)?;
        if req.route != 0 {
            // "Any": choose where to start; the subscription then stays there (sequence
            // numbers are per node), and its progress messages name the node.
            let chosen = self
                .router
                .choose_for_subscription(
                    &req.schema,
                    &req.definition_hash,
                    req.route,
                    &req.target_node_id,
                )
                .await?;
            req.route = 0;
            req.target_node_id = chosen;
        }
        let span = tracing::info_span!(
            "fold.subscribe",
            schema = %req.schema,
            from_sequence = req.from_sequence,
            target_node = %req.target_node_id,
            outcome = tracing::field::Empty,
        );
        if !self.mesh.is_local(&req.target_node_id) {
            let resolve: crate::subscribe::Resolve = {
                let data = self.data.clone();
                let principal = principal.clone();
                Box::new(move || data.forwardable_requester(&principal))
            };
            let permit = self.data.subscription_permit(&principal)?;
            return traced(
                span,
                crate::subscribe::start_remote(
                    self.mesh.clone(),
                    self.data.hub().clone(),
                    self.data.metrics().clone(),
                    req,
                    resolve,
                    permit,
                ),
            )
            .await
            .map(Response::new);
        }
        traced(
            span,
            self.data
                .subscribe(&principal, req, self.mesh.node_id_or_empty()),
        )
        .await
        .map(Response::new)
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let (principal, deadline, req) = extract(request)?;
        let span = tracing::info_span!(
            "fold.history",
            schema = %req.schema,
            target_node = %req.target_node_id,
            route = req.route,
            outcome = tracing::field::Empty,
        );
        let op = operation::Kind::History(req);
        traced(
            span,
            self.pipeline
                .call::<HistoryResponse>(&principal, op, deadline),
        )
        .await
        .map(Response::new)
    }
}

/// `fold.v1.Network`: the mesh through the sidecar, plus this node's trust table.
#[derive(Clone)]
pub struct NetworkApi {
    data: Data,
    mesh: MeshLink,
    router: Router,
    /// This fold-node's admin HTTP address, once bound (Network.Status reports it).
    admin_addr: Arc<std::sync::OnceLock<String>>,
}

impl NetworkApi {
    pub fn new(data: Data, mesh: MeshLink, router: Router) -> Self {
        NetworkApi {
            data,
            mesh,
            router,
            admin_addr: Arc::default(),
        }
    }

    /// Report this admin address (set once the admin port is bound) in Network.Status.
    pub fn with_admin_addr(mut self, addr: Arc<std::sync::OnceLock<String>>) -> Self {
        self.admin_addr = addr;
        self
    }

    /// The distance this node gives a peer: -1 when denied.
    fn trust_of(&self, node_id: &str) -> Result<i32, Status> {
        let (d, _) = self
            .data
            .identities()
            .peer_distance(node_id)
            .map_err(crate::error::status)?;
        Ok(d.map(|d| i32::try_from(d).unwrap_or(i32::MAX))
            .unwrap_or(-1))
    }

    async fn peers(&self, include_disconnected: bool) -> Result<Vec<PeerInfo>, Status> {
        let mut peers = self
            .mesh
            .client()?
            .list_peers(ListPeersRequest {
                include_disconnected,
            })
            .await?
            .into_inner()
            .peers;
        for p in &mut peers {
            p.trust_distance = self.trust_of(&p.node_id)?;
            if let Some(s) = self.router.stats(&p.node_id) {
                p.route_latency_micros = u64::try_from(s.latency.as_micros()).unwrap_or(u64::MAX);
                p.route_in_flight = s.in_flight;
                p.route_requests = s.requests;
                p.route_failures = s.failures;
            }
            if let Some(b) = self.mesh.breaker_state(&p.node_id) {
                p.breaker = b.as_str().replace('_', "-");
            }
        }
        Ok(peers)
    }
}

fn entry(node_id: &str, r: TrustRecord) -> TrustEntry {
    TrustEntry {
        node_id: node_id.to_string(),
        distance: r.distance,
        denied: r.denied,
    }
}

#[tonic::async_trait]
impl Network for NetworkApi {
    async fn status(
        &self,
        _request: Request<NetworkStatusRequest>,
    ) -> Result<Response<NetworkStatusResponse>, Status> {
        let mut resp = self
            .mesh
            .client()?
            .status(fold_proto::sidecar::MeshStatusRequest {})
            .await?;
        resp.get_mut().replicas = self.data.replicas().status();
        resp.get_mut().groups = crate::groups::admin::list(self.data.groups(), self.data.store());
        resp.get_mut().node_admin_addr = self.admin_addr.get().cloned().unwrap_or_default();
        Ok(resp)
    }

    async fn list_peers(
        &self,
        request: Request<ListPeersRequest>,
    ) -> Result<Response<ListPeersResponse>, Status> {
        let peers = self
            .peers(request.into_inner().include_disconnected)
            .await?;
        Ok(Response::new(ListPeersResponse { peers }))
    }

    async fn dial(&self, request: Request<DialRequest>) -> Result<Response<DialResponse>, Status> {
        require_admin(&self.data, &request, "dialing a peer")?;
        self.mesh.client()?.dial(request.into_inner()).await
    }

    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        require_admin(&self.data, &request, "disconnecting a peer")?;
        self.mesh.client()?.disconnect(request.into_inner()).await
    }

    async fn check_schemas(
        &self,
        request: Request<CheckSchemasRequest>,
    ) -> Result<Response<CheckSchemasResponse>, Status> {
        let req = request.into_inner();
        crate::bounds::node_id(&req.node_id)?;
        if req.names.len() > 1024 {
            return Err(NodeError::invalid_argument(format!(
                "'names' lists {} schemas; at most 1024 per check",
                req.names.len()
            ))
            .into());
        }
        req.names
            .iter()
            .try_for_each(|n| crate::bounds::schema_name(n))?;
        if self.mesh.is_local(&req.node_id) {
            let served = self.data.served(&req.names);
            return Ok(Response::new(CheckSchemasResponse {
                node_id: self.mesh.node_id_or_empty(),
                approved: served.iter().map(|s| s.name.clone()).collect(),
                definition_hashes: served
                    .iter()
                    .map(|s| (s.name.clone(), s.definition_hash.clone()))
                    .collect(),
            }));
        }
        self.mesh.client()?.check_schemas(req).await
    }

    async fn find_providers(
        &self,
        request: Request<FindProvidersRequest>,
    ) -> Result<Response<FindProvidersResponse>, Status> {
        let req = request.into_inner();
        crate::bounds::schema_name(&req.schema)?;
        if req.schema.is_empty() {
            return Err(NodeError::invalid_argument("'schema' is required").into());
        }
        self.mesh.client()?.find_providers(req).await
    }

    async fn get_trust(
        &self,
        request: Request<GetTrustRequest>,
    ) -> Result<Response<GetTrustResponse>, Status> {
        require_admin(&self.data, &request, "reading the trust table")?;
        let want = request.into_inner().node_id;
        let all = self
            .data
            .store()
            .trust_all()
            .map_err(crate::error::status)?;
        let entries = all
            .iter()
            .filter(|(id, _)| want.is_empty() || **id == want)
            .map(|(id, r)| entry(id, *r))
            .collect();
        let default_entry = match self.data.identities().unknown_peer_policy() {
            crate::identity::UnknownPeerPolicy::Deny => TrustEntry {
                node_id: String::new(),
                distance: 0,
                denied: true,
            },
            crate::identity::UnknownPeerPolicy::Distance(d) => TrustEntry {
                node_id: String::new(),
                distance: d,
                denied: false,
            },
        };
        Ok(Response::new(GetTrustResponse {
            entries,
            default_entry: Some(default_entry),
        }))
    }

    async fn set_trust(
        &self,
        request: Request<SetTrustRequest>,
    ) -> Result<Response<SetTrustResponse>, Status> {
        require_admin(&self.data, &request, "changing the trust table")?;
        let req = request.into_inner();
        let Some(e) = req.entry else {
            return Err(NodeError::invalid_argument("'entry' is required").into());
        };
        if e.node_id.is_empty() {
            return Err(NodeError::invalid_argument("'entry.node_id' is required").into());
        }
        if e.node_id.len() > crate::mesh::MAX_NODE_ID_BYTES * 4 {
            return Err(NodeError::invalid_argument(format!(
                "'entry.node_id' is {} bytes; a node id or certificate name is at most {} bytes",
                e.node_id.len(),
                crate::mesh::MAX_NODE_ID_BYTES * 4
            ))
            .into());
        }
        let record = TrustRecord {
            distance: e.distance,
            denied: e.denied,
        };
        let store = self.data.store().clone();
        let id = e.node_id.clone();
        let remove = req.remove;
        tokio::task::spawn_blocking(move || {
            store.trust_set(&id, if remove { None } else { Some(record) })
        })
        .await
        .map_err(|e| NodeError::internal(e.to_string()))?
        .map_err(crate::error::status)?;
        tracing::info!(peer = %e.node_id, distance = e.distance, denied = e.denied, removed = remove, "trust table changed");
        Ok(Response::new(SetTrustResponse { entry: Some(e) }))
    }

    async fn create_group(
        &self,
        request: Request<CreateGroupRequest>,
    ) -> Result<Response<CreateGroupResponse>, Status> {
        require_admin(&self.data, &request, "creating a schema group")?;
        let group = crate::groups::admin::create(
            self.data.groups(),
            self.data.store(),
            self.data.identities(),
            &self.mesh,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(CreateGroupResponse { group: Some(group) }))
    }

    async fn change_group_members(
        &self,
        request: Request<ChangeGroupMembersRequest>,
    ) -> Result<Response<ChangeGroupMembersResponse>, Status> {
        require_admin(&self.data, &request, "changing a schema group's members")?;
        let group = crate::groups::admin::change(
            self.data.groups(),
            self.data.store(),
            self.data.identities(),
            &self.mesh,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(ChangeGroupMembersResponse {
            group: Some(group),
        }))
    }

    async fn list_groups(
        &self,
        _request: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        let groups = crate::groups::admin::list(self.data.groups(), self.data.store());
        Ok(Response::new(ListGroupsResponse { groups }))
    }

    async fn topology(
        &self,
        request: Request<TopologyRequest>,
    ) -> Result<Response<TopologyResponse>, Status> {
        let deadline = grpc_timeout(request.metadata());
        let principal = principal_of(&request);
        let req = request.into_inner();
        if req.max_hops > topology::MAX_HOPS {
            return Err(NodeError::invalid_argument(format!(
                "'max_hops' is {}; at most {} hops are gathered",
                req.max_hops,
                topology::MAX_HOPS
            ))
            .into());
        }
        let peers = self.peers(false).await?;
        let node_id = self.mesh.node_id_or_empty();
        if req.max_hops == 0 {
            return Ok(Response::new(TopologyResponse {
                node_id,
                peers,
                nodes: Vec::new(),
                nodes_not_asked: 0,
            }));
        }
        // The peers of other nodes are asked for this client: a client this node denies is
        // refused here, and the others see it with the path distance.
        let requester = self.data.forwardable_requester(&principal)?;
        let mut budget = match req.timeout_ms {
            0 => topology::DEFAULT_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)).min(topology::MAX_TIMEOUT),
        };
        // Answer before the client gives up, with a margin for the way back.
        if let Some(d) = deadline {
            budget = budget.min(d.saturating_sub((d / 10).min(Duration::from_millis(300))));
        }
        let span = tracing::info_span!(
            "fold.topology",
            max_hops = req.max_hops,
            budget_ms = budget.as_millis() as u64,
            nodes = tracing::field::Empty,
        );
        let g = topology::gather(
            &self.mesh,
            node_id.clone(),
            peers.clone(),
            requester,
            req.max_hops,
            budget,
        )
        .instrument(span.clone())
        .await;
        span.record("nodes", g.nodes.len());
        Ok(Response::new(TopologyResponse {
            node_id,
            peers,
            nodes: g.nodes,
            nodes_not_asked: g.not_asked,
        }))
    }
}
