//! A schema group's replicated state machine: the schema's data in the node's store. Each
//! committed log entry is one write (the mutations of one Mutate or BatchMutate, already checked
//! against the schema and the requester's permissions by the leader), applied with the same
//! check-then-write as a single node's group commit ([`WriteGroup::apply_idempotent`]) inside the
//! Raft store's transaction, so data and applied log id commit together. Version ids and times
//! come from the entry ([`Stamp::Log`]): every member writes exactly the same versions, sequence
//! numbers and history.

use std::sync::{Arc, Mutex};

use fold_group::{GroupStateMachine, SmError};
use redb::{ReadTransaction, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::storage::commit::Committed;
use crate::storage::hub::ChangeHub;
use crate::storage::store::{
    self, ApplyError, Idempotency, MutationError, MutationPlan, SchemaSnapshot, Stamp, Store,
};

/// One proposed write.
#[derive(Debug, Serialize, Deserialize)]
pub struct WriteCommand {
    /// The leader's clock when it proposed (the versions' time on every member).
    pub ms: u64,
    /// Validated mutations of the group's schema, applied all or nothing.
    pub plans: Vec<MutationPlan>,
    pub idempotency: Option<Idempotency>,
}

/// The outcome of one applied write, as every member computed it.
#[derive(Debug, Serialize, Deserialize)]
pub enum WriteOutcome {
    Applied {
        written: Vec<Vec<(String, String)>>,
        sequences: Vec<u64>,
        replayed: bool,
    },
    /// Refused by the data (nothing written): mutation `index` and why.
    Refused { index: usize, error: Refusal },
    /// An entry this member could not read (never proposed by a correct leader).
    Malformed(String),
}

/// A data refusal, as it travels in a reply.
#[derive(Debug, Serialize, Deserialize)]
pub enum Refusal {
    AlreadyExists { field: String, at: String },
    Missing(String),
    KeyReused(String),
}

impl From<Refusal> for MutationError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::AlreadyExists { field, at } => MutationError::AlreadyExists { field, at },
            Refusal::Missing(m) => MutationError::Missing(m),
            Refusal::KeyReused(k) => MutationError::KeyReused(k),
        }
    }
}

impl WriteOutcome {
    /// The answer to the proposing caller.
    pub fn into_result(self) -> Result<Committed, crate::storage::commit::JobError> {
        use crate::storage::commit::JobError;
        match self {
            WriteOutcome::Applied {
                written,
                sequences,
                replayed,
            } => Ok(Committed {
                written,
                sequences,
                replayed,
            }),
            WriteOutcome::Refused { index, error } => Err(JobError::Refused {
                index,
                error: error.into(),
            }),
            WriteOutcome::Malformed(m) => Err(JobError::Storage(m)),
        }
    }
}

/// The state machine of the group replicating `schema` on this node.
pub struct SchemaMachine {
    schema: String,
    store: Store,
    hub: ChangeHub,
    /// Idempotency window: keys older than it are forgotten as writes apply.
    idempotency_window_ms: u64,
    /// Changes applied in the transaction being committed: announced once it is durable.
    pending: Mutex<Vec<(String, u64)>>,
}

impl SchemaMachine {
    pub fn new(schema: &str, store: Store, hub: ChangeHub, idempotency_window_ms: u64) -> Self {
        SchemaMachine {
            schema: schema.to_string(),
            store,
            hub,
            idempotency_window_ms,
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Apply one entry; a storage failure is returned as `Err` (it stops the member).
    fn apply_one(
        &self,
        txn: &WriteTransaction,
        index: u64,
        bytes: &[u8],
    ) -> Result<WriteOutcome, SmError> {
        let cmd: WriteCommand = match serde_json::from_slice(bytes) {
            Ok(c) => c,
            Err(e) => {
                return Ok(WriteOutcome::Malformed(format!(
                    "unreadable entry {index}: {e}"
                )));
            }
        };
        let Some((schema, _)) = self.store.schema(&self.schema) else {
            // Every member had the schema when it joined, and schemas are never unloaded.
            return Err(format!("schema '{}' is not loaded on this member", self.schema).into());
        };
        super::status::observe_commit(&self.schema, cmd.ms);
        let stamp = Stamp::Log { ms: cmd.ms, index };
        let mut group = store::WriteGroup::within(txn, self.store.retention(), stamp);
        let outcome = match group.apply_idempotent(&schema, &cmd.plans, cmd.idempotency.as_ref()) {
            Ok((applied, replayed)) => WriteOutcome::Applied {
                written: applied.written,
                sequences: applied.sequences,
                replayed,
            },
            Err(ApplyError::Refused { index, error }) => WriteOutcome::Refused {
                index,
                error: match error {
                    MutationError::AlreadyExists { field, at } => {
                        Refusal::AlreadyExists { field, at }
                    }
                    MutationError::Missing(m) => Refusal::Missing(m),
                    MutationError::KeyReused(k) => Refusal::KeyReused(k),
                    MutationError::Store(e) => return Err(Box::new(e)),
                },
            },
            Err(ApplyError::Store(e)) => return Err(Box::new(e)),
        };
        if cmd.idempotency.is_some() {
            group.prune_idempotency(self.idempotency_window_ms)?;
        }
        if let Ok(mut p) = self.pending.lock() {
            p.extend(group.into_committed());
        }
        Ok(outcome)
    }
}

impl GroupStateMachine for SchemaMachine {
    fn apply(
        &self,
        txn: &WriteTransaction,
        commands: &[(u64, &[u8])],
    ) -> Result<Vec<Vec<u8>>, SmError> {
        commands
            .iter()
            .map(|(index, bytes)| {
                let outcome = self.apply_one(txn, *index, bytes)?;
                Ok(serde_json::to_vec(&outcome)?)
            })
            .collect()
    }

    fn snapshot(&self, txn: &ReadTransaction) -> Result<Vec<u8>, SmError> {
        let snap = store::schema_snapshot(txn, &self.schema)?;
        Ok(serde_json::to_vec(&snap)?)
    }

    fn install(&self, txn: &WriteTransaction, snapshot: &[u8]) -> Result<(), SmError> {
        let snap: SchemaSnapshot = serde_json::from_slice(snapshot)?;
        store::install_schema_snapshot(txn, &self.schema, &snap)?;
        Ok(())
    }

    fn committed(&self) {
        let events = self
            .pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        if !events.is_empty() {
            self.hub.publish(events);
        }
    }
}

/// Shared handle type of a member's machine.
pub type Machine = Arc<SchemaMachine>;
