//! The node's persistent Ed25519 identity. The node id is the PeerId of this key, so it stays the
//! same across restarts. The key file holds libp2p's protobuf keypair encoding; a file the
//! sidecar creates gets mode 0600.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use libp2p::identity::Keypair;

/// Read the key at `path`, or create it there (mode 0600) if `create` and it does not exist.
pub fn load_or_create(path: &Path, create: bool) -> anyhow::Result<Keypair> {
    match std::fs::read(path) {
        Ok(bytes) => {
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "identity key is readable by other users; chmod 600 it");
            }
            Keypair::from_protobuf_encoding(&bytes).with_context(|| {
                format!(
                    "{} is not a libp2p identity key (expected a protobuf-encoded keypair, as written by `p2p-sidecar identity generate`)",
                    path.display()
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let key = Keypair::generate_ed25519();
            write_new(path, &key)?;
            tracing::info!(path = %path.display(), node_id = %key.public().to_peer_id(), "created a new node identity");
            Ok(key)
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot read the identity key {}", path.display()))
        }
    }
}

/// Write `key` to a file that must not exist yet, with mode 0600.
pub fn write_new(path: &Path, key: &Keypair) -> anyhow::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let bytes = key
        .to_protobuf_encoding()
        .context("cannot encode the identity key")?;
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "{} already exists; refusing to overwrite an identity key",
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    f.write_all(&bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_0600_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/identity.key");
        let a = load_or_create(&p, true).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create(&p, true).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        assert!(write_new(&p, &a).is_err(), "never overwrites");
        assert!(load_or_create(&dir.path().join("missing"), false).is_err());
        std::fs::write(dir.path().join("junk"), b"junk").unwrap();
        let e = load_or_create(&dir.path().join("junk"), true).unwrap_err();
        assert!(e.to_string().contains("not a libp2p identity key"));
    }
}
