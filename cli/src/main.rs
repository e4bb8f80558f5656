//! The `keel` binary; everything is in the `keel_cli` library.

use std::process::ExitCode;

fn main() -> ExitCode {
    keel_cli::main()
}
