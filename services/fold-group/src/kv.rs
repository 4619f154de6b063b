//! A redb-backed key-value state machine: the reference [`GroupStateMachine`] used by the tests.

use std::collections::BTreeMap;

use redb::{
    ReadTransaction, ReadableDatabase as _, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::{GroupId, GroupStateMachine, SmError};

/// Longest key accepted by [`KvStateMachine`] (bytes).
pub const MAX_KEY_LEN: usize = 1024;
/// Longest value accepted by [`KvStateMachine`] (bytes).
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// A command of the key-value state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`.
    Put { key: String, value: String },
    /// Removes `key`.
    Delete { key: String },
}

impl KvCommand {
    /// The command as bytes to propose.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The reply to a [`KvCommand`]: the previous value, or why the command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvReply {
    /// Applied; the key's value before.
    Applied { previous: Option<String> },
    /// Not applied (malformed or over the size limits); the state is unchanged.
    Refused { reason: String },
}

impl KvReply {
    /// Decodes a reply returned by a group write.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Key-value state in one redb table per group (`fold-group/<group>/kv`).
pub struct KvStateMachine {
    table: String,
}

impl KvStateMachine {
    /// The key-value state machine of `group`.
    pub fn new(group: &GroupId) -> Self {
        Self {
            table: format!("fold-group/{group}/kv"),
        }
    }

    fn def(&self) -> TableDefinition<'_, &'static str, &'static str> {
        TableDefinition::new(&self.table)
    }

    /// Reads `key` in `txn` (use [`crate::Group::read`] for a linearizable read).
    pub fn get(&self, txn: &ReadTransaction, key: &str) -> Result<Option<String>, SmError> {
        let table = match txn.open_table(self.def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get(key)?.map(|v| v.value().to_string()))
    }

    /// Every key and value in `txn`.
    pub fn all(&self, txn: &ReadTransaction) -> Result<BTreeMap<String, String>, SmError> {
        let table = match txn.open_table(self.def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = BTreeMap::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.insert(k.value().to_string(), v.value().to_string());
        }
        Ok(out)
    }

    /// Every key and value in a database, read outside Raft (for checks after a test).
    pub fn dump(&self, db: &redb::Database) -> Result<BTreeMap<String, String>, SmError> {
        self.all(&db.begin_read()?)
    }
}

impl GroupStateMachine for KvStateMachine {
    fn apply(
        &self,
        txn: &WriteTransaction,
        commands: &[(u64, &[u8])],
    ) -> Result<Vec<Vec<u8>>, SmError> {
        let mut table = txn.open_table(self.def())?;
        let mut replies = Vec::with_capacity(commands.len());
        for (_index, bytes) in commands {
            let reply = match serde_json::from_slice::<KvCommand>(bytes) {
                Err(e) => KvReply::Refused {
                    reason: format!("malformed command: {e}"),
                },
                Ok(KvCommand::Put { key, value })
                    if key.len() > MAX_KEY_LEN || value.len() > MAX_VALUE_LEN =>
                {
                    KvReply::Refused {
                        reason: "key or value too long".into(),
                    }
                }
                Ok(KvCommand::Put { key, value }) => {
                    let previous = table
                        .insert(key.as_str(), value.as_str())?
                        .map(|v| v.value().to_string());
                    KvReply::Applied { previous }
                }
                Ok(KvCommand::Delete { key }) => {
                    let previous = table.remove(key.as_str())?.map(|v| v.value().to_string());
                    KvReply::Applied { previous }
                }
            };
            replies.push(serde_json::to_vec(&reply)?);
        }
        Ok(replies)
    }

    fn snapshot(&self, txn: &ReadTransaction) -> Result<Vec<u8>, SmError> {
        Ok(serde_json::to_vec(&self.all(txn)?)?)
    }

    fn install(&self, txn: &WriteTransaction, snapshot: &[u8]) -> Result<(), SmError> {
        let data: BTreeMap<String, String> = serde_json::from_slice(snapshot)?;
        txn.delete_table(self.def())?;
        let mut table = txn.open_table(self.def())?;
        for (k, v) in &data {
            table.insert(k.as_str(), v.as_str())?;
        }
        Ok(())
    }
}
