//! The node's one error type, [`NodeError`], and its one mapping to a gRPC status.
//!
//! Domain code (data, routing, following, subscriptions, the mesh link …) returns `NodeError`;
//! the API edge ([`crate::api`], [`crate::peer_requests`]) turns it into a `tonic::Status`
//! through the single `From<NodeError> for Status` below. Each variant is one gRPC code class
//! and carries the message the client sees, unchanged. [`is_callee_failure`] is the one place
//! deciding whether a code means "the callee did not answer" rather than "it refused".

use tonic::{Code, Status};

use crate::commit::JobError;
use crate::permissions::Denied;
use crate::store::{MutationError, StoreError};

/// Trailer of a refused BatchMutate naming the failing record's index.
pub const FAILED_RECORD_TRAILER: &str = "fold-failed-record";

macro_rules! node_error {
    ($($(#[$doc:meta])* $variant:ident => $ctor:ident, $code:ident;)*) => {
        /// An error of the node's domain: its gRPC code class and the message the client sees.
        #[derive(Debug, Clone)]
        pub enum NodeError {
            $($(#[$doc])* $variant(String),)*
            /// A whole BatchMutate refused at record `index` because of `error`: same code, the
            /// message prefixed `record N: ` and the index in the [`FAILED_RECORD_TRAILER`]
            /// trailer.
            Record { index: usize, error: Box<NodeError> },
            /// Any other code (UNKNOWN, UNIMPLEMENTED …), as a callee answered it.
            Other { code: Code, message: String },
            /// A status another party answered with (the sidecar, another node, a follow
            /// source), passed on unchanged.
            Remote(Status),
        }

        impl NodeError {
            /// An error of class `code` with this message.
            pub fn new(code: Code, message: impl Into<String>) -> Self {
                match code {
                    $(Code::$code => NodeError::$variant(message.into()),)*
                    code => NodeError::Other { code, message: message.into() },
                }
            }

            $(
                #[doc = concat!("A `", stringify!($variant), "` error with this message.")]
                pub fn $ctor(message: impl Into<String>) -> Self {
                    NodeError::$variant(message.into())
                }
            )*

            /// The gRPC code the client sees.
            pub fn code(&self) -> Code {
                match self {
                    $(NodeError::$variant(_) => Code::$code,)*
                    NodeError::Other { code, .. } => *code,
                    NodeError::Record { error, .. } => error.code(),
                    NodeError::Remote(s) => s.code(),
                }
            }

            /// The message the client sees.
            pub fn message(&self) -> String {
                match self {
                    $(NodeError::$variant(m) => m.clone(),)*
                    NodeError::Other { message, .. } => message.clone(),
                    NodeError::Record { index, error } => format!(
                        "record {index}: {}; nothing of the batch was written",
                        error.message()
                    ),
                    NodeError::Remote(s) => s.message().to_string(),
                }
            }
        }
    };
}

node_error! {
    /// The request itself is wrong (a missing or malformed field, a bound exceeded).
    InvalidArgument => invalid_argument, InvalidArgument;
    /// What the request names does not exist.
    NotFound => not_found, NotFound;
    /// What the request would create exists already.
    AlreadyExists => already_exists, AlreadyExists;
    /// The requester may not do this.
    PermissionDenied => permission_denied, PermissionDenied;
    /// The node's state does not allow this now (schema state, read-only replica …).
    FailedPrecondition => failed_precondition, FailedPrecondition;
    /// A limit of the node (slots, sizes, rows) is reached.
    ResourceExhausted => resource_exhausted, ResourceExhausted;
    /// A position outside what the node holds (sequence numbers of the change log).
    OutOfRange => out_of_range, OutOfRange;
    /// The operation met a conflict (a change sent in parts that changed meanwhile); ask again.
    Aborted => aborted, Aborted;
    /// A callee (the sidecar, another node) or the node's writer cannot answer now.
    Unavailable => unavailable, Unavailable;
    /// An answer did not come in time.
    DeadlineExceeded => deadline_exceeded, DeadlineExceeded;
    /// The operation was cancelled.
    Cancelled => cancelled, Cancelled;
    /// A failure of the node itself (storage, a broken invariant).
    Internal => internal, Internal;
}

/// The one mapping from the domain's errors to gRPC statuses, used at the API edge.
impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Remote(s) => s,
            NodeError::Record { index, .. } => {
                let mut meta = tonic::metadata::MetadataMap::new();
                meta.insert(
                    FAILED_RECORD_TRAILER,
                    tonic::metadata::MetadataValue::from(index as u64),
                );
                Status::with_metadata(e.code(), e.message(), meta)
            }
            e => Status::new(e.code(), e.message()),
        }
    }
}

/// Any domain error (a store's, a field policy's …) as the status the client sees, through the
/// `From<NodeError> for Status` above: for `map_err` at the API edge.
pub fn status(e: impl Into<NodeError>) -> Status {
    Status::from(e.into())
}

/// A status a callee answered with, carried unchanged.
impl From<Status> for NodeError {
    fn from(s: Status) -> Self {
        NodeError::Remote(s)
    }
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code(), self.message())
    }
}

impl std::error::Error for NodeError {}

/// Storage errors: a cancelled scan, a refusal by the data, else a storage failure (logged).
impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Cancelled => NodeError::cancelled(e.to_string()),
            StoreError::Refused(m) => NodeError::failed_precondition(m),
            e => {
                tracing::error!(error = %e, "storage failure");
                NodeError::internal(e.to_string())
            }
        }
    }
}

/// A field policy's refusal.
impl From<Denied> for NodeError {
    fn from(e: Denied) -> Self {
        match e {
            Denied::NotWritable { .. } => NodeError::failed_precondition(e.to_string()),
            Denied::Distance { .. } => NodeError::permission_denied(e.to_string()),
        }
    }
}

/// A mutation the data refused.
impl From<MutationError> for NodeError {
    fn from(e: MutationError) -> Self {
        match e {
            MutationError::AlreadyExists { .. } => NodeError::already_exists(e.to_string()),
            MutationError::Missing(_) => NodeError::not_found(e.to_string()),
            MutationError::Store(e) => e.into(),
            MutationError::KeyReused(_) => NodeError::failed_precondition(e.to_string()),
        }
    }
}

/// A write the group-commit writer could not commit.
impl From<JobError> for NodeError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Refused { error, .. } => error.into(),
            JobError::Storage(msg) => {
                tracing::error!(error = %msg, "storage failure");
                NodeError::internal(msg)
            }
            JobError::Stopped => NodeError::unavailable(e.to_string()),
            JobError::Group { code, message } => NodeError::new(code, message),
        }
    }
}

/// Did the callee (another node, the sidecar link, the path between) fail to answer, rather
/// than answer with a refusal? UNAVAILABLE (unreachable), DEADLINE_EXCEEDED (too slow) and
/// CANCELLED (the call was dropped on the way) say so; every other code is the callee's answer.
///
/// The one definition; call sites narrow or widen it on purpose, each saying why:
/// - the peer breaker counts exactly these as failures of the peer (`mesh`);
/// - a routed read is retried on another provider for these but CANCELLED (`route::retryable`):
///   a cancelled read is the client going away, not the provider failing;
/// - a remote subscription also resumes after ABORTED and RESOURCE_EXHAUSTED
///   (`subscribe::transient`): a change sent in parts changed, or the other node was busy;
///   both pass.
pub fn is_callee_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// Did a call end because its time ran out (or it was dropped on the way, which a timeout
/// does)? Such a failure is reported as DEADLINE_EXCEEDED naming the timeout.
pub fn timed_out(code: Code) -> bool {
    matches!(code, Code::Cancelled | Code::DeadlineExceeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_class_keeps_its_code_and_message() {
        let s: Status = NodeError::not_found("schema 'x' not found").into();
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "schema 'x' not found");
        let s: Status = NodeError::from(Status::aborted("moved")).into();
        assert_eq!(s.code(), Code::Aborted);
        assert_eq!(s.message(), "moved");
    }

    #[test]
    fn a_record_refusal_names_the_record() {
        let e = NodeError::Record {
            index: 3,
            error: Box::new(NodeError::already_exists("exists")),
        };
        let s: Status = e.into();
        assert_eq!(s.code(), Code::AlreadyExists);
        assert_eq!(
            s.message(),
            "record 3: exists; nothing of the batch was written"
        );
        assert_eq!(
            s.metadata()
                .get(FAILED_RECORD_TRAILER)
                .and_then(|v| v.to_str().ok()),
            Some("3")
        );
    }

    #[test]
    fn callee_failures_are_the_codes_of_no_answer() {
        for c in [Code::Unavailable, Code::DeadlineExceeded, Code::Cancelled] {
            assert!(is_callee_failure(c), "{c:?}");
        }
        for c in [
            Code::PermissionDenied,
            Code::NotFound,
            Code::InvalidArgument,
            Code::Aborted,
            Code::ResourceExhausted,
            Code::Internal,
        ] {
            assert!(!is_callee_failure(c), "{c:?}");
        }
    }
}
