//! The one conversion table between gRPC statuses and the wire's `WireError`, used by every hop
//! (node ⇄ sidecar ⇄ peer): the code travels as its google.rpc.Code number, the message as is.

use crate::wire::WireError;
use tonic::{Code, Status};

/// A status as a wire error.
pub fn to_wire(s: &Status) -> WireError {
    WireError {
        code: s.code() as i32,
        message: s.message().to_string(),
    }
}

/// A wire error with this code and message.
pub fn wire_error(code: Code, message: impl Into<String>) -> WireError {
    WireError {
        code: code as i32,
        message: message.into(),
    }
}

/// A wire error produced by the local link itself (not a remote node's), as a status with the
/// same code and message (OK or an unknown number becomes UNKNOWN).
pub fn from_wire_local(e: WireError) -> Status {
    let code = match Code::from_i32(e.code) {
        Code::Ok => Code::Unknown,
        c => c,
    };
    Status::new(code, e.message)
}

/// A wire error from node `node` as a status with the same code (OK or an unknown number, which
/// would be a lie or a bug, becomes UNKNOWN), its message prefixed with the node.
pub fn from_wire(node: &str, e: WireError) -> Status {
    let code = match Code::from_i32(e.code) {
        Code::Ok => Code::Unknown,
        c => c,
    };
    Status::new(code, format!("node {node}: {}", e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_the_round_trip() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Unavailable,
        ] {
            let s = from_wire("B", to_wire(&Status::new(code, "why")));
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), "node B: why");
        }
        assert_eq!(
            from_wire("B", wire_error(Code::Ok, "x")).code(),
            Code::Unknown
        );
        let odd = WireError {
            code: 999,
            message: "?".into(),
        };
        assert_eq!(from_wire("B", odd).code(), Code::Unknown);
    }
}
