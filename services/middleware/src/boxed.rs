//! The boxed error every layer of this crate passes on (tower's convention), in a module of its
//! own so that the layers and the error classification (`errors`) do not import each other.

/// Any error, boxed: what a tower layer's service returns when it wraps another.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
