//! `FoldNode.Subscribe`: the changes of one schema, catch-up from the change log and then live.
//!
//! Every committed mutation has a dense per-schema sequence number and a change log entry
//! (store.rs). The log is the only source of what a subscriber receives; what is live is only
//! *that* something new was committed: the group-commit writer (and a replica's applier)
//! announce each durable group's new head per schema to the [`ChangeHub`] (hub.rs: a small
//! `tokio::sync::broadcast` ring of sequence numbers per schema, and the latest head). No change
//! content is held in memory for subscribers, whatever their number or speed. A subscription:
//!
//! 1. registers with the hub (before reading anything, so no commit from then on can go
//!    unnoticed), checks `from_sequence` against the log's bounds (OUT_OF_RANGE when the changes
//!    after it are no longer kept, naming the oldest kept);
//! 2. catches up from the change log in pages, at the subscriber's pace;
//! 3. goes live: on each announcement (or when it missed some: any is enough) it reads the log
//!    after the last sequence it sent, up to the head. Reading strictly after the last sequence
//!    sent is what makes the hand-over exact: nothing is skipped, nothing sent twice.
//!
//! Live, a subscriber that does not keep up falls behind the head: when a send to it has to wait
//! while the schema's head is more than `--subscription-buffer` changes past what it was sent,
//! the stream ends with RESOURCE_EXHAUSTED saying from which sequence to resume. Announcing never
//! waits for subscribers, so a slow subscriber costs the node nothing but its own task. Every
//! second a progress message carries the last sequence considered and the head.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use fold_proto::json::json_to_value;
use fold_proto::v1::{
    Change, ChangedField, MutationType, Progress, SubscribeResponse, subscribe_response,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::ops::slots::ClientSlot;
use tonic::Status;

use crate::error::{NodeError, is_callee_failure};

use crate::link::mesh::MeshLink;
use crate::metrics::NodeMetrics;
use crate::model::filter::KeyFilter;
use crate::storage::hub::{ChangeHub, Listener};
use crate::storage::schema::Schema;
use crate::storage::store::{ChangeEvent, MutationKind, Store};

/// Changes read from the log per step of a catch-up.
const CATCH_UP_PAGE: usize = 256;
/// Messages waiting in a stream between the subscription task and the transport.
const STREAM_QUEUE: usize = 16;
/// How often a progress message is sent.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often a blocked live send checks whether its subscriber fell too far behind.
const OVERFLOW_CHECK: Duration = Duration::from_millis(50);

/// Bounds of subscriptions.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeLimits {
    /// Live changes one subscriber may be behind the head before its stream is cut.
    pub buffer: usize,
    /// Open subscriptions at once; more are RESOURCE_EXHAUSTED.
    pub max_subscriptions: usize,
    /// Open subscriptions of one client identity at once.
    pub per_client: usize,
    /// Scans running at once, and of one client identity.
    pub max_scans: usize,
    pub scans_per_client: usize,
}

impl Default for SubscribeLimits {
    fn default() -> Self {
        SubscribeLimits {
            buffer: 4096,
            max_subscriptions: 256,
            per_client: 64,
            max_scans: 64,
            scans_per_client: 8,
        }
    }
}

/// What one subscription selects, already checked against the schema and the permissions.
pub struct Selection {
    pub schema: Arc<Schema>,
    /// The fields to send, in schema order.
    pub fields: Vec<String>,
    pub filter: KeyFilter,
    pub json_values: bool,
}

impl Selection {
    /// The change as this subscription sees it: `None` when it selects nothing of it.
    pub(crate) fn view(&self, e: &ChangeEvent) -> Option<Change> {
        if self.schema.range_key().is_some() && !self.filter.matches(&e.range_key) {
            return None;
        }
        let mut fields = Vec::new();
        for (f, v) in &e.versions {
            if self.fields.contains(f) {
                let (value, value_json) = if self.json_values {
                    (None, v.value.to_string())
                } else {
                    (Some(json_to_value(&v.value)), String::new())
                };
                fields.push(ChangedField {
                    field: f.clone(),
                    version_id: v.id.clone(),
                    previous_version_id: v.prev.clone().unwrap_or_default(),
                    deleted: v.deleted,
                    value,
                    value_json,
                });
            }
        }
        if fields.is_empty() {
            return None;
        }
        let first = e.versions.first().map(|(_, v)| v);
        let ms = first.map_or(0, |v| v.written_at_ms);
        Some(Change {
            sequence: e.sequence,
            range_key: e.range_key.clone(),
            mutation_type: match e.kind() {
                MutationKind::Create => MutationType::Create,
                MutationKind::Update => MutationType::Update,
                MutationKind::Delete => MutationType::Delete,
            } as i32,
            writer: first.map(|v| v.writer.clone()).unwrap_or_default(),
            written_at: Some(prost_types::Timestamp {
                seconds: (ms / 1000) as i64,
                nanos: ((ms % 1000) * 1_000_000) as i32,
            }),
            fields,
        })
    }
}

/// The response stream of one subscription: the queued messages, unless the node ended the
/// stream with a status, which then goes first (queued changes are dropped: the subscriber
/// resumes from the last sequence it received).
pub struct SubscriptionStream {
    rx: mpsc::Receiver<SubscribeResponse>,
    end: Option<oneshot::Receiver<NodeError>>,
    done: bool,
    metrics: Arc<NodeMetrics>,
    _permit: ClientSlot,
}

impl Drop for SubscriptionStream {
    fn drop(&mut self) {
        self.metrics.subscribers(-1);
    }
}

impl futures::Stream for SubscriptionStream {
    type Item = Result<SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(end) = self.end.as_mut()
            && let Poll::Ready(r) = Pin::new(end).poll(cx)
        {
            self.end = None;
            if let Ok(status) = r {
                self.done = true;
                return Poll::Ready(Some(Err(status.into())));
            }
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(m)) => Poll::Ready(Some(Ok(m))),
            Poll::Ready(None) => {
                // The task ended; a status it sent last is still to be delivered.
                if let Some(end) = self.end.as_mut()
                    && let Ok(status) = end.try_recv()
                {
                    self.done = true;
                    return Poll::Ready(Some(Err(status.into())));
                }
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Why a subscription task stopped.
enum Stop {
    /// The subscriber went away.
    Gone,
    /// End the stream with this error (sent as its status).
    Error(NodeError),
}

impl From<NodeError> for Stop {
    fn from(s: NodeError) -> Self {
        Stop::Error(s)
    }
}

struct Task {
    store: Store,
    metrics: Arc<NodeMetrics>,
    hub: ChangeHub,
    sel: Selection,
    out: mpsc::Sender<SubscribeResponse>,
    /// The last sequence sent or skipped.
    last: u64,
    /// The schema's latest announced head.
    head: Arc<AtomicU64>,
    ticker: tokio::time::Interval,
    /// Re-checks the subscriber's permissions (trust may change while it is subscribed).
    recheck: Box<dyn Fn() -> Result<(), NodeError> + Send + Sync>,
    /// This node's id, named in progress messages (empty while unknown).
    node_id: String,
}

/// Start a subscription: `listener` must have been registered (ChangeHub::listen) before the
/// caller checked `from` against the log's bounds.
#[allow(clippy::too_many_arguments)]
pub fn start(
    store: Store,
    metrics: Arc<NodeMetrics>,
    hub: ChangeHub,
    sel: Selection,
    from: u64,
    listener: Listener,
    permit: ClientSlot,
    recheck: Box<dyn Fn() -> Result<(), NodeError> + Send + Sync>,
    node_id: String,
) -> SubscriptionStream {
    let (stream, out, end_tx) = stream(metrics.clone(), permit);
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let task = Task {
        store,
        metrics: metrics.clone(),
        hub,
        sel,
        out,
        last: from,
        head: listener.head,
        ticker,
        recheck,
        node_id,
    };
    tokio::spawn(async move {
        if let Err(Stop::Error(s)) = task.run(listener.rx).await {
            let _ = end_tx.send(s);
        }
    });
    stream
}

/// A response stream and the ends its task feeds: messages, and the status that ends it.
fn stream(
    metrics: Arc<NodeMetrics>,
    permit: ClientSlot,
) -> (
    SubscriptionStream,
    mpsc::Sender<SubscribeResponse>,
    oneshot::Sender<NodeError>,
) {
    let (out, out_rx) = mpsc::channel(STREAM_QUEUE);
    let (end_tx, end_rx) = oneshot::channel();
    metrics.subscribers(1);
    (
        SubscriptionStream {
            rx: out_rx,
            end: Some(end_rx),
            done: false,
            metrics,
            _permit: permit,
        },
        out,
        end_tx,
    )
}

impl Task {
    async fn run(mut self, rx: broadcast::Receiver<u64>) -> Result<(), Stop> {
        let mut stopping = self.hub.stopping();
        if *stopping.borrow_and_update() {
            return Err(self.stop());
        }
        tokio::select! {
            r = self.serve(rx) => r,
            _ = stopping.changed() => Err(self.stop()),
        }
    }

    fn stop(&self) -> Stop {
        Stop::Error(NodeError::unavailable(format!(
            "the node is stopping; subscribe again (here once it is back, or elsewhere) with from_sequence = {} to resume",
            self.last
        )))
    }

    async fn serve(&mut self, mut rx: broadcast::Receiver<u64>) -> Result<(), Stop> {
        // Catch-up, at the subscriber's pace: commits meanwhile are announced on `rx`.
        self.read_log(false).await?;
        self.progress().await?;
        self.ticker.reset();
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    // Something was committed (a missed announcement says the same): send what
                    // the log has after the last sequence sent.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.read_log(true).await?
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Stop::Error(NodeError::unavailable(
                            "the node is stopping; resume the subscription from the last sequence received",
                        )));
                    }
                },
                _ = self.ticker.tick() => self.progress().await?,
                _ = self.out.closed() => return Err(Stop::Gone),
            }
        }
    }

    fn overflow(&self) -> Stop {
        self.metrics.subscription_end("overflow");
        Stop::Error(NodeError::resource_exhausted(format!(
            "this subscriber fell more than {} changes behind the head of schema '{}' (the node's --subscription-buffer) and was cut off; read faster, or subscribe again with from_sequence = {} (the last sequence considered) to resume",
            self.hub.buffer(),
            self.sel.schema.name,
            self.last
        )))
    }

    /// Send everything in the log after `last`, up to the head. `live`: the subscriber is
    /// expected to keep up (a send that waits while it is too far behind ends the stream).
    async fn read_log(&mut self, live: bool) -> Result<(), Stop> {
        loop {
            let page = self.read_after(self.last, CATCH_UP_PAGE).await?;
            let n = page.len();
            for e in page {
                self.emit(&e, live).await?;
            }
            if n < CATCH_UP_PAGE {
                return Ok(());
            }
            if self.ticker_ready() {
                self.progress().await?;
            }
        }
    }

    fn ticker_ready(&mut self) -> bool {
        use futures::FutureExt;
        self.ticker.tick().now_or_never().is_some()
    }

    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<ChangeEvent>, Stop> {
        let store = self.store.clone();
        let schema = self.sel.schema.name.clone();
        let (page, bounds) = tokio::task::spawn_blocking(move || {
            let b = store.log_bounds(&schema)?;
            let page = store.changes_after(&schema, after, limit)?;
            Ok::<_, crate::storage::store::StoreError>((page, b))
        })
        .await
        .map_err(|e| NodeError::internal(format!("storage task failed: {e}")))?
        .map_err(NodeError::from)?;
        if after + 1 < bounds.oldest {
            // Pruned while this subscriber was behind.
            self.metrics.subscription_end("out_of_range");
            return Err(Stop::Error(out_of_range(
                &self.sel.schema.name,
                after,
                bounds.oldest,
            )));
        }
        if let Some(first) = page.first()
            && first.sequence != after + 1
        {
            return Err(Stop::Error(NodeError::internal(format!(
                "change {} of schema '{}' is missing from the change log",
                after + 1,
                self.sel.schema.name
            ))));
        }
        Ok(page)
    }

    /// Send one change (or skip it when the subscription does not select it).
    async fn emit(&mut self, e: &ChangeEvent, live: bool) -> Result<(), Stop> {
        if e.sequence <= self.last {
            return Ok(());
        }
        if let Some(change) = self.sel.view(e) {
            let msg = SubscribeResponse {
                event: Some(subscribe_response::Event::Change(change)),
            };
            self.send(msg, live).await?;
            self.metrics.subscription_sent(1);
        }
        self.last = e.sequence;
        Ok(())
    }

    async fn send(&mut self, msg: SubscribeResponse, live: bool) -> Result<(), Stop> {
        if !live {
            let permit = self.out.reserve().await.map_err(|_| Stop::Gone)?;
            permit.send(msg);
            return Ok(());
        }
        loop {
            tokio::select! {
                p = self.out.reserve() => {
                    let permit = p.map_err(|_| Stop::Gone)?;
                    permit.send(msg);
                    return Ok(());
                }
                _ = tokio::time::sleep(OVERFLOW_CHECK) => {
                    let head = self.head.load(Ordering::Acquire);
                    if head.saturating_sub(self.last) > self.hub.buffer() as u64 {
                        return Err(self.overflow());
                    }
                }
            }
        }
    }

    async fn progress(&mut self) -> Result<(), Stop> {
        (self.recheck)()?;
        let store = self.store.clone();
        let schema = self.sel.schema.name.clone();
        let b = tokio::task::spawn_blocking(move || store.log_bounds(&schema))
            .await
            .map_err(|e| NodeError::internal(format!("storage task failed: {e}")))?
            .map_err(NodeError::from)?;
        let msg = SubscribeResponse {
            event: Some(subscribe_response::Event::Progress(Progress {
                sequence: self.last,
                head_sequence: b.head,
                oldest_sequence: b.oldest,
                node_id: self.node_id.clone(),
            })),
        };
        // Progress is best effort: a full queue already tells the subscriber plenty.
        match self.out.try_send(msg) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Stop::Gone),
        }
    }
}

/// The refusal of a subscription from `from` when the log keeps only `oldest` onwards.
pub fn out_of_range(schema: &str, from: u64, oldest: u64) -> NodeError {
    NodeError::out_of_range(format!(
        "the changes of schema '{schema}' after sequence {from} are no longer kept: the oldest kept is {oldest} (--change-log-retention); read the current data with Query (or Scan), then subscribe from its head"
    ))
}

/// Resolves the requester of a remote subscription again (its distance here, now).
pub type Resolve =
    Box<dyn Fn() -> Result<fold_proto::wire::Requester, NodeError> + Send + Sync + 'static>;

/// Changes asked for per request of a remote subscription.
const REMOTE_PAGE: u32 = 256;
/// How long the other node may wait for a new change before answering with none (so a progress
/// message follows at least about every second).
const REMOTE_WAIT_MS: u32 = 1000;
/// The deadline of one request of a remote subscription.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between attempts after transient failures.
const REMOTE_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A subscription to a schema of another node (`SubscribeRequest.target_node_id`): repeated
/// forwarded `changes` requests, each after the last change received, with the requester at its
/// path distance there (the other node checks its fields and filter as for a local subscription).
/// The next request goes out only once the previous answer's changes are queued for the
/// subscriber, so a slow subscriber slows only its own requests. Transient failures (the other
/// node or a link away, a partition) are retried with backoff, resuming after the last sequence
/// sent; other refusals end the stream with the other node's status. The first request is made
/// before the stream starts, so a bad request fails the call itself. The requester is resolved
/// again (`resolve`) before every request, so trust lowered here (`deny`) ends the stream.
pub async fn start_remote(
    mesh: MeshLink,
    hub: ChangeHub,
    metrics: Arc<NodeMetrics>,
    req: fold_proto::v1::SubscribeRequest,
    resolve: Resolve,
    permit: ClientSlot,
) -> Result<SubscriptionStream, NodeError> {
    let target = req.target_node_id.clone();
    let json_values = req.json_values;
    let from = req.from_sequence;
    let ask = move |after: u64, wait_ms: u32| changes_request(&req, after, wait_ms);
    let first = crate::replication::follow::fetch_changes(
        &mesh,
        &target,
        ask(from, 0),
        resolve()?,
        REMOTE_TIMEOUT,
    )
    .await?;
    let (stream, out, end_tx) = stream(metrics.clone(), permit);
    let mut stopping = hub.stopping();
    tokio::spawn(async move {
        let mut last = from;
        let mut answer = Some(first);
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut resp = match answer.take() {
                Some(r) => r,
                None => {
                    let req = ask(last, REMOTE_WAIT_MS);
                    let wait = Waits {
                        out: &out,
                        stopping: &mut stopping,
                    };
                    match fetch_next(&mesh, &target, req, &resolve, wait, &mut backoff, last).await
                    {
                        Step::Answer(r) => r,
                        Step::Retry => continue,
                        Step::End(e) => {
                            if let Some(e) = e {
                                let _ = end_tx.send(e);
                            }
                            return;
                        }
                    }
                }
            };
            backoff = Duration::from_millis(200);
            match send_changes(
                &out,
                &metrics,
                std::mem::take(&mut resp.changes),
                &mut last,
                json_values,
                &target,
            )
            .await
            {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    let _ = end_tx.send(e);
                    return;
                }
            }
            last = last.max(resp.through_sequence);
            if let Err(mpsc::error::TrySendError::Closed(_)) =
                out.try_send(remote_progress(last, &resp, &target))
            {
                return;
            }
        }
    });
    Ok(stream)
}

/// The `changes` request of a remote subscription: the changes after `after`, waiting up to
/// `wait_ms` for one.
fn changes_request(
    req: &fold_proto::v1::SubscribeRequest,
    after: u64,
    wait_ms: u32,
) -> fold_proto::wire::ChangesRequest {
    fold_proto::wire::ChangesRequest {
        schema: req.schema.clone(),
        after_sequence: after,
        limit: REMOTE_PAGE,
        wait_ms,
        fields: req.fields.clone(),
        filter: req.filter.clone(),
        readable_only: req.fields.is_empty(),
        ..Default::default()
    }
}

/// The progress message after an answer of the other node, through `last`.
fn remote_progress(
    last: u64,
    resp: &fold_proto::wire::ChangesResponse,
    target: &str,
) -> SubscribeResponse {
    SubscribeResponse {
        event: Some(subscribe_response::Event::Progress(Progress {
            sequence: last,
            head_sequence: resp.head_sequence,
            oldest_sequence: resp.oldest_sequence,
            node_id: target.to_string(),
        })),
    }
}

/// What a remote subscription waits on besides the other node: its subscriber going away, and
/// the node stopping.
struct Waits<'a> {
    out: &'a mpsc::Sender<SubscribeResponse>,
    stopping: &'a mut tokio::sync::watch::Receiver<bool>,
}

/// The next step of a remote subscription.
enum Step {
    Answer(fold_proto::wire::ChangesResponse),
    /// A transient failure, waited out: ask again.
    Retry,
    /// The subscription ends (with this error for the subscriber, if any).
    End(Option<NodeError>),
}

/// The refusal of a remote subscription cut short by the node stopping.
fn stopped(last: u64) -> NodeError {
    NodeError::unavailable(format!(
        "the node is stopping; subscribe again with from_sequence = {last} to resume"
    ))
}

/// Ask the other node for the changes `req` names (the requester resolved again first). A
/// transient failure is waited out with `backoff` (doubled) and answered `Retry`.
async fn fetch_next(
    mesh: &MeshLink,
    target: &str,
    req: fold_proto::wire::ChangesRequest,
    resolve: &Resolve,
    wait: Waits<'_>,
    backoff: &mut Duration,
    last: u64,
) -> Step {
    let requester = match resolve() {
        Ok(r) => r,
        Err(s) => return Step::End(Some(s)),
    };
    let r = tokio::select! {
        r = crate::replication::follow::fetch_changes(mesh, target, req, requester, REMOTE_TIMEOUT) => r,
        _ = wait.out.closed() => return Step::End(None),
        _ = wait.stopping.changed() => return Step::End(Some(stopped(last))),
    };
    match r {
        Ok(r) => Step::Answer(r),
        Err(s) if transient(s.code()) => {
            tracing::debug!(node = %target, error = %s, "remote subscription: retrying");
            tokio::select! {
                _ = tokio::time::sleep(*backoff) => {}
                _ = wait.out.closed() => return Step::End(None),
                _ = wait.stopping.changed() => return Step::End(Some(stopped(last))),
            }
            *backoff = (*backoff * 2).min(REMOTE_MAX_BACKOFF);
            Step::Retry
        }
        Err(s) => Step::End(Some(s)),
    }
}

/// Queue the changes of one answer after `last` for the subscriber, as JSON text or as values,
/// moving `last` on. False when the subscriber went away.
async fn send_changes(
    out: &mpsc::Sender<SubscribeResponse>,
    metrics: &NodeMetrics,
    changes: Vec<fold_proto::v1::Change>,
    last: &mut u64,
    json_values: bool,
    target: &str,
) -> Result<bool, NodeError> {
    for mut c in changes {
        if c.sequence <= *last {
            continue;
        }
        if !json_values {
            for f in &mut c.fields {
                let v: serde_json::Value = serde_json::from_str(&f.value_json).map_err(|e| {
                    NodeError::internal(format!(
                        "node {target} sent change {} with a value that is not JSON: {e}",
                        c.sequence
                    ))
                })?;
                f.value = Some(json_to_value(&v));
                f.value_json.clear();
            }
        }
        *last = c.sequence;
        let msg = SubscribeResponse {
            event: Some(subscribe_response::Event::Change(c)),
        };
        let Ok(permit) = out.reserve().await else {
            return Ok(false);
        };
        permit.send(msg);
        metrics.subscription_sent(1);
    }
    Ok(true)
}

/// Failures a remote subscription retries: the other node, its link or the path is away for now
/// ([`is_callee_failure`]). Wider than that on purpose: ABORTED (a change sent in parts
/// changed meanwhile) and RESOURCE_EXHAUSTED (the other node is busy) pass too, so the subscription
/// resumes rather than ends.
fn transient(code: tonic::Code) -> bool {
    is_callee_failure(code) || matches!(code, tonic::Code::Aborted | tonic::Code::ResourceExhausted)
}
