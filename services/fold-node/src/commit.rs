//! Group commit: one writer thread gathers concurrent mutations into one redb write
//! transaction and one durable commit (fsync), then answers each caller with its own result.
//!
//! Callers ([`Committer::submit`]) put a [`Job`] (mutations of one schema, applied all or
//! nothing: one for `Mutate`, many for `BatchMutate`) on a bounded queue and wait for the reply.
//! The writer takes the first waiting job, then whatever else is already waiting, up to
//! [`Limits::max_records`] and [`Limits::max_bytes`] per group; it never waits for company, so
//! a lone writer pays one commit and no timer. Each job is applied with check-then-write
//! ([`WriteGroup::apply`]): a refused job (ALREADY_EXISTS, NOT_FOUND) changes nothing and fails
//! alone. The group is committed once, and only then is any caller answered, so an acknowledged
//! write is durable. A storage failure fails the whole group (nothing of it was committed).
//!
//! Why a thread of our own rather than a crate: redb allows one write transaction at a time, so
//! the write side is naturally one owner; what is needed (drain a bounded queue without waiting,
//! cap the group, reply after commit) is a few lines on `tokio::sync::mpsc` and `oneshot`.
//!
//! Jobs are applied in queue order inside the transaction, which is commit order: the
//! per-schema sequence numbers assigned in [`WriteGroup::apply`] are dense and ordered like the
//! commits. Once a group is durable its changes are published to live subscribers
//! ([`ChangeHub`]), in sequence order.
//!
//! Backpressure: when the queue is full, callers wait for room (bounded by their request
//! deadline; the public port's admission layer bounds how many can wait). A caller that gave up
//! (deadline, disconnect) before its job's turn is not written.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::hub::ChangeHub;
use crate::metrics::NodeMetrics;
use crate::schema::Schema;
use crate::store::{ApplyError, Idempotency, MutationError, MutationPlan, Store, StoreError};

/// The written fields of one mutation and their new version ids.
pub type Written = Vec<(String, String)>;

/// Bounds of the write queue and of one group.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Jobs waiting for the writer; more callers wait for room.
    pub queue: usize,
    /// Mutations (records) per group. A job is never split: one larger than this is a group of
    /// its own.
    pub max_records: usize,
    /// Request bytes (encoded `data`) per group, with the same exception.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue: 1024,
            max_records: 4096,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Why a job was not written.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The data refused mutation `index` of the job; nothing of the job was written.
    #[error("mutation {index}: {error}")]
    Refused { index: usize, error: MutationError },
    /// Storage failed for the job's whole group; nothing of it was committed.
    #[error("storage error: {0}")]
    Storage(String),
    /// No answer from the writer: the node is stopping, or the job's group failed
    /// unexpectedly (a panic). Nothing of the job was committed.
    #[error("the write was not committed: the storage writer is stopping or failed")]
    Stopped,
    /// A schema group did not acknowledge the write (no quorum, not the leader, not in time):
    /// the message says whether it may still take effect.
    #[error("{message}")]
    Group { code: tonic::Code, message: String },
}

/// Mutations of one schema, applied all or nothing, and where to send the outcome.
struct Job {
    schema: Arc<Schema>,
    plans: Vec<MutationPlan>,
    bytes: usize,
    idempotency: Option<Idempotency>,
    reply: oneshot::Sender<Result<Committed, JobError>>,
}

/// What a job wrote, and whether it was a replay of an idempotency key applied before (then
/// nothing new was written and `written` is the first application's).
#[derive(Debug)]
pub struct Committed {
    pub written: Vec<Written>,
    /// Each mutation's sequence number, as `written`.
    pub sequences: Vec<u64>,
    pub replayed: bool,
}

/// The submitting side of the group-commit writer. Cheap to clone; the writer thread ends when
/// the last clone is dropped (after writing what is queued).
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
    metrics: Arc<NodeMetrics>,
}

impl Committer {
    /// Start the writer thread on `store`.
    pub fn start(
        store: Store,
        metrics: Arc<NodeMetrics>,
        limits: Limits,
        hub: ChangeHub,
    ) -> std::io::Result<Committer> {
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("fold-commit".into())
            .spawn(move || writer(store, rx, m, limits, hub))?;
        Ok(Committer { tx, metrics })
    }

    /// Write `plans` (mutations of `schema`, already validated) all or nothing, durably, in the
    /// next group. `bytes` is their size, for the group's byte cap. Returns each plan's written
    /// fields once the group's commit is durable.
    pub async fn submit(
        &self,
        schema: Arc<Schema>,
        plans: Vec<MutationPlan>,
        bytes: usize,
    ) -> Result<Vec<Written>, JobError> {
        self.submit_once(schema, plans, bytes, None)
            .await
            .map(|c| c.written)
    }

    /// [`submit`](Committer::submit), at most once per idempotency key (see
    /// `WriteGroup::apply_idempotent`).
    pub async fn submit_once(
        &self,
        schema: Arc<Schema>,
        plans: Vec<MutationPlan>,
        bytes: usize,
        idempotency: Option<Idempotency>,
    ) -> Result<Committed, JobError> {
        let (reply, answer) = oneshot::channel();
        // Waiting for room is the backpressure; it is cancel-safe, and the gauge is raised
        // before the job becomes visible to the writer, which lowers it.
        let permit = self.tx.reserve().await.map_err(|_| JobError::Stopped)?;
        self.metrics.write_queue(1);
        permit.send(Job {
            schema,
            plans,
            bytes,
            idempotency,
            reply,
        });
        answer.await.map_err(|_| JobError::Stopped)?
    }
}

/// The writer thread: take a group, write it, repeat until every [`Committer`] is gone.
fn writer(
    store: Store,
    mut rx: mpsc::Receiver<Job>,
    metrics: Arc<NodeMetrics>,
    limits: Limits,
    hub: ChangeHub,
) {
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None => match rx.blocking_recv() {
                Some(j) => {
                    metrics.write_queue(-1);
                    j
                }
                None => return,
            },
        };
        let (group, next) = take_group(first, &mut rx, &limits);
        metrics.write_queue(-(group.len() as i64 - 1 + i64::from(next.is_some())));
        held = next;
        // A panic while writing fails this group (its callers' reply channels are dropped,
        // which they see as `Stopped`); the writer goes on with the next one.
        let written = std::panic::catch_unwind(AssertUnwindSafe(|| {
            write_group(&store, group, &metrics, &hub);
        }));
        if written.is_err() {
            tracing::error!("a group commit panicked; its requests failed");
        }
    }
}

/// `first` and the jobs already waiting behind it, within the group's caps. A job that would
/// exceed a cap is returned separately, to start the next group. Never waits.
fn take_group(
    first: Job,
    rx: &mut mpsc::Receiver<Job>,
    limits: &Limits,
) -> (Vec<Job>, Option<Job>) {
    let mut records = first.plans.len();
    let mut bytes = first.bytes;
    let mut group = vec![first];
    while records < limits.max_records && bytes < limits.max_bytes {
        let Ok(job) = rx.try_recv() else {
            break;
        };
        if records + job.plans.len() > limits.max_records || bytes + job.bytes > limits.max_bytes {
            return (group, Some(job));
        }
        records += job.plans.len();
        bytes += job.bytes;
        group.push(job);
    }
    (group, None)
}

/// Apply each job of the group in order, commit once, then answer every caller.
fn write_group(store: &Store, jobs: Vec<Job>, metrics: &NodeMetrics, hub: &ChangeHub) {
    let started = Instant::now();
    // Callers that gave up before their turn are not written.
    let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
    if jobs.is_empty() {
        return;
    }
    let records: usize = jobs.iter().map(|j| j.plans.len()).sum();
    let mut results: Vec<Result<Committed, JobError>> = Vec::with_capacity(jobs.len());
    let outcome = (|| -> Result<(), StoreError> {
        let mut group = store.begin_group()?;
        let mut window = None;
        for job in &jobs {
            if let Some(i) = &job.idempotency {
                window = Some(window.unwrap_or(0).max(i.window_ms));
            }
            match group.apply_idempotent(&job.schema, &job.plans, job.idempotency.as_ref()) {
                Ok((applied, replayed)) => results.push(Ok(Committed {
                    written: applied.written,
                    sequences: applied.sequences,
                    replayed,
                })),
                Err(ApplyError::Refused { index, error }) => {
                    results.push(Err(JobError::Refused { index, error }))
                }
                Err(ApplyError::Store(e)) => return Err(e),
            }
        }
        if results.iter().any(|r| matches!(r, Ok(c) if !c.replayed)) {
            // Keys past their window are forgotten a few at a time, with the groups that add
            // new ones.
            if let Some(w) = window {
                group.prune_idempotency(w)?;
            }
            let events = group.commit()?;
            // Durable now: live subscribers may see it.
            hub.publish(events);
        }
        // Otherwise every job was refused and the transaction holds no change: dropping it
        // aborts it, without a commit to wait for.
        Ok(())
    })();
    match outcome {
        Ok(()) => {
            metrics.commit_group(jobs.len(), records, true, started);
            for (job, r) in jobs.into_iter().zip(results) {
                // A caller that has gone since is no longer listening; its write stands.
                let _ = job.reply.send(r);
            }
        }
        Err(e) => {
            metrics.commit_group(jobs.len(), records, false, started);
            tracing::error!(error = %e, requests = jobs.len(), "group commit failed; nothing of it was written");
            let msg = e.to_string();
            for job in jobs {
                let _ = job.reply.send(Err(JobError::Storage(msg.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::KeyFilter;
    use crate::schema;
    use crate::store::MutationKind;
    use prometheus_client::registry::Registry;
    use serde_json::{Value as Json, json};

    fn range_schema() -> Arc<Schema> {
        let f = json!({
            "permission_policy": {"read_policy": {"Distance": 0}, "write_policy": {"Distance": 0}},
            "payment_config": {"base_multiplier": 1.0, "trust_distance_scaling": "None", "min_payment": null},
            "field_type": "Range", "field_mappers": {}
        });
        Arc::new(
            schema::from_json(json!({
                "name": "R", "schema_type": {"Range": {"range_key": "k"}},
                "payment_config": {"base_multiplier": 1.0, "min_payment_threshold": 0},
                "fields": {"k": f.clone(), "v": f}
            }))
            .unwrap(),
        )
    }

    fn plan(kind: MutationKind, key: &str, v: Option<Json>) -> MutationPlan {
        let mut writes = vec![("k".to_string(), json!(key))];
        if let Some(v) = v {
            writes.push(("v".to_string(), v));
        }
        MutationPlan {
            kind,
            range_key: key.into(),
            writes,
            writer: "client:local".into(),
        }
    }

    fn store() -> (tempfile::TempDir, Store, Arc<Schema>) {
        let dir = tempfile::tempdir().unwrap();
        let st = Store::open(&dir.path().join("fold.redb")).unwrap();
        let s = range_schema();
        st.load_schema((*s).clone(), true).unwrap();
        (dir, st, s)
    }

    fn metrics() -> (Registry, Arc<NodeMetrics>) {
        let mut reg = Registry::default();
        let m = NodeMetrics::register(&mut reg);
        (reg, m)
    }

    type Answer = oneshot::Receiver<Result<Committed, JobError>>;

    fn job(schema: &Arc<Schema>, plans: Vec<MutationPlan>, bytes: usize) -> (Job, Answer) {
        let (reply, rx) = oneshot::channel();
        (
            Job {
                schema: schema.clone(),
                plans,
                bytes,
                idempotency: None,
                reply,
            },
            rx,
        )
    }

    fn value(st: &Store, key: &str) -> Option<Json> {
        st.read_values("R", key, &["v".into()]).unwrap().remove(0)
    }

    #[test]
    fn a_group_takes_what_is_waiting_within_the_caps_and_never_waits() {
        let (_d, _st, s) = store();
        let limits = Limits {
            queue: 64,
            max_records: 5,
            max_bytes: 1000,
        };
        let (tx, mut rx) = mpsc::channel(64);
        // A lone job is a group of one, at once.
        let (first, _a) = job(&s, vec![plan(MutationKind::Create, "a", None)], 10);
        let (group, next) = take_group(first, &mut rx, &limits);
        assert_eq!(group.len(), 1);
        assert!(next.is_none());

        let mut answers = Vec::new();
        for n in [1, 2, 3, 1] {
            let (j, a) = job(
                &s,
                (0..n)
                    .map(|i| plan(MutationKind::Create, &format!("k{i}"), None))
                    .collect(),
                10,
            );
            tx.try_send(j).map_err(|_| "queue full").unwrap();
            answers.push(a);
        }
        let (first, _a) = job(&s, vec![plan(MutationKind::Create, "f", None)], 10);
        // 1 + 1 + 2 = 4 records; the job of 3 would exceed the cap of 5 and starts the next
        // group.
        let (group, next) = take_group(first, &mut rx, &limits);
        assert_eq!(
            group.iter().map(|j| j.plans.len()).collect::<Vec<_>>(),
            vec![1, 1, 2]
        );
        let next = next.expect("the job over the cap is held for the next group");
        assert_eq!(next.plans.len(), 3);
        let (group, next) = take_group(next, &mut rx, &limits);
        assert_eq!(
            group.iter().map(|j| j.plans.len()).collect::<Vec<_>>(),
            vec![3, 1]
        );
        assert!(next.is_none());
        // At the cap exactly, the group stops taking.
        for _ in 0..6 {
            let (j, a) = job(&s, vec![plan(MutationKind::Create, "c", None)], 1);
            tx.try_send(j).map_err(|_| "queue full").unwrap();
            answers.push(a);
        }
        let first = rx.try_recv().unwrap();
        let (group, next) = take_group(first, &mut rx, &limits);
        assert_eq!(group.len(), 5);
        assert!(next.is_none());
        let first = rx.try_recv().unwrap();
        let (group, _) = take_group(first, &mut rx, &limits);
        assert_eq!(group.len(), 1);

        // The byte cap, and a job larger than a whole group still goes (alone).
        for _ in 0..3 {
            let (j, a) = job(&s, vec![plan(MutationKind::Create, "b", None)], 400);
            tx.try_send(j).map_err(|_| "queue full").unwrap();
            answers.push(a);
        }
        let (big, _a) = job(&s, vec![plan(MutationKind::Create, "big", None)], 5000);
        let (group, next) = take_group(big, &mut rx, &limits);
        assert_eq!(group.len(), 1);
        assert!(next.is_none());
        let first = rx.try_recv().unwrap();
        let (group, next) = take_group(first, &mut rx, &limits);
        assert_eq!(
            group.len(),
            2,
            "400 + 400 bytes fit in 1000, a third does not"
        );
        let (group, next) = take_group(next.unwrap(), &mut rx, &limits);
        assert_eq!(group.len(), 1);
        assert!(next.is_none());
    }

    #[test]
    fn a_refused_mutation_fails_alone_and_the_group_commits_the_rest() {
        let (_d, st, s) = store();
        let (_reg, m) = metrics();
        let (j1, a1) = job(&s, vec![plan(MutationKind::Create, "a", Some(json!(1)))], 0);
        // Refused: `a` exists by then (written earlier in the same group).
        let (j2, a2) = job(&s, vec![plan(MutationKind::Create, "a", Some(json!(2)))], 0);
        let (j3, a3) = job(
            &s,
            vec![plan(MutationKind::Update, "zz", Some(json!(3)))],
            0,
        );
        // Sees the uncommitted CREATE of the same group.
        let (j4, a4) = job(&s, vec![plan(MutationKind::Update, "a", Some(json!(4)))], 0);
        let (j5, a5) = job(&s, vec![plan(MutationKind::Create, "b", Some(json!(5)))], 0);
        write_group(&st, vec![j1, j2, j3, j4, j5], &m, &ChangeHub::new(16));
        let ok = |a: Answer| a.blocking_recv().unwrap().map(|c| c.written);
        assert_eq!(ok(a1).unwrap()[0].len(), 2);
        assert!(matches!(
            ok(a2),
            Err(JobError::Refused {
                index: 0,
                error: MutationError::AlreadyExists { .. }
            })
        ));
        assert!(matches!(
            ok(a3),
            Err(JobError::Refused {
                index: 0,
                error: MutationError::Missing(_)
            })
        ));
        assert_eq!(ok(a4).unwrap()[0].len(), 1);
        ok(a5).unwrap();
        assert_eq!(value(&st, "a"), Some(json!(4)));
        assert_eq!(value(&st, "b"), Some(json!(5)));
        assert_eq!(value(&st, "zz"), None);
        let h = st.history("R", "v", "a", 0).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].prev.as_deref(), Some(h[1].id.as_str()));
    }

    #[test]
    fn a_batch_is_all_or_nothing_inside_a_group() {
        let (_d, st, s) = store();
        let (_reg, m) = metrics();
        let (before, a0) = job(&s, vec![plan(MutationKind::Create, "c", Some(json!(0)))], 0);
        write_group(&st, vec![before], &m, &ChangeHub::new(16));
        a0.blocking_recv().unwrap().unwrap();

        let (single, a1) = job(&s, vec![plan(MutationKind::Create, "e", Some(json!(1)))], 0);
        // Record 2 collides with `c`: the whole batch is refused and writes nothing.
        let (batch, a2) = job(
            &s,
            vec![
                plan(MutationKind::Create, "d", Some(json!(2))),
                plan(MutationKind::Update, "d", Some(json!(3))),
                plan(MutationKind::Create, "c", Some(json!(4))),
            ],
            0,
        );
        // A batch that depends on its own earlier records.
        let (chain, a3) = job(
            &s,
            vec![
                plan(MutationKind::Create, "x", Some(json!(1))),
                plan(MutationKind::Update, "x", Some(json!(2))),
                plan(MutationKind::Delete, "x", Some(Json::Null)),
                plan(MutationKind::Create, "x", Some(json!(3))),
            ],
            0,
        );
        let (after, a4) = job(&s, vec![plan(MutationKind::Create, "f", Some(json!(5)))], 0);
        write_group(
            &st,
            vec![single, batch, chain, after],
            &m,
            &ChangeHub::new(16),
        );
        a1.blocking_recv().unwrap().unwrap();
        match a2.blocking_recv().unwrap() {
            Err(JobError::Refused {
                index: 2,
                error: MutationError::AlreadyExists { field, .. },
            }) => assert_eq!(field, "v"),
            other => panic!("batch should be refused at record 2: {other:?}"),
        }
        assert_eq!(a3.blocking_recv().unwrap().unwrap().written.len(), 4);
        a4.blocking_recv().unwrap().unwrap();
        assert_eq!(value(&st, "c"), Some(json!(0)));
        assert_eq!(value(&st, "d"), None);
        assert!(st.history("R", "v", "d", 0).unwrap().is_empty());
        assert_eq!(value(&st, "x"), Some(json!(3)));
        let h = st.history("R", "v", "x", 0).unwrap();
        assert_eq!(h.len(), 4);
        assert!(h[1].deleted);
        for w in h.windows(2) {
            assert_eq!(w[0].prev.as_deref(), Some(w[1].id.as_str()));
        }
        let rows = st.range_rows("R", "k", &KeyFilter::All).unwrap();
        assert_eq!(rows, vec!["c", "e", "f", "x"]);
    }

    #[test]
    fn callers_that_gave_up_are_not_written() {
        let (_d, st, s) = store();
        let (_reg, m) = metrics();
        let (gone, a) = job(&s, vec![plan(MutationKind::Create, "g", Some(json!(1)))], 0);
        drop(a);
        let (kept, b) = job(&s, vec![plan(MutationKind::Create, "h", Some(json!(1)))], 0);
        write_group(&st, vec![gone, kept], &m, &ChangeHub::new(16));
        b.blocking_recv().unwrap().unwrap();
        assert_eq!(value(&st, "g"), None);
        assert_eq!(value(&st, "h"), Some(json!(1)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submissions_each_get_their_own_answer() {
        let (_d, st, s) = store();
        let (reg, m) = metrics();
        let c = Committer::start(st.clone(), m, Limits::default(), ChangeHub::new(16)).unwrap();
        let mut tasks = Vec::new();
        for i in 0..64 {
            let c = c.clone();
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                // Every fourth is an UPDATE of a record that never exists.
                let p = if i % 4 == 3 {
                    plan(MutationKind::Update, &format!("none{i}"), Some(json!(i)))
                } else {
                    plan(MutationKind::Create, &format!("k{i:02}"), Some(json!(i)))
                };
                (i, c.submit(s, vec![p], 16).await)
            }));
        }
        for t in tasks {
            let (i, r) = t.await.unwrap();
            if i % 4 == 3 {
                assert!(
                    matches!(r, Err(JobError::Refused { index: 0, .. })),
                    "{i}: {r:?}"
                );
            } else {
                assert_eq!(r.unwrap()[0].len(), 2, "{i}");
            }
        }
        assert_eq!(st.range_rows("R", "k", &KeyFilter::All).unwrap().len(), 48);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        let sample = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        };
        assert_eq!(sample("fold_commit_group_requests_sum"), Some(64.0));
        let groups = sample("fold_commit_group_requests_count").unwrap();
        assert!((1.0..=64.0).contains(&groups), "{groups} groups");
        assert_eq!(sample("fold_write_queue_depth"), Some(0.0));
    }
}
