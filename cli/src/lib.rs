//! The `keel` command-line tool: the daemon (`keel run`), management commands, and the
//! external worker protocol. `docs/cli.md` is the user guide; `keel --help` the reference.
//!
//! | module | what |
//! |---|---|
//! | `cli` | the command tree (clap) |
//! | `commands` | what each command does and prints |
//! | `daemon` | `keel run`: lock, runtime, control socket, event log, signals |
//! | `direct` | commands applied to the store when no daemon runs |
//! | `protocol` | the control socket's requests and responses |
//! | `client` | the socket's client side |
//! | `place` | the data directory: store, daemon lock, socket, records of running commands |
//! | `config` | keel.toml |
//! | `jobdef` | a job as flags or config, and its `JobSpec` |
//! | `command_job` | the handler of command jobs, and the kill of commands a crashed daemon left running |
//! | `doctor` | `keel doctor` |
//! | `logging` | the tracing subscriber: library warnings on stderr, `KEEL_LOG` |
//! | `show`, `table`, `duration` | human output and input |
//! | `whole_file` | small files written whole or not at all (temp file, sync, rename) |

#![warn(missing_docs)]

use std::process::ExitCode;

use clap::Parser;

mod anyhost;
mod cli;
mod client;
// Public so that a program embedding keel-runtime can run the same command jobs.
pub mod command_job;
mod commands;
mod config;
mod daemon;
mod direct;
mod doctor;
mod duration;
mod error;
mod fence_guard;
mod http;
mod jobdef;
mod lead;
mod logging;
mod place;
mod protocol;
mod remote;
mod show;
mod table;
mod views;
mod whole_file;

/// Runs `keel` with the process's arguments and returns its exit code (see `keel --help`).
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logging::init();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let message = failure.message();
            if !message.is_empty() {
                match failure {
                    error::Failure::NothingDue(_) => eprintln!("keel: {message}"),
                    _ => eprintln!("keel: error: {message}"),
                }
            }
            ExitCode::from(failure.exit_code())
        }
    }
}
