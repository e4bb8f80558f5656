//! keel-store-fs: the embedded default store (a data directory on the local filesystem).
//!
//! **Status: skeleton.** The durable implementation (checksummed append-only log, atomic
//! snapshots, advisory locking, crash and corruption tests) is the storage issue's work. Until
//! then, keel's executable example drives the core through `keel-testkit`'s in-memory store,
//! which implements the same persist-and-acknowledge protocol.
//!
//! The contract every store implements is described in `docs/architecture.md`: apply each
//! `keel_core::Batch` atomically and durably, in order, then acknowledge it; load a
//! `keel_core::Snapshot` to restore the core after a restart.
