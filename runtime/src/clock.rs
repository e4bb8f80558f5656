//! The runtime's one clock source.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_core::Timestamp;
use tokio::time::Instant;

/// Wall-clock time for the core, read as the wall clock at start plus tokio's monotonic time
/// since. Timers and `now` come from the same source, so a deadline the core asks for is the
/// instant a tokio timer fires, and tests that pause tokio's clock drive keel's clock too.
///
/// A wall clock stepped while the runtime runs (NTP, an operator) is not followed: the core
/// keeps firing on monotonic time, which is what a scheduler needs between restarts. The next
/// start reads the wall clock again, and the core clamps a clock set back below its persisted
/// high-water mark (SPEC S4).
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall: Timestamp,
    start: Instant,
}

impl Clock {
    /// A clock that starts at the system's wall-clock time.
    pub fn system() -> Clock {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let ms = i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX);
        Clock::starting_at(Timestamp(ms))
    }

    /// A clock that reads `wall` now (tests: with tokio's clock paused, time moves only when the
    /// test advances it).
    pub fn starting_at(wall: Timestamp) -> Clock {
        Clock {
            wall,
            start: Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.wall.plus_ms(elapsed)
    }

    /// The tokio instant at which the clock reads `at` (now, if `at` is past).
    pub fn instant_at(&self, at: Timestamp) -> Instant {
        let ms = at.ms_since(self.wall);
        self.start + Duration::from_millis(ms)
    }
}
