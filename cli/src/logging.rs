//! The `keel` binary's tracing subscriber: what keel's libraries log (a checkpoint line a
//! command job printed that could not be saved, a kill that failed, the metrics endpoint
//! refusing a connection, …) goes to stderr, one line each, stamped like the daemon's lines.
//!
//! `KEEL_LOG` chooses what is shown: comma-separated `LEVEL` or `TARGET=LEVEL` directives
//! (`warn`, `info,keel_runtime=debug`, `keel_cli::command_job=off`), where a target is a module
//! path prefix and the levels are `off`, `error`, `warn`, `info`, `debug` and `trace`. Unset or
//! empty means `warn`.
//!
//! A line a handler logs carries the attempt's span: `attempt{run=run-3 job=backup attempt=1
//! token=9}: keel_cli::command_job: checkpoint line not saved …`.
//!
//! The daemon prints every scheduler event itself (`daemon::print_events`), so the runtime's
//! tracing copy of those events is left out: the target `keel_runtime::observe`, unless
//! `KEEL_LOG` names it, and the driver's "store write failed" warning, which repeats the
//! daemon's `store write … failed` line.

use std::fmt;

use tracing::Metadata;
use tracing_subscriber::filter::{filter_fn, FilterExt, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::direct::wall_clock;

/// The environment variable that overrides the default filter.
const ENV: &str = "KEEL_LOG";

/// What is shown when `KEEL_LOG` is unset or empty.
const DEFAULT: &str = "warn";

/// The runtime's module that mirrors every scheduler event as a tracing event.
const EVENT_MIRROR: &str = "keel_runtime::observe";

/// Installs the subscriber. A `KEEL_LOG` that does not parse is reported on stderr and the
/// default is used: a logging setting never stops keel.
pub(crate) fn init() {
    let asked = std::env::var(ENV).unwrap_or_default();
    let (mut targets, problem) = match filter(&asked) {
        Ok(targets) => (targets, None),
        Err(e) => (
            filter(DEFAULT).expect("the default filter parses"),
            Some(format!(
                "keel: warning: {ENV}={asked:?} is not a log filter ({e}); showing warnings \
                 (use LEVEL or TARGET=LEVEL, comma-separated, as in \"info,keel_runtime=debug\")"
            )),
        ),
    };
    if problem.is_some() || !asked.contains(EVENT_MIRROR) {
        targets = targets.with_target(EVENT_MIRROR, tracing::level_filters::LevelFilter::OFF);
    }
    // The attempt span is always on, so that a warning a handler logs names its run.
    let shown = targets
        .or(filter_fn(is_attempt_span))
        .and(filter_fn(|meta| !repeats_an_event_line(meta)));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_timer(WallClock)
        .with_ansi(false)
        .with_filter(shown);
    // Fails only if a subscriber is already installed (a test harness, an embedding program).
    let _ = tracing_subscriber::registry().with(layer).try_init();
    if let Some(problem) = problem {
        eprintln!("{problem}");
    }
}

/// Parses a `KEEL_LOG` value (blanks around directives are ignored); empty is the default.
fn filter(text: &str) -> Result<Targets, String> {
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let text = if directives.is_empty() {
        DEFAULT.to_string()
    } else {
        directives.join(",")
    };
    text.parse::<Targets>().map_err(|e| e.to_string())
}

/// The span the runtime runs each attempt in: `attempt{run=run-3 job=backup attempt=1 token=9}`.
fn is_attempt_span(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.target() == "keel_runtime::driver" && meta.name() == "attempt"
}

/// The driver's warning for a failed store write: the daemon prints the same failure from its
/// `PersistFailed` event. (The only event of `keel_runtime::driver` with a `batch` field.)
fn repeats_an_event_line(meta: &Metadata<'_>) -> bool {
    meta.target() == "keel_runtime::driver" && meta.fields().field("batch").is_some()
}

/// The time as the daemon's own lines show it: `2026-11-21T09:30:48.473Z`.
struct WallClock;

impl FormatTime for WallClock {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write!(w, "{}", wall_clock())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn the_default_shows_warnings() {
        for text in ["", "  ", ",", "warn", " warn "] {
            let targets = filter(text).unwrap();
            assert_eq!(targets.default_level(), Some(LevelFilter::WARN), "{text:?}");
        }
    }

    #[test]
    fn targets_and_levels_parse() {
        let targets = filter("info, keel_runtime=debug,keel_cli::command_job=off").unwrap();
        assert_eq!(targets.default_level(), Some(LevelFilter::INFO));
        assert!(targets.would_enable("keel_runtime::driver", &tracing::Level::DEBUG));
        assert!(!targets.would_enable("keel_cli::command_job", &tracing::Level::ERROR));
        assert!(filter("keel_cli=loud").is_err());
        assert!(filter("a=b=c").is_err());
    }
}
