//! Where a request is checked: every outside string against its limit (bounds), who asks and how far they are trusted (identity, distance), field policies (permissions).

pub mod bounds;
pub mod identity;
pub mod permissions;
