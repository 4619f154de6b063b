//! The rules of a mutation, apart from where it is stored: what a validated [`MutationPlan`]
//! is, and which cells it writes or why the data refuses it ([`check_plans`]: CREATE needs
//! fields without a current value, UPDATE and DELETE need a record that exists), checked for a
//! whole set before anything of it is written.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::error::StoreError;
use super::schema::Schema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MutationKind {
    Create,
    Update,
    Delete,
}

/// A mutation, already validated against the schema and the permissions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MutationPlan {
    pub kind: MutationKind,
    /// "" for Single schemas.
    pub range_key: String,
    /// Field → new value (ignored for deletions), in field order.
    pub writes: Vec<(String, Json)>,
    pub writer: String,
}

/// Why a mutation was refused by the data it met.
#[derive(Debug, thiserror::Error)]
pub enum MutationError {
    #[error("field '{field}' already has a value{at}; use UPDATE to change it")]
    AlreadyExists { field: String, at: String },
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("idempotency key '{0}' was already used for a different mutation; use a new key")]
    KeyReused(String),
}

/// A mutation the data refused.
impl From<MutationError> for crate::error::NodeError {
    fn from(e: MutationError) -> Self {
        match e {
            MutationError::AlreadyExists { .. } => {
                crate::error::NodeError::already_exists(e.to_string())
            }
            MutationError::Missing(_) => crate::error::NodeError::not_found(e.to_string()),
            MutationError::Store(e) => e.into(),
            MutationError::KeyReused(_) => {
                crate::error::NodeError::failed_precondition(e.to_string())
            }
        }
    }
}

/// Which cells a mutation writes (field → new value; ignored for deletions), or why the data
/// refuses it. `is_live` tells whether a field of the plan's record has a current value.
/// Check every plan of a set against the stored liveness (`stored(field, range key)`) and the
/// changes the earlier plans of the set will make: the fields and values each plan writes, or
/// the first refusal with its plan's index.
pub(crate) fn check_plans(
    schema: &Schema,
    plans: &[MutationPlan],
    stored: &dyn Fn(&str, &str) -> Result<bool, StoreError>,
) -> Result<Vec<Vec<(String, Json)>>, ApplyError> {
    // The liveness changes the earlier plans of this set will make, keyed by (field, range key).
    let mut overlay: HashMap<(String, String), bool> = HashMap::new();
    let mut all_targets = Vec::with_capacity(plans.len());
    for (index, plan) in plans.iter().enumerate() {
        let rk = plan.range_key.as_str();
        let mut is_live = |f: &str| -> Result<bool, StoreError> {
            if let Some(v) = overlay.get(&(f.to_string(), rk.to_string())) {
                return Ok(*v);
            }
            stored(f, rk)
        };
        let targets = plan_targets(schema, plan, &mut is_live).map_err(|error| match error {
            MutationError::Store(e) => ApplyError::Store(e),
            error => ApplyError::Refused { index, error },
        })?;
        let now_live = plan.kind != MutationKind::Delete;
        for (f, _) in &targets {
            overlay.insert((f.clone(), rk.to_string()), now_live);
        }
        all_targets.push(targets);
    }
    Ok(all_targets)
}

fn plan_targets(
    schema: &Schema,
    plan: &MutationPlan,
    is_live: &mut dyn FnMut(&str) -> Result<bool, StoreError>,
) -> Result<Vec<(String, Json)>, MutationError> {
    let name = schema.name.as_str();
    let rk = plan.range_key.as_str();
    let at = if rk.is_empty() {
        String::new()
    } else {
        format!(" at key '{rk}'")
    };
    let mut targets: Vec<(String, Json)> = Vec::new();
    match plan.kind {
        MutationKind::Create => {
            for (f, v) in &plan.writes {
                let is_range_key = Some(f.as_str()) == schema.range_key();
                if is_live(f)? {
                    if is_range_key {
                        continue; // the row exists; adding other fields to it is fine
                    }
                    return Err(MutationError::AlreadyExists {
                        field: f.clone(),
                        at: at.clone(),
                    });
                }
                targets.push((f.clone(), v.clone()));
            }
        }
        MutationKind::Update => {
            let exists = match schema.range_key() {
                Some(k) => is_live(k)?,
                None => {
                    let mut any = false;
                    for f in schema.fields.keys() {
                        if is_live(f)? {
                            any = true;
                            break;
                        }
                    }
                    any
                }
            };
            if !exists {
                return Err(MutationError::Missing(if rk.is_empty() {
                    format!("schema '{name}' has no values yet; use CREATE first")
                } else {
                    format!("no record{at} in schema '{name}'; use CREATE first")
                }));
            }
            for (f, v) in &plan.writes {
                if Some(f.as_str()) == schema.range_key() {
                    continue; // the key locates the row; rewriting it changes nothing
                }
                targets.push((f.clone(), v.clone()));
            }
        }
        MutationKind::Delete => {
            for (f, _) in &plan.writes {
                if is_live(f)? {
                    targets.push((f.clone(), Json::Null));
                }
            }
            if targets.is_empty() {
                return Err(MutationError::Missing(format!(
                    "nothing to delete{at}: none of the named fields has a value"
                )));
            }
        }
    }
    if targets.is_empty() {
        return Err(MutationError::Missing(format!(
            "nothing to write{at}: name at least one field besides the range key"
        )));
    }
    Ok(targets)
}

/// Why a set of mutations applied to a `WriteGroup` was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The data refused mutation `index` of the set; the group is unchanged by the whole set.
    #[error("mutation {index}: {error}")]
    Refused { index: usize, error: MutationError },
    /// Storage failed; the group's transaction must be abandoned (nothing of it is committed).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<redb::StorageError> for ApplyError {
    fn from(e: redb::StorageError) -> Self {
        ApplyError::Store(e.into())
    }
}
