//! Where the repository is, and the test tools scripts/test.sh installs into `.tools/`.

use std::path::{Path, PathBuf};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e sits in the repository")
        .to_path_buf()
}

/// A tool from `.tools` (where scripts/test.sh installs it) or PATH; a clear failure otherwise.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["bin", "kv/bin", "compose/bin"] {
        let p = repo().join(".tools").join(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = d.join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("`{name}` is not installed; run scripts/test.sh, which installs it into .tools/");
}
