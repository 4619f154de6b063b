//! Field permission policies and their evaluation (fold_db semantics, enforced for real).
//!
//! A field's read or write policy is `NoRequirement` or `Distance(n)`: allowed iff the
//! requester's trust distance is at most `n` (0 = the node's owner). When that fails, an explicit
//! policy may still admit the requester's public key. The requester comes from
//! [`crate::access::identity`], never from the request.

use std::collections::BTreeMap;

use crate::model::distance::{Requester, TrustDistance};
use crate::storage::schema::FieldDef;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Why access to a field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("field '{field}' is not writable")]
    NotWritable { field: String },
    #[error(
        "{access} access denied for field '{field}': it requires trust distance <= {required}, {who} is at {actual}"
    )]
    Distance {
        field: String,
        access: &'static str,
        required: u32,
        actual: String,
        who: String,
    },
}

fn allowed(
    policy: TrustDistance,
    explicit: Option<&BTreeMap<String, u8>>,
    who: &Requester,
) -> bool {
    let by_distance = match (policy, who.distance) {
        (TrustDistance::NoRequirement, _) => true,
        (TrustDistance::Distance(required), Some(d)) => d <= required,
        (TrustDistance::Distance(_), None) => false,
    };
    by_distance || explicit.is_some_and(|keys| who.public_keys.iter().any(|k| keys.contains_key(k)))
}

/// Check one field for one kind of access.
pub fn check(field: &FieldDef, access: Access, who: &Requester) -> Result<(), Denied> {
    let p = &field.policy;
    let (policy, explicit, label) = match access {
        Access::Read => (p.read, p.explicit_read.as_ref(), "read"),
        Access::Write => {
            if !field.writable {
                return Err(Denied::NotWritable {
                    field: field.name.clone(),
                });
            }
            (p.write, p.explicit_write.as_ref(), "write")
        }
    };
    if allowed(policy, explicit, who) {
        return Ok(());
    }
    let required = match policy {
        TrustDistance::Distance(n) => n,
        TrustDistance::NoRequirement => 0,
    };
    Err(Denied::Distance {
        field: field.name.clone(),
        access: label,
        required,
        actual: who
            .distance
            .map(|d| d.to_string())
            .unwrap_or_else(|| "no trust (denied)".into()),
        who: who.label.clone(),
    })
}

/// A field policy's refusal.
impl From<Denied> for crate::error::NodeError {
    fn from(e: Denied) -> Self {
        match e {
            Denied::NotWritable { .. } => {
                crate::error::NodeError::failed_precondition(e.to_string())
            }
            Denied::Distance { .. } => crate::error::NodeError::permission_denied(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::distance::FieldPolicy;

    fn field(read: TrustDistance, keys: &[&str]) -> FieldDef {
        FieldDef {
            name: "f".into(),
            policy: FieldPolicy {
                read,
                write: TrustDistance::Distance(0),
                explicit_read: if keys.is_empty() {
                    None
                } else {
                    Some(keys.iter().map(|k| (k.to_string(), 1)).collect())
                },
                explicit_write: None,
            },
            writable: true,
            field_type: "Single".into(),
        }
    }

    fn who(d: Option<u32>, keys: &[&str]) -> Requester {
        Requester {
            label: "test".into(),
            distance: d,
            public_keys: keys.iter().map(|k| k.to_string()).collect(),
            proven_key: None,
        }
    }

    #[test]
    fn distance_rules() {
        let f = field(TrustDistance::Distance(1), &[]);
        assert!(check(&f, Access::Read, &who(Some(0), &[])).is_ok());
        assert!(check(&f, Access::Read, &who(Some(1), &[])).is_ok());
        let e = check(&f, Access::Read, &who(Some(2), &[])).unwrap_err();
        assert!(e.to_string().contains("field 'f'"));
        assert!(check(&f, Access::Read, &who(None, &[])).is_err());
        let open = field(TrustDistance::NoRequirement, &[]);
        assert!(check(&open, Access::Read, &who(None, &[])).is_ok());
    }

    #[test]
    fn explicit_keys_admit_only_listed_keys() {
        let f = field(TrustDistance::Distance(0), &["k1"]);
        assert!(check(&f, Access::Read, &who(Some(5), &["k1"])).is_ok());
        assert!(check(&f, Access::Read, &who(Some(5), &["k2"])).is_err());
        assert!(check(&f, Access::Read, &who(Some(5), &[])).is_err());
    }

    #[test]
    fn not_writable_wins() {
        let mut f = field(TrustDistance::NoRequirement, &[]);
        f.writable = false;
        assert!(matches!(
            check(&f, Access::Write, &who(Some(0), &[])),
            Err(Denied::NotWritable { .. })
        ));
    }
}
