//! The `keel` binary; everything is in the `keel_cli` library.

use std::process::ExitCode;

/// The daemon holds a million jobs in small allocations that come and go as they fire; glibc's
/// malloc kept freed memory resident (2.2 GiB for a million jobs against mimalloc's 1.3 GiB,
/// `docs/performance.md`, *The allocator*). An application's choice, so here and not in the
/// libraries: programs that embed keel pick their own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keel_cli::main()
}
