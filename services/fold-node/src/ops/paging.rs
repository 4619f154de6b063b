//! Continuation tokens for paged queries. A token names the last range key a page returned
//! (keyset paging: the next page starts after it, so every record present throughout is returned
//! exactly once however the data changes between pages) and carries an HMAC over that key and the
//! query's scope (schema, its content hash, the filter) under a per-node secret kept in the
//! database. A forged token, or one from another query or node, fails the HMAC; a schema whose
//! content changed makes older tokens stale. Both are INVALID_ARGUMENT.
//!
//! HMAC-SHA256 is written out here (RFC 2104, a few lines over `sha2`) rather than taken from the
//! `hmac` crate: the version of `hmac` in this tree is built on a newer `digest` than our `sha2`.

use sha2::{Digest, Sha256};

use crate::storage::store::{Store, StoreError};

const SECRET_KEY: &str = "page_token_secret";
/// Longest token accepted: a hex range key (at most 1,024 bytes) and a hex MAC.
const MAX_TOKEN: usize = 2 * 1024 + 1 + 64;

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Makes and checks page tokens.
#[derive(Clone)]
pub struct Pager {
    secret: Vec<u8>,
}

impl Pager {
    /// The node's token secret, created (random) on first use and kept in the database, so tokens
    /// stay valid across restarts.
    pub fn load(store: &Store) -> Result<Pager, StoreError> {
        if let Some(hexed) = store.meta_get(SECRET_KEY)?
            && let Ok(secret) = hex::decode(hexed)
            && secret.len() == 32
        {
            return Ok(Pager { secret });
        }
        let mut secret = uuid::Uuid::new_v4().as_bytes().to_vec();
        secret.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        store.meta_set(SECRET_KEY, &hex::encode(&secret))?;
        Ok(Pager { secret })
    }

    fn mac(&self, scope: &str, after: &str) -> [u8; 32] {
        let mut msg = Vec::with_capacity(scope.len() + 1 + after.len());
        msg.extend_from_slice(scope.as_bytes());
        msg.push(0);
        msg.extend_from_slice(after.as_bytes());
        hmac_sha256(&self.secret, &msg)
    }

    /// The token for the page after `after`, in `scope`.
    pub fn token(&self, scope: &str, after: &str) -> String {
        format!(
            "{}.{}",
            hex::encode(after.as_bytes()),
            hex::encode(self.mac(scope, after))
        )
    }

    /// The range key a token continues after, if the token is genuine and belongs to `scope`.
    pub fn open(&self, scope: &str, token: &str) -> Result<String, String> {
        const BAD: &str = "'page_token' is not a token this node issued for this query (forged, from another query or node, or stale because the schema changed); start again without it";
        if token.len() > MAX_TOKEN {
            return Err(BAD.into());
        }
        let (key, mac) = token.split_once('.').ok_or(BAD)?;
        let after = hex::decode(key)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(BAD)?;
        let mac = hex::decode(mac).map_err(|_| BAD)?;
        // Compare in constant time.
        let want = self.mac(scope, &after);
        if mac.len() != want.len() || mac.iter().zip(want).fold(0u8, |d, (a, b)| d | (a ^ b)) != 0 {
            return Err(BAD.into());
        }
        Ok(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_only_in_their_scope_and_untampered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let p = Pager::load(&store).unwrap();
        let t = p.token("Notes|h1|All", "key-17");
        assert_eq!(p.open("Notes|h1|All", &t).unwrap(), "key-17");
        assert!(
            p.open("Notes|h2|All", &t).is_err(),
            "stale: the schema changed"
        );
        assert!(p.open("Other|h1|All", &t).is_err(), "another query");
        let forged = format!("{}.{}", hex::encode("key-99"), t.split_once('.').unwrap().1);
        assert!(p.open("Notes|h1|All", &forged).is_err());
        assert!(p.open("Notes|h1|All", "garbage").is_err());
        assert!(p.open("Notes|h1|All", &"a".repeat(10_000)).is_err());
        // The secret survives a reopen; another node's secret does not open the token.
        drop(p);
        let again = Pager::load(&store).unwrap();
        assert_eq!(again.open("Notes|h1|All", &t).unwrap(), "key-17");
        let dir2 = tempfile::tempdir().unwrap();
        let other = Pager::load(&Store::open(&dir2.path().join("db")).unwrap()).unwrap();
        assert!(other.open("Notes|h1|All", &t).is_err());
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
