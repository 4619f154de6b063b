//! Running the real `foldctl` binary against a node, as a user would, and reading what it printed.

use std::process::Command;

use serde_json::Value as Json;

use crate::process::bin_path;
use crate::tools::repo;

/// What one foldctl run gave: its exit code (-1 when killed by a signal), stdout and stderr.
pub struct Run {
    pub code: i32,
    pub out: String,
    pub err: String,
}

impl Run {
    /// stdout as JSON (of a run with `-o json`); a failure shows what was printed.
    pub fn json(&self) -> Json {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.out, self.err))
    }
}

/// Run foldctl with `args` against `addr`, in the repository's root, with stdout piped (not a
/// terminal) and `COLUMNS=200` (no environment leaks in from the caller).
pub fn ctl(addr: &str, args: &[&str]) -> Run {
    ctl_in(addr, args, "200")
}

/// [`ctl`] in a terminal `columns` wide. The FOLD_* / FOLDCTL_* variables foldctl reads for its
/// defaults are cleared, so the test's environment never leaks in.
pub fn ctl_in(addr: &str, args: &[&str], columns: &str) -> Run {
    let out = Command::new(bin_path("foldctl"))
        .args(["--addr", addr])
        .args(args)
        .current_dir(repo())
        .env("COLUMNS", columns)
        .env_remove("FOLD_ADDR")
        .env_remove("FOLD_OUTPUT")
        .env_remove("FOLD_TIMEOUT")
        .env_remove("FOLD_METRICS_ADDR")
        .env_remove("FOLD_SIDECAR_METRICS_ADDR")
        .env_remove("FOLDCTL_TLS_CA")
        .output()
        .expect("run foldctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// foldctl that must succeed (exit code 0).
pub fn ok(addr: &str, args: &[&str]) -> Run {
    ok_in(addr, args, "200")
}

/// [`ok`] in a terminal `columns` wide.
pub fn ok_in(addr: &str, args: &[&str], columns: &str) -> Run {
    let r = ctl_in(addr, args, columns);
    assert_eq!(
        r.code, 0,
        "foldctl {args:?} on {addr} failed\nstdout: {}\nstderr: {}",
        r.out, r.err
    );
    r
}
