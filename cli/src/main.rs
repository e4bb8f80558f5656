//! The `keel` binary. The daemon and management commands arrive with keel-runtime and the
//! durable stores; until then this binary only says where to look.

use std::process::ExitCode;

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    if matches!(arg.as_deref(), Some("--version") | Some("-V")) {
        println!("keel {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "keel {}: the daemon and management commands are not built yet.\n\
         To see keel-core at work, run: cargo run -p keel-testkit --example tour",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
