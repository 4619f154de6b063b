//! The client's error type: a gRPC status from the node (code + message kept as sent), a
//! connection failure (with the whole cause chain, e.g. a TLS handshake error), or a local
//! problem (bad address, unreadable certificate, malformed JSON input).

use std::fmt;

/// What went wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node (or the transport on its behalf) answered with a gRPC status.
    #[error("{} ({}): {message}", code_name(*code), *code as i32)]
    Status { code: tonic::Code, message: String },
    /// No connection could be made: refused, unreachable, timed out, or a TLS handshake failure.
    /// `detail` is the whole cause chain, joined with `: `.
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    /// The client configuration is wrong (address, certificate files, options).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Input given to a helper is not usable (e.g. JSON that is not an object).
    #[error("invalid input: {0}")]
    Input(String),
}

impl Error {
    /// The gRPC code, when the node answered with a status.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The node's message, when it answered with a status.
    pub fn message(&self) -> Option<&str> {
        match self {
            Error::Status { message, .. } => Some(message),
            _ => None,
        }
    }

    /// True when the node could not be reached (connection failure or `UNAVAILABLE`).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Connect { .. })
            || matches!(self, Error::Status { code, .. } if *code == tonic::Code::Unavailable)
    }

    /// True when the cause looks like a TLS problem (handshake, certificate, name).
    pub fn is_tls(&self) -> bool {
        let text = match self {
            Error::Connect { detail, .. } => detail.to_ascii_lowercase(),
            Error::Status { message, .. } => message.to_ascii_lowercase(),
            _ => return false,
        };
        [
            "certificate",
            "tls",
            "handshake",
            "unknownissuer",
            "corrupt message",
            "invalidcontenttype",
            "alert",
        ]
        .iter()
        .any(|w| text.contains(w))
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        let mut message = s.message().to_string();
        // Transport failures surface as UNAVAILABLE with a terse message; keep the cause chain.
        if let Some(src) = std::error::Error::source(&s) {
            let chain = error_chain(src);
            if !chain.is_empty() && !message.contains(&chain) {
                message = if message.is_empty() {
                    chain
                } else {
                    format!("{message}: {chain}")
                };
            }
        }
        Error::Status {
            code: s.code(),
            message,
        }
    }
}

/// An error and its sources, joined with `: ` (repeated texts dropped).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut depth = 0;
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
        depth += 1;
        if depth > 16 {
            break;
        }
    }
    parts.join(": ")
}

/// The canonical upper-case name of a gRPC code, e.g. `NOT_FOUND`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Display helper for a code.
pub struct CodeName(pub tonic::Code);

impl fmt::Display for CodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(code_name(self.0))
    }
}

/// Result alias for the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_code_and_message() {
        let e = Error::from(tonic::Status::not_found("schema 'X' not found"));
        assert_eq!(e.code(), Some(tonic::Code::NotFound));
        assert_eq!(e.message(), Some("schema 'X' not found"));
        assert_eq!(e.to_string(), "NOT_FOUND (5): schema 'X' not found");
        assert!(!e.is_unavailable());
        assert!(Error::from(tonic::Status::unavailable("down")).is_unavailable());
    }
}
