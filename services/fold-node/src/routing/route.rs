//! Schema-addressed reads (`ROUTE_ANY`, `ROUTE_ALL`; docs/ROUTING.md).
//!
//! - **Provider set**: the schema's DHT provider records (the sidecar's `FindProviders`), each
//!   confirmed by the schema-check protocol (approved there), plus this node when it serves the
//!   schema. Cached per schema for `--provider-ttl-secs`, refreshed in the background once half
//!   of that has passed; a failed refresh keeps serving the last good set. Peers the sidecar
//!   reports disconnected, or whose breaker is open, are left out of "any" until they are back.
//! - **Balancing**: [`crate::routing::balance`] (P2C over peak-EWMA with a failure penalty).
//! - **Retries**: a read failing with UNAVAILABLE or DEADLINE_EXCEEDED is retried on another
//!   provider, within the caller's deadline and a retry budget (tower's `TpsBudget`: a share of
//!   recent requests plus a floor per second). Other codes are answered as they are.
//! - **Hedging** (`--hedge-after-ms`, off by default): a read still unanswered after that long
//!   is also sent to a second provider, paid from the same budget; the first answer wins.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fold_proto::v1::{
    HistoryRequest, HistoryResponse, NodeAnswer, QueryRequest, QueryResponse, Route,
};
use fold_proto::wire::{forward_response, operation};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tonic::Code;

use crate::error::{NodeError, is_callee_failure};
use tower::retry::budget::{Budget, TpsBudget};

use crate::access::identity::Principal;
use crate::link::mesh::valid_node_id;
use crate::link::{Link, expect};
use crate::metrics::NodeMetrics;
use crate::ops::execute::Executor;
use crate::routing::balance::{BalanceConfig, Balancer, EndpointStats};

/// Most providers of one schema confirmed and kept (the DHT may return more).
const MAX_PROVIDERS: usize = 32;
/// Most schemas whose provider sets are cached; the oldest is dropped first.
const MAX_CACHED_SCHEMAS: usize = 1024;
/// An empty provider set is looked up again after this long at most.
const EMPTY_SET_TTL: Duration = Duration::from_secs(5);
/// How long a provider that stopped answering schema checks stays in its set (reported failing
/// by ROUTE_ALL, left out of ROUTE_ANY while disconnected or its breaker is open).
const KEEP_UNREACHABLE: Duration = Duration::from_secs(300);
/// After a failed background refresh, the next one waits at least this long.
const REFRESH_RETRY: Duration = Duration::from_secs(1);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// The `required` hash of a lookup that only asks whether any node serves a schema name (never
/// used to choose a provider).
const ANY_DEFINITION: &str = "";
/// Most nodes asked by one read under ROUTE_ANY (the first try plus failovers).
const MAX_ATTEMPTS: usize = 3;
/// Below this much time left, no further attempt starts.
const MIN_ATTEMPT: Duration = Duration::from_millis(5);

/// Tuning of routing (command-line flags of fold-node).
#[derive(Debug, Clone)]
pub struct RouteOptions {
    /// How long a schema's confirmed provider set is used before it is looked up again.
    pub provider_ttl: Duration,
    /// Retries allowed as a share of recent routed requests (0.2 = 20%).
    pub retry_ratio: f32,
    /// Retries allowed per second on top of the ratio.
    pub retry_min_per_sec: u32,
    /// Send a second copy of a read still unanswered after this long (None = no hedging).
    pub hedge_after: Option<Duration>,
    pub balance: BalanceConfig,
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions {
            provider_ttl: Duration::from_secs(30),
            retry_ratio: 0.2,
            retry_min_per_sec: 5,
            hedge_after: None,
            balance: BalanceConfig::default(),
        }
    }
}

#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    exec: Executor,
    metrics: Arc<NodeMetrics>,
    opts: RouteOptions,
    balancer: Arc<Balancer>,
    budget: TpsBudget,
    cache: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Cached>>>>>,
}

#[derive(Debug, Clone)]
struct Cached {
    nodes: Vec<String>,
    fetched: Instant,
    /// When the last lookup (successful or not) started.
    last_attempt: Instant,
    refreshing: bool,
    /// Members that could not be reached by the last schema checks, since when: kept (and
    /// reported by ROUTE_ALL as failing) for KEEP_UNREACHABLE, then dropped.
    unreachable_since: HashMap<String, Instant>,
}

/// What one lookup found: providers confirmed by a schema check, and provider records whose
/// node could not be asked.
struct Looked {
    confirmed: Vec<String>,
    unreachable: Vec<String>,
}

impl Cached {
    /// The set after a lookup: the confirmed providers, plus earlier members that could not be
    /// reached now (a dead provider stays visible as failing for a while instead of vanishing).
    fn after(prev: Option<&Cached>, looked: Looked) -> Cached {
        let now = Instant::now();
        let mut nodes = looked.confirmed;
        let mut unreachable_since = HashMap::new();
        if let Some(prev) = prev {
            for n in looked.unreachable {
                if !prev.nodes.contains(&n) {
                    continue;
                }
                let since = prev.unreachable_since.get(&n).copied().unwrap_or(now);
                if now.saturating_duration_since(since) < KEEP_UNREACHABLE {
                    unreachable_since.insert(n.clone(), since);
                    nodes.push(n);
                }
            }
        }
        nodes.sort();
        nodes.dedup();
        Cached {
            nodes,
            fetched: now,
            last_attempt: now,
            refreshing: false,
            unreachable_since,
        }
    }
}

/// One read, routed: a query or a history request.
#[derive(Clone)]
enum Read {
    Query(QueryRequest),
    History(HistoryRequest),
}

enum Answer {
    Query(QueryResponse),
    History(HistoryResponse),
}

/// A routed read's result: one answer per node (ALL), or one node's answer and how many nodes
/// were asked (ANY).
enum Routed {
    All(Vec<NodeAnswer>),
    Any(Answer, u32),
}

impl Read {
    fn schema(&self) -> &str {
        match self {
            Read::Query(q) => &q.schema,
            Read::History(h) => &h.schema,
        }
    }
    /// The definition hash the client pinned (empty: none).
    fn pin(&self) -> &str {
        match self {
            Read::Query(q) => &q.definition_hash,
            Read::History(h) => &h.definition_hash,
        }
    }
    fn for_node(&self, node: &str) -> Read {
        let mut r = self.clone();
        match &mut r {
            Read::Query(q) => {
                q.route = 0;
                q.target_node_id = node.to_string();
            }
            Read::History(h) => {
                h.route = 0;
                h.target_node_id = node.to_string();
            }
        }
        r
    }
    fn into_op(self) -> operation::Kind {
        match self {
            Read::Query(q) => operation::Kind::Query(q),
            Read::History(h) => operation::Kind::History(h),
        }
    }
    /// Node `node`'s answer `r` to this read.
    fn answer(&self, node: &str, r: forward_response::Result) -> Result<Answer, NodeError> {
        match self {
            Read::Query(_) => expect(node, r).map(Answer::Query),
            Read::History(_) => expect(node, r).map(Answer::History),
        }
    }
    fn op(&self) -> &'static str {
        match self {
            Read::Query(_) => "query",
            Read::History(_) => "history",
        }
    }
}

/// May a read that failed with this code be tried on another provider? Only when the provider
/// could not answer (unreachable, too slow: [`is_callee_failure`]); never when it answered with
/// a refusal. Narrower than `is_callee_failure`: CANCELLED is not retried, since a cancelled
/// read is the client (or its deadline) going away, not the provider failing.
pub fn retryable(code: Code) -> bool {
    is_callee_failure(code) && code != Code::Cancelled
}

impl Router {
    pub fn new(exec: Executor, metrics: Arc<NodeMetrics>, opts: RouteOptions) -> Self {
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            opts.retry_min_per_sec,
            opts.retry_ratio,
        );
        let balancer = Balancer::new(opts.balance);
        {
            let balancer = balancer.clone();
            exec.link()
                .on_reconnect(Box::new(move |node| balancer.reset_estimate(node)));
        }
        Router {
            inner: Arc::new(Inner {
                exec,
                metrics,
                balancer,
                budget,
                opts,
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// How the router runs an operation on one node (here or forwarded).
    pub fn executor(&self) -> &Executor {
        &self.inner.exec
    }

    /// What routing knows of `node`, for `Network.ListPeers`.
    pub fn stats(&self, node: &str) -> Option<EndpointStats> {
        self.inner.balancer.stats(node, Instant::now())
    }

    pub async fn query(
        &self,
        who: &Principal,
        req: QueryRequest,
        deadline: Option<Duration>,
    ) -> Result<QueryResponse, NodeError> {
        let route = check_route(req.route, &req.target_node_id, &req.page_token)?;
        match self.route(who, route, Read::Query(req), deadline).await? {
            Routed::All(answers) => Ok(QueryResponse {
                node_id: self.inner.exec.link().node_id_or_empty(),
                answers,
                ..Default::default()
            }),
            Routed::Any(Answer::Query(mut q), attempts) => {
                q.attempts = attempts;
                Ok(q)
            }
            Routed::Any(Answer::History(_), _) => {
                Err(NodeError::internal("a query was answered as history"))
            }
        }
    }

    pub async fn history(
        &self,
        who: &Principal,
        req: HistoryRequest,
        deadline: Option<Duration>,
    ) -> Result<HistoryResponse, NodeError> {
        let route = check_route(req.route, &req.target_node_id, &req.page_token)?;
        match self.route(who, route, Read::History(req), deadline).await? {
            Routed::All(answers) => Ok(HistoryResponse {
                node_id: self.inner.exec.link().node_id_or_empty(),
                answers,
                ..Default::default()
            }),
            Routed::Any(Answer::History(mut h), attempts) => {
                h.attempts = attempts;
                Ok(h)
            }
            Routed::Any(Answer::Query(_), _) => {
                Err(NodeError::internal("history was answered as a query"))
            }
        }
    }

    async fn route(
        &self,
        who: &Principal,
        route: Route,
        read: Read,
        deadline: Option<Duration>,
    ) -> Result<Routed, NodeError> {
        Ok(match route {
            Route::All => Routed::All(self.all(who, &read, deadline).await?),
            _ => {
                let (answer, attempts) = self.any(who, &read, deadline).await?;
                Routed::Any(answer, attempts)
            }
        })
    }

    /// Where a ROUTE_ANY subscription starts: one provider of `schema`, chosen as for a routed
    /// read (this node's id, or empty for this node while its id is unknown).
    pub async fn choose_for_subscription(
        &self,
        schema: &str,
        pin: &str,
        route: i32,
        target: &str,
    ) -> Result<String, NodeError> {
        match check_route(route, target, "")? {
            Route::Any => {}
            Route::All => {
                return Err(NodeError::invalid_argument(
                    "a subscription follows one node's sequence numbers: ROUTE_ALL is not possible (subscribe to each node instead)",
                ));
            }
            Route::Default => return Ok(target.to_string()),
        }
        let providers = self
            .providers(schema, pin, Instant::now() + LOOKUP_TIMEOUT)
            .await?;
        let candidates = self.candidates(&providers, &[]);
        self.inner
            .balancer
            .pick(&candidates, Instant::now(), |n| fastrand::usize(..n))
            .ok_or_else(|| {
                NodeError::unavailable(format!(
                    "no provider of schema '{schema}' can be reached now"
                ))
            })
    }

    /// Run `read` on `node` (this node or through the mesh) within `timeout`.
    async fn run_on(
        &self,
        who: &Principal,
        node: &str,
        read: &Read,
        timeout: Duration,
    ) -> Result<Answer, NodeError> {
        let exec = &self.inner.exec;
        if node.is_empty() || exec.link().is_local(node) {
            let r = exec.local(who, read.for_node("").into_op(), None).await?;
            return read.answer(node, r);
        }
        let fut = exec.forward(
            who,
            node.to_string(),
            read.for_node(node).into_op(),
            Some(timeout),
        );
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => read.answer(node, r?),
            Err(_) => Err(NodeError::deadline_exceeded(format!(
                "node {node} did not answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// One attempt on `node`, measured by the balancer.
    async fn attempt(
        &self,
        who: &Principal,
        node: &str,
        read: &Read,
        timeout: Duration,
    ) -> Result<Answer, NodeError> {
        let guard = self.inner.balancer.start(node, Instant::now());
        self.inner.metrics.route_attempt(read.op());
        let r = self.run_on(who, node, read, timeout).await;
        // Only failures to answer count against the provider: a refusal (PERMISSION_DENIED,
        // NOT_FOUND, ...) was answered, as fast as it was.
        let ok = !matches!(&r, Err(s) if retryable(s.code()));
        guard.finish(ok, Instant::now());
        if let Some(s) = self.inner.balancer.stats(node, Instant::now()) {
            self.inner.metrics.route_peer(node, s.latency, s.in_flight);
        }
        r
    }

    /// ROUTE_ANY: one provider, balanced, failing over within the deadline and the budget.
    async fn any(
        &self,
        who: &Principal,
        read: &Read,
        deadline: Option<Duration>,
    ) -> Result<(Answer, u32), NodeError> {
        let started = Instant::now();
        let total = deadline.unwrap_or_else(|| self.inner.exec.link().forward_timeout());
        let providers = self
            .providers(read.schema(), read.pin(), started + total)
            .await?;
        self.inner.budget.deposit();
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<NodeError> = None;
        let outcome = loop {
            let left = total.saturating_sub(started.elapsed());
            let candidates = self.candidates(&providers, &tried);
            let Some(node) = self
                .inner
                .balancer
                .pick(&candidates, Instant::now(), |n| fastrand::usize(..n))
            else {
                break None;
            };
            if left < MIN_ATTEMPT || tried.len() >= MAX_ATTEMPTS {
                break None;
            }
            if !tried.is_empty() {
                if !self.inner.budget.withdraw() {
                    self.inner.metrics.route_retry("budget_exhausted");
                    break None;
                }
                self.inner.metrics.route_retry("retried");
            }
            // Leave time for a failover when there is another provider to fail over to.
            let more = candidates.len() > 1 && tried.len() + 1 < MAX_ATTEMPTS;
            let timeout = if more { left / 2 } else { left };
            tried.push(node.clone());
            let r = match self.inner.opts.hedge_after {
                Some(after) if more && after < timeout => {
                    self.hedged(who, &node, read, timeout, after, &providers, &mut tried)
                        .await
                }
                _ => self.attempt(who, &node, read, timeout).await,
            };
            match r {
                Ok(a) => break Some(Ok(a)),
                Err(s) if retryable(s.code()) => {
                    tracing::debug!(node = %node, code = ?s.code(), "routed read failed; trying another provider");
                    last = Some(s);
                }
                Err(s) => break Some(Err(s)),
            }
        };
        let attempts = tried.len() as u32;
        let result = match outcome {
            Some(r) => r,
            None => Err(none_answered(read.schema(), &tried, &providers, last)),
        };
        self.inner.metrics.route_request(
            "any",
            match &result {
                Ok(_) => "OK",
                Err(s) => fold_middleware::metrics::code_name(s.code()),
            },
        );
        result.map(|a| (a, attempts))
    }

    /// The first try on `node`; if it is still unanswered after `after`, a second on another
    /// provider (paid from the retry budget). The first answer wins, the other is cancelled.
    #[allow(clippy::too_many_arguments)]
    async fn hedged(
        &self,
        who: &Principal,
        node: &str,
        read: &Read,
        timeout: Duration,
        after: Duration,
        providers: &[String],
        tried: &mut Vec<String>,
    ) -> Result<Answer, NodeError> {
        let first = self.attempt(who, node, read, timeout);
        tokio::pin!(first);
        tokio::select! {
            r = &mut first => return r,
            _ = tokio::time::sleep(after) => {}
        }
        let candidates = self.candidates(providers, tried);
        let second = match self
            .inner
            .balancer
            .pick(&candidates, Instant::now(), |n| fastrand::usize(..n))
        {
            Some(n) if self.inner.budget.withdraw() => n,
            _ => return first.await,
        };
        self.inner.metrics.route_retry("hedged");
        tried.push(second.clone());
        let hedge = self.attempt(who, &second, read, timeout.saturating_sub(after));
        tokio::pin!(hedge);
        // The first *answer* wins; a failure waits for the other.
        tokio::select! {
            r = &mut first => match r {
                Ok(a) => Ok(a),
                Err(_) => hedge.await,
            },
            r = &mut hedge => match r {
                Ok(a) => Ok(a),
                Err(_) => first.await,
            },
        }
    }

    /// Providers routing may send to now, minus those already tried. When every untried
    /// provider is left out (disconnected, breaker open), they are all candidates again: a
    /// request the mesh may still carry beats a certain failure.
    fn candidates(&self, providers: &[String], tried: &[String]) -> Vec<String> {
        let untried: Vec<String> = providers
            .iter()
            .filter(|p| !tried.contains(p))
            .cloned()
            .collect();
        let healthy: Vec<String> = untried
            .iter()
            .filter(|p| {
                p.is_empty()
                    || self.inner.exec.link().is_local(p)
                    || self.inner.exec.link().routable(p)
            })
            .cloned()
            .collect();
        if healthy.is_empty() { untried } else { healthy }
    }

    /// ROUTE_ALL: every provider at once, each answering on its own.
    async fn all(
        &self,
        who: &Principal,
        read: &Read,
        deadline: Option<Duration>,
    ) -> Result<Vec<NodeAnswer>, NodeError> {
        let started = Instant::now();
        let total = deadline.unwrap_or_else(|| self.inner.exec.link().forward_timeout());
        // Keep a margin of the caller's deadline for the answer itself.
        let budget = total.saturating_sub((total / 10).min(Duration::from_millis(200)));
        let providers = self
            .providers(read.schema(), read.pin(), started + budget)
            .await?;
        let mut pending: FuturesUnordered<_> = providers
            .iter()
            .map(|node| {
                let node = node.clone();
                async move {
                    let t = Instant::now();
                    let left = budget.saturating_sub(started.elapsed());
                    let r = if left < MIN_ATTEMPT {
                        Err(NodeError::deadline_exceeded(
                            "no time was left to ask this node",
                        ))
                    } else {
                        self.attempt(who, &node, read, left).await
                    };
                    (node, r, t.elapsed())
                }
            })
            .collect();
        let mut answers = Vec::with_capacity(providers.len());
        while let Some((node, r, took)) = pending.next().await {
            let mut a = NodeAnswer {
                node_id: node,
                latency_micros: took.as_micros() as u64,
                ..Default::default()
            };
            match r {
                Ok(Answer::Query(q)) => {
                    a.records = q.records;
                    a.next_page_token = q.next_page_token;
                }
                Ok(Answer::History(h)) => {
                    a.versions = h.versions;
                    a.next_page_token = h.next_page_token;
                }
                Err(s) => {
                    a.code = s.code() as i32;
                    a.message = s.message().to_string();
                }
            }
            answers.push(a);
        }
        answers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let failed = answers.iter().filter(|a| a.code != 0).count();
        self.inner.metrics.route_request(
            "all",
            if failed == 0 {
                "OK"
            } else if failed == answers.len() {
                "all_failed"
            } else {
                "partial"
            },
        );
        Ok(answers)
    }

    /// The definition a provider of `schema` must hold: the hash the client pinned, else the
    /// definition loaded here (in any state). A node with neither cannot tell a real provider
    /// from an impostor that loaded other rules under the same name, so it asks none.
    fn required_hash(&self, schema: &str, pin: &str) -> Result<String, NodeError> {
        if !pin.is_empty() {
            return Ok(pin.to_string());
        }
        match self.inner.exec.data().store().schema(schema) {
            Some((s, _)) => Ok(s.definition_hash.clone()),
            None => Err(NodeError::failed_precondition(format!(
                "this node has no definition of schema '{schema}' to check providers against: load the schema here (LoadSchema; approving it is not needed), or pin its definition_hash in the request (SchemaSummary.definition_hash on a node you trust)"
            ))),
        }
    }

    /// The confirmed providers of `schema` holding the definition the request needs (this
    /// node's id among them when it serves it; the empty string for this node while its id is
    /// not known yet), less any that this node's trust table denies now (an explicit `deny`
    /// entry; peers merely unknown to a node whose unknown-peer policy is `deny` stay usable as
    /// providers: they only answer, with the definition checked above).
    async fn providers(
        &self,
        schema: &str,
        pin: &str,
        until: Instant,
    ) -> Result<Vec<String>, NodeError> {
        let required = match self.required_hash(schema, pin) {
            Ok(h) => h,
            Err(refusal) => {
                // Nothing to check providers against: when no node serves the name at all,
                // that is the answer (NOT_FOUND); otherwise none of them can be trusted.
                self.confirmed(schema, ANY_DEFINITION, until).await?;
                return Err(refusal);
            }
        };
        let nodes = self.confirmed(schema, &required, until).await?;
        let identities = self.inner.exec.data().identities();
        let allowed: Vec<String> = nodes
            .into_iter()
            .filter(|n| {
                n.is_empty()
                    || self.inner.exec.link().is_local(n)
                    || !matches!(identities.peer_distance(n), Ok((None, true)) | Err(_))
            })
            .collect();
        not_empty(schema, allowed)
    }

    /// The cached (or looked up) providers of `schema` with definition `required`.
    async fn confirmed(
        &self,
        schema: &str,
        required: &str,
        until: Instant,
    ) -> Result<Vec<String>, NodeError> {
        let key = format!("{schema}\n{required}");
        let slot = {
            let mut cache = self
                .inner
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !cache.contains_key(&key) && cache.len() >= MAX_CACHED_SCHEMAS {
                // Drop one entry not in use (bounded memory for many schema names).
                if let Some(k) = cache
                    .iter()
                    .find(|(_, v)| Arc::strong_count(v) == 1)
                    .map(|(k, _)| k.clone())
                {
                    cache.remove(&k);
                }
            }
            cache.entry(key).or_default().clone()
        };
        let ttl = self.inner.opts.provider_ttl;
        // Callers wait here for a lookup another caller started: one lookup per schema at once.
        let wait = until.saturating_duration_since(Instant::now());
        let mut entry = match tokio::time::timeout(wait, slot.clone().lock_owned()).await {
            Ok(g) => g,
            Err(_) => {
                return Err(NodeError::deadline_exceeded(format!(
                    "the providers of schema '{schema}' were still being looked up when the deadline passed"
                )));
            }
        };
        if let Some(c) = entry.as_mut() {
            let age = c.fetched.elapsed();
            // A known set is used at once (stale-while-revalidate): from half its TTL on, a
            // background lookup replaces it; while lookups fail, the last good set stays. An
            // empty set ("none found") is looked up again inline once EMPTY_SET_TTL has passed.
            if !c.nodes.is_empty() || age < ttl.min(EMPTY_SET_TTL) {
                let due =
                    age >= ttl / 2 && !c.refreshing && c.last_attempt.elapsed() >= REFRESH_RETRY;
                if due && !c.nodes.is_empty() {
                    c.refreshing = true;
                    c.last_attempt = Instant::now();
                    self.refresh_in_background(schema, required, slot.clone());
                }
                return not_empty(schema, c.nodes.clone());
            }
        }
        let wait = until.saturating_duration_since(Instant::now());
        let looked_up = match tokio::time::timeout(wait, self.lookup(schema, required)).await {
            Ok(r) => r,
            Err(_) => Err(NodeError::deadline_exceeded(format!(
                "looking up the providers of schema '{schema}' did not finish within the deadline"
            ))),
        };
        match looked_up {
            Ok(looked) => {
                let next = Cached::after(entry.as_ref(), looked);
                let nodes = next.nodes.clone();
                *entry = Some(next);
                not_empty(schema, nodes)
            }
            Err(e) => match entry.as_ref() {
                // Serve the last good set while lookups fail.
                Some(c) if !c.nodes.is_empty() => {
                    tracing::warn!(schema = %schema, error = %e.message(), "provider lookup failed; using the last known set");
                    Ok(c.nodes.clone())
                }
                _ => Err(e),
            },
        }
    }

    fn refresh_in_background(
        &self,
        schema: &str,
        required: &str,
        slot: Arc<tokio::sync::Mutex<Option<Cached>>>,
    ) {
        let router = self.clone();
        let schema = schema.to_string();
        let required = required.to_string();
        tokio::spawn(async move {
            let r = router.lookup(&schema, &required).await;
            let mut g = slot.lock().await;
            match r {
                Ok(looked) => {
                    let next = Cached::after(g.as_ref(), looked);
                    *g = Some(next);
                }
                Err(e) => {
                    tracing::warn!(schema = %schema, error = %e.message(), "refreshing a provider set failed; keeping the last one");
                    if let Some(c) = g.as_mut() {
                        c.refreshing = false;
                    }
                }
            }
        });
    }

    /// Ask the DHT for providers of `schema` and confirm each with a schema check: approved
    /// there, with definition hash `required` (policies included).
    async fn lookup(&self, schema: &str, required: &str) -> Result<Looked, NodeError> {
        let inner = &self.inner;
        let me = inner.exec.link().node_id_or_empty();
        let local = inner
            .exec
            .data()
            .served(&[schema.to_string()])
            .iter()
            .any(|s| required == ANY_DEFINITION || s.definition_hash == required);
        let mut nodes = Vec::new();
        if local {
            nodes.push(me.clone());
        }
        // The mesh is away: this node alone, if it serves the schema.
        if let Err(e) = inner.exec.link().ready() {
            if !local {
                return Err(e);
            }
            return Ok(Looked {
                confirmed: nodes,
                unreachable: Vec::new(),
            });
        }
        let found = match inner.exec.link().providers(schema, LOOKUP_TIMEOUT).await {
            Ok(found) => found,
            Err(e) => {
                inner.metrics.provider_lookup("failed");
                if local {
                    tracing::warn!(schema = %schema, error = %e.message(), "provider lookup failed; only this node is known to serve it");
                    return Ok(Looked {
                        confirmed: nodes,
                        unreachable: Vec::new(),
                    });
                }
                return Err(e);
            }
        };
        let checks: FuturesUnordered<_> = found
            .into_iter()
            .filter(|n| valid_node_id(n) && *n != me)
            .take(MAX_PROVIDERS)
            .map(|node| confirm(inner.exec.link(), node, schema, required, &inner.metrics))
            .collect();
        let answers: Vec<(String, Option<bool>)> = checks.collect().await;
        let mut unreachable = Vec::new();
        for (node, approved) in answers {
            match approved {
                Some(true) => nodes.push(node),
                Some(false) => {}
                None => unreachable.push(node),
            }
        }
        inner.metrics.provider_lookup(if nodes.is_empty() {
            "none_found"
        } else {
            "found"
        });
        Ok(Looked {
            confirmed: nodes,
            unreachable,
        })
    }
}

/// Ask `node` (a provider record of `schema`) whether it serves the schema with definition
/// `required`: yes, no (not approved there, or other rules: an impostor for this read, never
/// asked), or `None` when it could not be asked.
fn confirm(
    link: &dyn Link,
    node: String,
    schema: &str,
    required: &str,
    metrics: &Arc<NodeMetrics>,
) -> impl std::future::Future<Output = (String, Option<bool>)> + use<> {
    let check = link.check_schemas(&node, vec![schema.to_string()], CHECK_TIMEOUT);
    let schema = schema.to_string();
    let required = required.to_string();
    let metrics = metrics.clone();
    async move {
        match check.await {
            Ok(r) if r.approved.contains(&schema) => {
                let theirs = r.definition_hashes.get(&schema);
                if required == ANY_DEFINITION
                    || theirs.map(String::as_str) == Some(required.as_str())
                {
                    (node, Some(true))
                } else {
                    tracing::warn!(node = %node, schema = %schema, theirs = ?theirs, required = %required, "provider not used: its definition of the schema differs (policies included)");
                    metrics.provider_lookup("definition_mismatch");
                    (node, Some(false))
                }
            }
            Ok(_) => {
                tracing::debug!(node = %node, schema = %schema, "provider record not confirmed: the schema is not approved there");
                (node, Some(false))
            }
            Err(e) => {
                tracing::debug!(node = %node, schema = %schema, error = %e.message(), "provider could not be asked");
                (node, None)
            }
        }
    }
}

/// The error of a ROUTE_ANY read no provider answered: the last failure, naming the providers
/// asked, or UNAVAILABLE when none could be asked.
fn none_answered(
    schema: &str,
    tried: &[String],
    providers: &[String],
    last: Option<NodeError>,
) -> NodeError {
    match last {
        Some(s) => NodeError::new(
            s.code(),
            format!(
                "no provider of schema '{schema}' answered ({} asked: {}); last error: {}",
                tried.len(),
                tried.join(", "),
                s.message()
            ),
        ),
        None => NodeError::unavailable(format!(
            "no provider of schema '{schema}' can be reached now (known: {})",
            providers.join(", ")
        )),
    }
}

fn not_empty(schema: &str, nodes: Vec<String>) -> Result<Vec<String>, NodeError> {
    if nodes.is_empty() {
        return Err(NodeError::not_found(format!(
            "no node serving schema '{schema}' was found (DHT provider records confirmed by a schema check; this node does not serve it either)"
        )));
    }
    Ok(nodes)
}

/// Validate the routing part of a read: ANY and ALL choose the nodes themselves.
fn check_route(route: i32, target: &str, page_token: &str) -> Result<Route, NodeError> {
    let r = Route::try_from(route).map_err(|_| {
        NodeError::invalid_argument(format!(
            "'route' {route} is not a route (0 ROUTE_DEFAULT, 1 ROUTE_ANY, 2 ROUTE_ALL)"
        ))
    })?;
    if r != Route::Default {
        if !target.is_empty() {
            return Err(NodeError::invalid_argument(
                "give either 'target_node_id' or a 'route' of ROUTE_ANY/ROUTE_ALL, not both",
            ));
        }
        if !page_token.is_empty() {
            return Err(NodeError::invalid_argument(
                "a page token belongs to the node that gave it: continue with 'target_node_id' set to that answer's node id, and no route",
            ));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_to_answer_are_retried() {
        assert!(retryable(Code::Unavailable));
        assert!(retryable(Code::DeadlineExceeded));
        for c in [
            Code::PermissionDenied,
            Code::NotFound,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Internal,
        ] {
            assert!(!retryable(c), "{c:?}");
        }
    }

    #[test]
    fn routes_are_checked() {
        assert_eq!(check_route(0, "x", "t").unwrap(), Route::Default);
        assert_eq!(check_route(1, "", "").unwrap(), Route::Any);
        assert_eq!(check_route(2, "", "").unwrap(), Route::All);
        assert_eq!(
            check_route(1, "12D3Koo", "").unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            check_route(2, "", "tok").unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            check_route(7, "", "").unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn unreachable_members_stay_for_a_while_new_ones_never_join() {
        let looked = |c: &[&str], u: &[&str]| Looked {
            confirmed: c.iter().map(|s| s.to_string()).collect(),
            unreachable: u.iter().map(|s| s.to_string()).collect(),
        };
        let first = Cached::after(None, looked(&["a", "b"], &["x"]));
        // x was never confirmed: an unreachable stranger does not join.
        assert_eq!(first.nodes, ["a", "b"]);
        // b stops answering: it stays (reported failing by ROUTE_ALL), marked since now.
        let second = Cached::after(Some(&first), looked(&["a"], &["b"]));
        assert_eq!(second.nodes, ["a", "b"]);
        assert!(second.unreachable_since.contains_key("b"));
        // Long unreachable: dropped.
        let mut old = second.clone();
        old.unreachable_since.insert(
            "b".into(),
            Instant::now()
                .checked_sub(KEEP_UNREACHABLE + Duration::from_secs(1))
                .unwrap(),
        );
        let third = Cached::after(Some(&old), looked(&["a"], &["b"]));
        assert_eq!(third.nodes, ["a"]);
        // Back and confirmed: a member again, no longer marked.
        let back = Cached::after(Some(&second), looked(&["a", "b"], &[]));
        assert_eq!(back.nodes, ["a", "b"]);
        assert!(back.unreachable_since.is_empty());
    }

    #[test]
    fn the_budget_allows_a_share_of_requests_as_retries() {
        // 20% of requests plus 0 per second: 100 requests allow about 20 retries.
        let b = TpsBudget::new(Duration::from_secs(10), 0, 0.2);
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.withdraw()).count();
        assert!((15..=25).contains(&allowed), "{allowed}");
    }

    /// Routing over a fake link: each test scripts what the nodes answer.
    mod over_a_fake_link {
        use super::*;
        use crate::access::identity::{Identities, TrustPolicy};
        use crate::link::LinkFuture;
        use crate::ops::data::Data;
        use crate::storage::store::Store;
        use fold_proto::v1::{CheckSchemasResponse, Record};
        use fold_proto::wire::{Requester, forward_response};
        use std::sync::atomic::{AtomicUsize, Ordering};

        const ME: &str = "12D3KooWGzBjzYtuhmFRXbBqsCP5Xv6TUgaWbeoGTHYEdRW6HNm3";
        const HASH: &str = "h1";

        fn node(i: u8) -> String {
            format!("12D3KooWPeer{}{}", char::from(b'A' + i), "z".repeat(30))
        }

        /// How a node answers the n-th forward (counted over all nodes).
        type Script = Box<dyn Fn(usize, &str) -> Behave + Send + Sync>;

        enum Behave {
            Answer,
            Fail(Code),
            /// Never answers (until the caller gives up).
            Hang,
        }

        struct FakeLink {
            providers: Vec<String>,
            script: Script,
            calls: Mutex<Vec<String>>,
            count: AtomicUsize,
        }

        impl FakeLink {
            fn new(providers: Vec<String>, script: Script) -> Arc<FakeLink> {
                Arc::new(FakeLink {
                    providers,
                    script,
                    calls: Mutex::new(Vec::new()),
                    count: AtomicUsize::new(0),
                })
            }
            fn calls(&self) -> Vec<String> {
                self.calls.lock().unwrap().clone()
            }
        }

        impl Link for FakeLink {
            fn node_id(&self) -> Option<String> {
                Some(ME.to_string())
            }
            fn ready(&self) -> Result<(), NodeError> {
                Ok(())
            }
            fn forward_timeout(&self) -> Duration {
                Duration::from_secs(5)
            }
            fn routable(&self, _: &str) -> bool {
                true
            }
            fn forward(
                &self,
                target: String,
                op: operation::Kind,
                _: Requester,
                _: Option<Duration>,
            ) -> LinkFuture<forward_response::Result> {
                assert!(matches!(op, operation::Kind::Query(_)));
                let n = self.count.fetch_add(1, Ordering::SeqCst);
                self.calls.lock().unwrap().push(target.clone());
                let behave = (self.script)(n, &target);
                Box::pin(async move {
                    match behave {
                        Behave::Answer => Ok(forward_response::Result::Query(QueryResponse {
                            node_id: target,
                            records: vec![Record::default()],
                            ..Default::default()
                        })),
                        Behave::Fail(code) => Err(NodeError::new(code, format!("{target} failed"))),
                        Behave::Hang => std::future::pending().await,
                    }
                })
            }
            fn providers(&self, _: &str, _: Duration) -> LinkFuture<Vec<String>> {
                let p = self.providers.clone();
                Box::pin(async move { Ok(p) })
            }
            fn check_schemas(
                &self,
                node: &str,
                names: Vec<String>,
                _: Duration,
            ) -> LinkFuture<CheckSchemasResponse> {
                let node_id = node.to_string();
                Box::pin(async move {
                    Ok(CheckSchemasResponse {
                        node_id,
                        definition_hashes: names.iter().map(|n| (n.clone(), HASH.into())).collect(),
                        approved: names,
                    })
                })
            }
            fn on_reconnect(&self, _: Box<dyn Fn(&str) + Send + Sync>) {}
        }

        fn router(link: Arc<FakeLink>, opts: RouteOptions) -> (tempfile::TempDir, Router) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("fold.redb")).unwrap();
            let ids = Identities::new(TrustPolicy::default(), store.clone());
            let metrics =
                NodeMetrics::register(&mut prometheus_client::registry::Registry::default());
            let data = Data::new(
                store,
                ids,
                metrics.clone(),
                crate::ops::subscribe::SubscribeLimits {
                    buffer: 16,
                    max_subscriptions: 4,
                    per_client: 4,
                    max_scans: 4,
                    scans_per_client: 4,
                },
            )
            .unwrap();
            (dir, Router::new(Executor::new(data, link), metrics, opts))
        }

        fn read(route: Route) -> QueryRequest {
            QueryRequest {
                schema: "s".into(),
                definition_hash: HASH.into(),
                route: route as i32,
                ..Default::default()
            }
        }

        const DEADLINE: Option<Duration> = Some(Duration::from_secs(20));

        /// A routed query of the test schema by an anonymous client.
        async fn ask(r: &Router, route: Route) -> Result<QueryResponse, NodeError> {
            r.query(&Principal::LocalClient, read(route), DEADLINE)
                .await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_failed_provider_is_failed_over() {
            // Whichever provider is asked first is unreachable; the next answers.
            let link = FakeLink::new(
                vec![node(0), node(1)],
                Box::new(|n, _| {
                    if n == 0 {
                        Behave::Fail(Code::Unavailable)
                    } else {
                        Behave::Answer
                    }
                }),
            );
            let (_dir, r) = router(link.clone(), RouteOptions::default());
            let q = ask(&r, Route::Any).await.unwrap();
            let calls = link.calls();
            assert_eq!(calls.len(), 2);
            assert_ne!(calls[0], calls[1]);
            assert_eq!(q.node_id, calls[1]);
            assert_eq!(q.attempts, 2);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_refusal_is_answered_not_failed_over() {
            let link = FakeLink::new(
                vec![node(0), node(1)],
                Box::new(|_, _| Behave::Fail(Code::PermissionDenied)),
            );
            let (_dir, r) = router(link.clone(), RouteOptions::default());
            let e = ask(&r, Route::Any).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied);
            assert_eq!(link.calls().len(), 1);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn no_retry_once_the_budget_is_spent() {
            // A budget of no retries at all: one provider is asked, its failure is the answer.
            let link = FakeLink::new(
                vec![node(0), node(1), node(2)],
                Box::new(|_, _| Behave::Fail(Code::Unavailable)),
            );
            let opts = RouteOptions {
                retry_ratio: 0.0,
                retry_min_per_sec: 0,
                ..RouteOptions::default()
            };
            let (_dir, r) = router(link.clone(), opts);
            let e = ask(&r, Route::Any).await.unwrap_err();
            assert_eq!(e.code(), Code::Unavailable);
            assert_eq!(link.calls().len(), 1);
            assert!(e.message().contains("(1 asked:"), "{}", e.message());
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn failover_stops_after_the_most_attempts() {
            let link = FakeLink::new(
                (0..5).map(node).collect(),
                Box::new(|_, _| Behave::Fail(Code::Unavailable)),
            );
            let (_dir, r) = router(link.clone(), RouteOptions::default());
            let e = ask(&r, Route::Any).await.unwrap_err();
            assert_eq!(e.code(), Code::Unavailable);
            assert_eq!(link.calls().len(), MAX_ATTEMPTS);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_slow_provider_is_hedged() {
            // The first provider asked never answers; the hedge to the second does.
            let link = FakeLink::new(
                vec![node(0), node(1)],
                Box::new(|n, _| if n == 0 { Behave::Hang } else { Behave::Answer }),
            );
            let opts = RouteOptions {
                hedge_after: Some(Duration::from_millis(20)),
                ..RouteOptions::default()
            };
            let (_dir, r) = router(link.clone(), opts);
            let q = ask(&r, Route::Any).await.unwrap();
            let calls = link.calls();
            assert_eq!(calls.len(), 2);
            assert_eq!(q.node_id, calls[1]);
            assert_eq!(q.attempts, 2);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn all_reports_a_dead_node_beside_the_answers() {
            let dead = node(1);
            let link = FakeLink::new(vec![node(0), node(1), node(2)], {
                let dead = dead.clone();
                Box::new(move |_, t| {
                    if t == dead {
                        Behave::Fail(Code::Unavailable)
                    } else {
                        Behave::Answer
                    }
                })
            });
            let (_dir, r) = router(link.clone(), RouteOptions::default());
            let q = ask(&r, Route::All).await.unwrap();
            assert_eq!(q.node_id, ME);
            let mut want: Vec<String> = (0..3).map(node).collect();
            want.sort();
            let got: Vec<&str> = q.answers.iter().map(|a| a.node_id.as_str()).collect();
            assert_eq!(got, want);
            for a in &q.answers {
                if a.node_id == dead {
                    assert_eq!(a.code, Code::Unavailable as i32);
                    assert!(a.records.is_empty());
                } else {
                    assert_eq!(a.code, 0, "{}", a.message);
                    assert_eq!(a.records.len(), 1);
                }
            }
        }
    }
}
