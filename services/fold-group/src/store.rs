//! Raft storage in redb: log, vote, committed/purged ids, applied state and snapshot of one group.
//!
//! This implements openraft's v1 `RaftStorage` and hands it to openraft through
//! `storage::Adaptor`. We chose v1 over the v2 `RaftLogStorage` + `RaftStateMachine` pair because
//! it is less code for the same guarantees here: one type over one redb handle, no flush
//! callbacks to thread through (each append is an fsynced redb commit before it returns, which is
//! what v2's callback would signal), and the log and the state machine share a database anyway.
//!
//! Layout, per group `g` (so several groups share one file):
//! - `fold-group/g/log`: log index → JSON entry;
//! - `fold-group/g/meta`: `vote`, `committed`, `purged`, `applied`, `membership`,
//!   `snapshot_meta` (JSON) and `snapshot_data` (the state machine's bytes).
//!
//! redb is blocking, so every storage call runs on tokio's blocking pool.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{
    LogState, RaftLogReader, RaftSnapshotBuilder, RaftStorage, Snapshot, SnapshotMeta,
};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase as _, ReadableTable,
    ReadableTableMetadata as _, TableDefinition, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{GroupId, GroupStateMachine, Node, NodeId, Reply, TypeConfig};

type StoreResult<T> = Result<T, StorageError<NodeId>>;

/// Why a storage step failed (wrapped into openraft's `StorageError`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("redb: {0}")]
    Redb(String),
    /// A stored record did not decode.
    #[error("decode: {0}")]
    Decode(String),
    /// The state machine failed.
    #[error("state machine: {0}")]
    StateMachine(String),
    /// The blocking task did not finish.
    #[error("blocking task: {0}")]
    Join(String),
}

macro_rules! redb_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.to_string())
            }
        }
    )*};
}
redb_err!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

struct Inner<S> {
    db: Arc<Database>,
    log_table: String,
    meta_table: String,
    sm: Arc<S>,
    snapshot_seq: AtomicU64,
}

impl<S> Inner<S> {
    fn log_def(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.log_table)
    }

    fn meta_def(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.meta_table)
    }

    fn write_txn(&self, durability: Durability) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(durability)?;
        Ok(txn)
    }

    fn get_meta<T: DeserializeOwned>(
        &self,
        txn: &ReadTransaction,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let table = match txn.open_table(self.meta_def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match table.get(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| StoreError::Decode(e.to_string())),
        }
    }

    fn get_meta_in_write<T: DeserializeOwned>(
        &self,
        txn: &WriteTransaction,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let table = txn.open_table(self.meta_def())?;
        let value = table.get(key)?;
        match value {
            None => Ok(None),
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| StoreError::Decode(e.to_string())),
        }
    }

    fn put_meta<T: Serialize>(
        &self,
        txn: &WriteTransaction,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Decode(e.to_string()))?;
        txn.open_table(self.meta_def())?
            .insert(key, bytes.as_slice())?;
        Ok(())
    }
}

/// Raft storage of one group member in a shared redb database.
pub struct GroupStore<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for GroupStore<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: GroupStateMachine> GroupStore<S> {
    /// The storage of `group` in `db`, with `sm` as its state machine. Creates nothing until the
    /// first write; reopening the same database finds the log, vote and state again.
    pub fn new(db: Arc<Database>, group: &GroupId, sm: Arc<S>) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                log_table: format!("fold-group/{group}/log"),
                meta_table: format!("fold-group/{group}/meta"),
                sm,
                snapshot_seq: AtomicU64::new(0),
            }),
        }
    }

    /// The database this store lives in.
    pub fn database(&self) -> &Arc<Database> {
        &self.inner.db
    }

    /// The state machine.
    pub fn state_machine(&self) -> &Arc<S> {
        &self.inner.sm
    }

    /// The log entries stored now (count), for checks and status.
    pub fn log_len(&self) -> Result<u64, StoreError> {
        let txn = self.inner.db.begin_read()?;
        match txn.open_table(self.inner.log_def()) {
            Ok(t) => Ok(t.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner<S>) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Join(e.to_string()))?
    }
}

fn io<E, M>(make: M) -> impl FnOnce(E) -> StorageError<NodeId>
where
    E: std::error::Error + 'static,
    M: FnOnce(AnyError) -> StorageIOError<NodeId>,
{
    move |e| StorageError::IO {
        source: make(AnyError::from(&e)),
    }
}

fn sm_err(e: crate::SmError) -> StoreError {
    StoreError::StateMachine(e.to_string())
}

fn encode_entry(entry: &Entry<TypeConfig>) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(entry).map_err(|e| StoreError::Decode(e.to_string()))
}

fn owned_bound(b: Bound<&u64>) -> Bound<u64> {
    match b {
        Bound::Included(x) => Bound::Included(*x),
        Bound::Excluded(x) => Bound::Excluded(*x),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl<S: GroupStateMachine> RaftLogReader<TypeConfig> for GroupStore<S> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let range = (
            owned_bound(range.start_bound()),
            owned_bound(range.end_bound()),
        );
        self.blocking(move |inner| {
            let txn = inner.db.begin_read()?;
            let table = match txn.open_table(inner.log_def()) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for row in table.range::<u64>(range)? {
                let (_, v) = row?;
                out.push(
                    serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Decode(e.to_string()))?,
                );
            }
            Ok(out)
        })
        .await
        .map_err(io(StorageIOError::read_logs))
    }
}

impl<S: GroupStateMachine> RaftSnapshotBuilder<TypeConfig> for GroupStore<S> {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let seq = self.inner.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let (meta, data) = self
            .blocking(move |inner| {
                // One redb read transaction: the state and its applied id are one consistent view.
                let read = inner.db.begin_read()?;
                let applied: Option<LogId<NodeId>> = inner.get_meta(&read, APPLIED)?.flatten();
                let membership: StoredMembership<NodeId, Node> =
                    inner.get_meta(&read, MEMBERSHIP)?.unwrap_or_default();
                let data = inner.sm.snapshot(&read).map_err(sm_err)?;
                drop(read);
                let snapshot_id = match &applied {
                    Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, seq),
                    None => format!("0-0-{seq}"),
                };
                let meta = SnapshotMeta {
                    last_log_id: applied,
                    last_membership: membership,
                    snapshot_id,
                };
                let txn = inner.write_txn(Durability::Immediate)?;
                let current: Option<SnapshotMeta<NodeId, Node>> =
                    inner.get_meta_in_write(&txn, SNAPSHOT_META)?;
                // A snapshot installed meanwhile from the leader may be newer: keep the newest.
                if current
                    .as_ref()
                    .is_none_or(|c| c.last_log_id <= meta.last_log_id)
                {
                    inner.put_meta(&txn, SNAPSHOT_META, &meta)?;
                    txn.open_table(inner.meta_def())?
                        .insert(SNAPSHOT_DATA, data.as_slice())?;
                }
                txn.commit()?;
                Ok((meta, data))
            })
            .await
            .map_err(io(|e| StorageIOError::write_snapshot(None, e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl<S: GroupStateMachine> RaftStorage<TypeConfig> for GroupStore<S> {
    type LogReader = Self;
    type SnapshotBuilder = Self;

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        let vote = *vote;
        self.blocking(move |inner| {
            let txn = inner.write_txn(Durability::Immediate)?;
            inner.put_meta(&txn, VOTE, &vote)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(io(StorageIOError::write_vote))
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        self.blocking(|inner| inner.get_meta(&inner.db.begin_read()?, VOTE))
            .await
            .map_err(io(StorageIOError::read_vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        // A hint that speeds up restart; the applied state is durable on its own, so this commit
        // need not be fsynced (the next durable commit carries it).
        self.blocking(move |inner| {
            let txn = inner.write_txn(Durability::None)?;
            inner.put_meta(&txn, COMMITTED, &committed)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(io(StorageIOError::write))
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        self.blocking(|inner| {
            Ok(inner
                .get_meta(&inner.db.begin_read()?, COMMITTED)?
                .flatten())
        })
        .await
        .map_err(io(StorageIOError::read))
    }

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read()?;
            let purged: Option<LogId<NodeId>> = inner.get_meta(&txn, PURGED)?.flatten();
            let last = match txn.open_table(inner.log_def()) {
                Ok(t) => match t.last()? {
                    Some((_, v)) => {
                        let e: Entry<TypeConfig> = serde_json::from_slice(v.value())
                            .map_err(|e| StoreError::Decode(e.to_string()))?;
                        Some(e.log_id)
                    }
                    None => None,
                },
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last.or(purged),
            })
        })
        .await
        .map_err(io(StorageIOError::read_logs))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn append_to_log<I>(&mut self, entries: I) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        self.blocking(move |inner| {
            // One transaction, one fsync for the whole batch: group commit.
            let txn = inner.write_txn(Durability::Immediate)?;
            {
                let mut table = txn.open_table(inner.log_def())?;
                for entry in &entries {
                    table.insert(entry.log_id.index, encode_entry(entry)?.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(io(StorageIOError::write_logs))
    }

    async fn delete_conflict_logs_since(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        self.blocking(move |inner| {
            let txn = inner.write_txn(Durability::Immediate)?;
            txn.open_table(inner.log_def())?
                .retain_in(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(io(StorageIOError::write_logs))
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        self.blocking(move |inner| {
            let txn = inner.write_txn(Durability::Immediate)?;
            inner.put_meta(&txn, PURGED, &Some(log_id))?;
            txn.open_table(inner.log_def())?
                .retain_in(..=log_id.index, |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(io(StorageIOError::write_logs))
    }

    async fn last_applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read()?;
            let applied = inner.get_meta(&txn, APPLIED)?.flatten();
            let membership = inner.get_meta(&txn, MEMBERSHIP)?.unwrap_or_default();
            Ok((applied, membership))
        })
        .await
        .map_err(io(StorageIOError::read_state_machine))
    }

    async fn apply_to_state_machine(
        &mut self,
        entries: &[Entry<TypeConfig>],
    ) -> StoreResult<Vec<Reply>> {
        let entries = entries.to_vec();
        self.blocking(move |inner| {
            let txn = inner.write_txn(Durability::Immediate)?;
            let mut replies = Vec::with_capacity(entries.len());
            let mut run: Vec<(u64, &[u8])> = Vec::new();
            let flush =
                |run: &mut Vec<(u64, &[u8])>, replies: &mut Vec<Reply>| -> Result<(), StoreError> {
                    if !run.is_empty() {
                        let out = inner.sm.apply(&txn, run).map_err(sm_err)?;
                        if out.len() != run.len() {
                            return Err(StoreError::StateMachine(
                                "one reply per command expected".into(),
                            ));
                        }
                        replies.extend(out.into_iter().map(Reply));
                        run.clear();
                    }
                    Ok(())
                };
            let mut last = None;
            for entry in &entries {
                last = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Normal(cmd) => run.push((entry.log_id.index, cmd.0.as_slice())),
                    EntryPayload::Blank => {
                        flush(&mut run, &mut replies)?;
                        replies.push(Reply::default());
                    }
                    EntryPayload::Membership(m) => {
                        flush(&mut run, &mut replies)?;
                        inner.put_meta(
                            &txn,
                            MEMBERSHIP,
                            &StoredMembership::new(Some(entry.log_id), m.clone()),
                        )?;
                        replies.push(Reply::default());
                    }
                }
            }
            flush(&mut run, &mut replies)?;
            if let Some(last) = last {
                inner.put_meta(&txn, APPLIED, &Some(last))?;
            }
            txn.commit()?;
            inner.sm.committed();
            Ok(replies)
        })
        .await
        .map_err(io(StorageIOError::write_state_machine))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let meta = meta.clone();
        let signature = meta.signature();
        let data = snapshot.into_inner();
        self.blocking(move |inner| {
            // State, applied id, membership and the snapshot itself change in one durable commit.
            let txn = inner.write_txn(Durability::Immediate)?;
            inner.sm.install(&txn, &data).map_err(sm_err)?;
            inner.put_meta(&txn, APPLIED, &meta.last_log_id)?;
            inner.put_meta(&txn, MEMBERSHIP, &meta.last_membership)?;
            inner.put_meta(&txn, SNAPSHOT_META, &meta)?;
            txn.open_table(inner.meta_def())?
                .insert(SNAPSHOT_DATA, data.as_slice())?;
            txn.commit()?;
            inner.sm.committed();
            Ok(())
        })
        .await
        .map_err(io(move |e| {
            StorageIOError::write_snapshot(Some(signature), e)
        }))
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read()?;
            let Some(meta) = inner.get_meta::<SnapshotMeta<NodeId, Node>>(&txn, SNAPSHOT_META)?
            else {
                return Ok(None);
            };
            let table = txn.open_table(inner.meta_def())?;
            let data = table
                .get(SNAPSHOT_DATA)?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }))
        })
        .await
        .map_err(io(|e| StorageIOError::read_snapshot(None, e)))
    }
}
