//! The `keel` binary; everything is in the `keel_cli` library.

use std::process::ExitCode;

/// The daemon holds a million jobs in small allocations that come and go as they fire: with
/// glibc's malloc a million jobs held 2.2 GiB, with mimalloc 1.3 GiB (`docs/performance.md`,
/// *Issue 16, fifth step*). An application's choice, so here and not in the libraries:
/// programs that embed keel pick their own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keel_cli::main()
}
