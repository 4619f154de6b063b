//! Storage's own error ([`StoreError`]): redb's errors, corrupt records, refusals and cancelled
//! scans; it converts into the node's domain error in `store.rs`.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt record in storage: {0}")]
    Corrupt(String),
    /// Input that storage refuses to apply (e.g. a replicated change that does not fit).
    #[error("{0}")]
    Refused(String),
    /// A scan stopped because its caller went away or its deadline passed.
    #[error("the scan was cancelled (the caller went away or its deadline passed)")]
    Cancelled,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
