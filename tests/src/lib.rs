//! keel-testkit (in progress)
pub mod fuzzing;
