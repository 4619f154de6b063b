//! The state machine trait a group replicates; the node implements it for a schema later.

use redb::{ReadTransaction, WriteTransaction};

/// An error from the state machine. Returning one from `apply` or `install` stops the member
/// (openraft treats it as a storage failure), so per-command failures a client should see (a
/// rejected mutation, say) belong in the reply bytes instead.
pub type SmError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The replicated state behind a group, kept in the same redb database as the Raft log.
///
/// Every call gets the store's transaction: what `apply` writes commits atomically with the
/// group's applied log id, so after a crash the state and the applied id agree.
pub trait GroupStateMachine: Send + Sync + 'static {
    /// Applies committed commands in log order; `commands[i]` is `(log index, command bytes)`.
    /// Returns one reply per command, in the same order.
    fn apply(
        &self,
        txn: &WriteTransaction,
        commands: &[(u64, &[u8])],
    ) -> Result<Vec<Vec<u8>>, SmError>;

    /// Serializes the whole state as seen by `txn` (a consistent redb snapshot).
    fn snapshot(&self, txn: &ReadTransaction) -> Result<Vec<u8>, SmError>;

    /// Replaces the whole state with a snapshot made by [`GroupStateMachine::snapshot`].
    fn install(&self, txn: &WriteTransaction, snapshot: &[u8]) -> Result<(), SmError>;

    /// Called once the transaction of an `apply` or `install` has been committed (durably): the
    /// place to announce what was applied (e.g. to live subscribers). Nothing by default.
    fn committed(&self) {}
}
