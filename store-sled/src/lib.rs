//! keel-store-sled: a keel store on sled.
//!
//! **Status: skeleton**, filled by the storage issue. Note for later: sled 0.34 flushes with
//! `sync_file_range`, which is not durable across power loss (sled issue 1452); this adapter
//! will guarantee process-crash safety only, and its docs will say so.
