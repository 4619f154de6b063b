//! Where an operation executes: here or forwarded (execute), on the data (data: checks, queries, mutations, history), filters, paging tokens, subscriptions and their change hub, client slots.

pub mod data;
pub mod execute;
pub mod paging;
pub mod slots;
pub mod subscribe;
