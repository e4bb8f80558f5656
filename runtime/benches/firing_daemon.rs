//! The firing benchmark (`firing.rs`) with the allocator of the `keel` daemon, mimalloc
//! (`cli/src/main.rs`), so that keel is measured as `keel run` runs it: a million hourly jobs
//! held 2.2 GiB with glibc's malloc and 1.3 GiB with mimalloc (`docs/performance.md`, *Issue
//! 16, fifth step*). Every case of the invocation, tokio-cron-scheduler's too, gets it.
//!
//! ```text
//! KEEL_BENCH_JOBS=1000000 KEEL_BENCH_PERIOD_S=3600 KEEL_BENCH_WINDOW_S=600 \
//!   KEEL_BENCH_LIBS=keel-sync cargo bench -p keel-runtime --bench firing_daemon
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "firing.rs"]
mod firing;

fn main() {
    firing::main();
}
