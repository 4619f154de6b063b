//! One finding of a diagnosis (`check`, the dashboard's problem list): its severity, a stable
//! check id, what is wrong, and how to fix it.

use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable id of the check, e.g. `sidecar-link`.
    pub check: &'static str,
    pub what: String,
    /// Empty when nothing needs fixing.
    pub fix: String,
}

pub fn finding(
    severity: Severity,
    check: &'static str,
    what: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        severity,
        check,
        what: what.into(),
        fix: fix.into(),
    }
}
