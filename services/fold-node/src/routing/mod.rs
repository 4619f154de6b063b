//! Where a request is routed: the one operation pipeline (pipeline), schema-addressed reads ANY/ALL with retries and hedging (route), provider choice (balance).

pub mod balance;
pub mod pipeline;
pub mod route;
