//! Where data is stored: redb tables (store), the group-commit writer (commit), schema definitions (schema).

pub mod commit;
pub mod error;
pub mod hub;
pub mod mutation;
pub mod schema;
pub mod store;
