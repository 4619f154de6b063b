//! `check`'s findings about replicas (`fold-node --follow`): each followed schema's last error
//! sorted into its cause — the source unreachable, this node not trusted by the source, the
//! replica diverged, the source no longer keeping the changes it needs, the schema missing here —
//! and a lag that grows between two samples, each with its fix. Pure: the caller brings the
//! node's status (and an earlier one, for the lag).

use fold_client::{NetworkStatus, Peer, Replica};

use crate::finding::{Finding, Severity, finding};

/// Why a replica fails, from its last error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The source refuses this node (PERMISSION_DENIED: its trust table denies us, or our
    /// distance cannot read the schema's fields).
    NotTrusted,
    /// This replica's history is not the source's.
    Diverged,
    /// The source dropped the changes the replica still needs (its change-log retention).
    BehindRetention,
    /// The source cannot be reached (not connected, dial failed, timed out, sidecar down).
    Unreachable,
    /// The schema is not loaded and approved here.
    SchemaMissing,
    /// Anything else.
    Other,
}

fn has(text: &str, words: &[&str]) -> bool {
    words.iter().any(|w| text.contains(w))
}

/// The cause of a replica's last error (the messages of fold-node's follow loop and of the
/// source, as they read on the wire).
pub fn cause(error: &str) -> Cause {
    let e = error.to_ascii_lowercase();
    if has(&e, &["diverged"]) {
        Cause::Diverged
    } else if has(
        &e,
        &["no longer kept", "oldest kept", "change-log-retention"],
    ) {
        Cause::BehindRetention
    } else if has(
        &e,
        &[
            "not trusted",
            "permission_denied",
            "permission denied",
            "is denied",
            "access denied",
            "may read no field",
        ],
    ) {
        Cause::NotTrusted
    } else if has(&e, &["is not loaded and approved on this node"]) {
        Cause::SchemaMissing
    } else if has(
        &e,
        &[
            "cannot reach",
            "unreachable",
            "unavailable",
            "no stream",
            "not connected",
            "dial",
            "did not complete",
            "did not answer",
            "closed before",
            "stream to node",
            "circuit breaker",
            "sidecar link",
            "timed out",
        ],
    ) {
        Cause::Unreachable
    } else {
        Cause::Other
    }
}

/// One finding per followed schema: its failure and fix, a lag that grew since `before`, or
/// that it is in step. `peers` are this node's peers (a source that is not connected is named).
pub fn replica_findings(
    now: &NetworkStatus,
    before: Option<&NetworkStatus>,
    peers: &[Peer],
) -> Vec<Finding> {
    now.replicas
        .iter()
        .map(|r| {
            let earlier = before.and_then(|b| b.replicas.iter().find(|x| x.schema == r.schema));
            let connected = peers
                .iter()
                .any(|p| p.node_id == r.source_node_id && p.connected);
            one(&now.node_id, r, earlier, connected)
        })
        .collect()
}

fn one(this: &str, r: &Replica, earlier: Option<&Replica>, connected: bool) -> Finding {
    let (s, src) = (&r.schema, &r.source_node_id);
    let Some(error) = &r.last_error else {
        return lag_finding(r, earlier);
    };
    let what = |why: &str| format!("replica of schema {s} from node {src} fails: {why}: {error}");
    match cause(error) {
        Cause::NotTrusted => finding(
            Severity::Error,
            "replica-untrusted",
            what("the source does not trust this node"),
            format!(
                "on node {src}: foldctl trust set {this} DISTANCE (a distance allowed to read every field of {s}; this node's id is {this})"
            ),
        ),
        Cause::Diverged => finding(
            Severity::Error,
            "replica-diverged",
            what("its history is not the source's"),
            format!(
                "this copy holds changes node {src} does not have: follow {s} into a node whose schema is empty (a fresh --data-dir), or drop --follow {s}@{src} and keep this copy as its own"
            ),
        ),
        Cause::BehindRetention => finding(
            Severity::Error,
            "replica-retention",
            what("the source no longer keeps the changes it needs"),
            format!(
                "following cannot cross that gap: rebuild the replica from a node that still keeps the changes, and raise node {src}'s --change-log-retention so a replica that falls behind can catch up"
            ),
        ),
        Cause::Unreachable => finding(
            Severity::Error,
            "replica-unreachable",
            what(if connected {
                "the source cannot be reached"
            } else {
                "the source is not connected"
            }),
            format!(
                "check that node {src} runs and that this node reaches it: foldctl dial /ip4/HOST/tcp/PORT/p2p/{src}; foldctl peers --all shows what is known"
            ),
        ),
        Cause::SchemaMissing => finding(
            Severity::Error,
            "replica-schema",
            what("the schema is not approved here"),
            format!(
                "load the same definition as on node {src} and approve it: foldctl schema load FILE --approve"
            ),
        ),
        Cause::Other => finding(
            Severity::Error,
            "replica-error",
            what("following fails"),
            "the fold-node log says more (lines with `following failed`)".to_string(),
        ),
    }
}

fn lag_finding(r: &Replica, earlier: Option<&Replica>) -> Finding {
    let (s, src) = (&r.schema, &r.source_node_id);
    let growing =
        earlier.is_some_and(|e| r.lag > e.lag && r.applied_sequence <= e.applied_sequence);
    if growing {
        let was = earlier.map_or(0, |e| e.lag);
        return finding(
            Severity::Warning,
            "replica-lag",
            format!(
                "replica of schema {s} from node {src} falls behind: lag {was} → {} changes while it applied nothing (at {})",
                r.lag, r.applied_sequence
            ),
            "the source writes faster than this node applies, or answers slowly: see foldctl top on both nodes, and this node's disk and CPU; foldctl status shows the lag",
        );
    }
    if r.lag > 0 {
        return finding(
            Severity::Info,
            "replica-lag",
            format!(
                "replica of schema {s} from node {src} is {} change(s) behind (at {} of {}), catching up",
                r.lag, r.applied_sequence, r.source_head_sequence
            ),
            "",
        );
    }
    finding(
        Severity::Ok,
        "replica",
        format!(
            "replica of schema {s} from node {src} is in step (at {})",
            r.applied_sequence
        ),
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(lag: u64, applied: u64, error: Option<&str>) -> Replica {
        Replica {
            schema: "Items".into(),
            source_node_id: "12D3KooWSrc".into(),
            applied_sequence: applied,
            source_head_sequence: applied + lag,
            lag,
            last_contact_unix_ms: None,
            last_error: error.map(String::from),
        }
    }

    #[test]
    fn errors_are_sorted_into_causes() {
        let cases = [
            (
                "node 12D3KooWSrc: peer:12D3KooWMe/replica is not trusted by this node (trust table entry 'deny', or unknown peers are denied); set its trust with Network.SetTrust",
                Cause::NotTrusted,
            ),
            (
                "this replica of schema 'Items' has diverged from node 12D3KooWSrc: its change 3 is not the source's",
                Cause::Diverged,
            ),
            (
                "node 12D3KooWSrc: the changes of schema 'Items' after sequence 0 are no longer kept: the oldest kept is 40 (--change-log-retention)",
                Cause::BehindRetention,
            ),
            (
                "cannot reach node 12D3KooWSrc: dial failed",
                Cause::Unreachable,
            ),
            (
                "forward to node 12D3KooWSrc did not complete within 7800 ms",
                Cause::Unreachable,
            ),
            ("the p2p-sidecar link is down", Cause::Unreachable),
            (
                "schema 'Items' is not loaded and approved on this node; load the same definition",
                Cause::SchemaMissing,
            ),
            ("change 4 from the source: no fields", Cause::Other),
        ];
        for (text, want) in cases {
            assert_eq!(cause(text), want, "{text}");
        }
    }

    #[test]
    fn a_failing_replica_names_its_cause_and_fix() {
        let r = replica(
            0,
            0,
            Some("node 12D3KooWSrc: peer:12D3KooWMe/replica is not trusted by this node"),
        );
        let f = one("12D3KooWMe", &r, None, true);
        assert_eq!(
            (f.check, f.severity),
            ("replica-untrusted", Severity::Error)
        );
        assert!(
            f.what.contains("schema Items from node 12D3KooWSrc"),
            "{}",
            f.what
        );
        assert!(
            f.fix
                .starts_with("on node 12D3KooWSrc: foldctl trust set 12D3KooWMe"),
            "{}",
            f.fix
        );
        let f = one(
            "me",
            &replica(0, 0, Some("cannot reach node 12D3KooWSrc: dial failed")),
            None,
            false,
        );
        assert_eq!(f.check, "replica-unreachable");
        assert!(f.what.contains("the source is not connected"), "{}", f.what);
    }

    #[test]
    fn lag_that_grows_is_a_warning() {
        let before = replica(3, 10, None);
        let f = one("me", &replica(9, 10, None), Some(&before), true);
        assert_eq!((f.check, f.severity), ("replica-lag", Severity::Warning));
        assert!(f.what.contains("lag 3 → 9"), "{}", f.what);
        let f = one("me", &replica(2, 18, None), Some(&before), true);
        assert_eq!(f.severity, Severity::Info);
        let f = one("me", &replica(0, 18, None), None, true);
        assert_eq!((f.check, f.severity), ("replica", Severity::Ok));
    }
}
