//! keel-runtime: the tokio driver for keel-core.
//!
//! **Status: skeleton**, filled by the runtime issue. It will implement the driving loop that
//! `keel_core`'s crate docs describe: one clock, tokio timers for `poll_timeout`, effects
//! executed in order, store acknowledgements fed back.
