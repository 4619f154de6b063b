//! Length limits of what peers send in a forward envelope, checked by the sidecar before it hands
//! a request on and again by the node: one rule for both sides.

use crate::wire::Requester;

/// Longest request id, origin or target node id accepted (a PeerId is 52 characters, a UUID 36).
pub const MAX_ID_BYTES: usize = 64;
/// Longest requester identity or proven key accepted.
pub const MAX_REQUESTER_BYTES: usize = 128;

/// Check the ids and requester strings of an envelope; the error names the field and limit.
pub fn check_envelope(
    request_id: &str,
    origin_node_id: &str,
    target_node_id: &str,
    requester: Option<&Requester>,
) -> Result<(), String> {
    for (name, v) in [
        ("request_id", request_id),
        ("origin_node_id", origin_node_id),
        ("target_node_id", target_node_id),
    ] {
        if v.len() > MAX_ID_BYTES {
            return Err(format!(
                "'{name}' is {} bytes; at most {MAX_ID_BYTES} are accepted",
                v.len()
            ));
        }
    }
    if let Some(r) = requester {
        for (name, v) in [
            ("requester.identity", &r.identity),
            ("requester.proven_key", &r.proven_key),
        ] {
            if v.len() > MAX_REQUESTER_BYTES {
                return Err(format!(
                    "'{name}' is {} bytes; at most {MAX_REQUESTER_BYTES} are accepted",
                    v.len()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_requester_strings_are_bounded() {
        assert!(check_envelope("r", "o", "t", None).is_ok());
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let e = check_envelope(&long, "o", "t", None).unwrap_err();
        assert!(e.contains("request_id"), "{e}");
        let r = Requester {
            distance: 0,
            identity: "y".repeat(MAX_REQUESTER_BYTES + 1),
            proven_key: String::new(),
        };
        let e = check_envelope("r", "o", "t", Some(&r)).unwrap_err();
        assert!(e.contains("requester.identity"), "{e}");
    }
}
