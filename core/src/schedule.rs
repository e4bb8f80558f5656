//! Schedules: when a job fires.
//!
//! Three kinds (SPEC S1): cron with a seconds field and an IANA zone per job, one-shot at an
//! instant, and a fixed interval from an anchor. A [`ScheduleSpec`] is the unvalidated form that
//! users write and stores persist; [`Schedule::parse`] turns it into a [`Schedule`] or a
//! [`ScheduleError`] that names the field at fault. Nothing deeper re-validates.
//!
//! # Fire times
//!
//! [`Schedule::next_after`] is the first slot strictly after an instant. The scheduler keeps a
//! per-job cursor (the next slot not yet fired) and advances it with `next_after` **before** a
//! run starts (SPEC S2), so a slot can never be fired twice and a schedule that runs out of
//! slots is noticed at once.
//!
//! # Daylight saving time (SPEC S3)
//!
//! Cron slots are wall-clock times in the job's zone, resolved by `croner` (pinned), which
//! follows the Open Cron Pattern Specification:
//!
//! - spring-forward gap: a fixed-time job (numbers in its second, minute and hour fields) whose
//!   time does not exist that day fires once, at the first valid instant after the gap; a
//!   wildcard or stepped job simply has no slots inside the gap.
//! - fall-back overlap: a fixed-time job fires once, at the first pass of the repeated time; a
//!   wildcard or stepped job fires in both passes, because those are distinct real instants
//!   (every 15 minutes means every 15 real minutes).
//!
//! # Misfires (SPEC S4)
//!
//! A slot is *missed* when the scheduler reaches it more than a grace period late, or when a
//! later slot is also due by then (the process was down, the event loop stalled, the clock
//! jumped forward). [`Schedule::resolve_due`] applies
//! the job's [`MisfirePolicy`] and never enumerates more than [`limits::CATCH_UP_MAX`] slots: the
//! latest missed slot is found by searching backwards from `now`, not by walking forwards.

use std::fmt;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::{Cron, Direction};
use serde::{Deserialize, Serialize};

use crate::limits;
use crate::time::Timestamp;

/// A schedule as written by a user or read from a store: not yet validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ScheduleSpec {
    /// A cron expression (6 fields with seconds, or 5 with seconds = 0; no year field),
    /// evaluated in an IANA time zone such as `America/New_York`.
    Cron {
        /// The expression, e.g. `0 30 2 * * *`.
        expr: Arc<str>,
        /// The IANA zone name; `UTC` for UTC.
        zone: Arc<str>,
    },
    /// Fires once at an instant.
    Once {
        /// The instant.
        at: Timestamp,
    },
    /// Fires every `interval_ms`, on the grid `anchor + k * interval_ms`.
    Every {
        /// The interval; at least [`INTERVAL_MIN_MS`].
        interval_ms: u64,
        /// An instant on the grid; slots before it do not exist.
        anchor: Timestamp,
    },
}

impl ScheduleSpec {
    /// A cron expression in UTC (6 fields with seconds, or 5): `ScheduleSpec::cron("*/5 * * * *")`.
    /// Validated when the job is added.
    pub fn cron(expr: &str) -> ScheduleSpec {
        ScheduleSpec::cron_in(expr, "UTC")
    }

    /// A cron expression in an IANA zone: `ScheduleSpec::cron_in("0 30 2 * * *",
    /// "Europe/Paris")`.
    pub fn cron_in(expr: &str, zone: &str) -> ScheduleSpec {
        ScheduleSpec::Cron {
            expr: expr.into(),
            zone: zone.into(),
        }
    }

    /// Every `interval`, on a grid anchored at the Unix epoch: `every(5 minutes)` fires at
    /// :00, :05, :10... UTC. At least [`INTERVAL_MIN_MS`].
    pub fn every(interval: std::time::Duration) -> ScheduleSpec {
        ScheduleSpec::Every {
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            anchor: Timestamp(0),
        }
    }

    /// Once, at `at`.
    pub fn once(at: Timestamp) -> ScheduleSpec {
        ScheduleSpec::Once { at }
    }
}

/// The shortest fixed interval accepted: one second, the resolution of cron.
pub const INTERVAL_MIN_MS: u64 = 1_000;

/// A validated schedule. Construct it with [`Schedule::parse`] or the kind-specific helpers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    // A parsed `croner::Cron` holds kilobytes of bitfields (one bit per year up to 5000), so a
    // job keeps only the text and re-parses, for a narrow window of years, when it needs a fire
    // time. This keeps an idle cron job small enough for a million of them
    // (docs/performance.md).
    Cron { expr: Box<str>, zone: Tz },
    Once { at: Timestamp },
    Every { interval_ms: u64, anchor: Timestamp },
}

/// The part of a schedule a [`ScheduleError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleField {
    /// The cron expression as a whole (field count, length, a combination of fields).
    Expression,
    /// The seconds field.
    Second,
    /// The minutes field.
    Minute,
    /// The hours field.
    Hour,
    /// The day-of-month field.
    DayOfMonth,
    /// The month field.
    Month,
    /// The day-of-week field.
    DayOfWeek,
    /// The time zone.
    Zone,
    /// The interval length.
    Interval,
    /// The schedule as a whole: it is valid but has no slot left.
    Schedule,
}

impl fmt::Display for ScheduleField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleField::Expression => "expression",
            ScheduleField::Second => "second",
            ScheduleField::Minute => "minute",
            ScheduleField::Hour => "hour",
            ScheduleField::DayOfMonth => "day-of-month",
            ScheduleField::Month => "month",
            ScheduleField::DayOfWeek => "day-of-week",
            ScheduleField::Zone => "zone",
            ScheduleField::Interval => "interval",
            ScheduleField::Schedule => "schedule",
        })
    }
}

/// Why a schedule was refused. Each variant names the field at fault ([`ScheduleError::field`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The cron expression does not parse.
    #[error("cron expression {expr:?}: {field} field: {reason}")]
    InvalidCron {
        /// The expression as given.
        expr: String,
        /// The field that failed to parse.
        field: ScheduleField,
        /// What was wrong with it.
        reason: String,
    },
    /// The zone is not in the IANA database compiled into keel.
    #[error("time zone {zone:?} is not a known IANA time zone (e.g. \"Europe/Paris\", \"UTC\")")]
    UnknownZone {
        /// The zone as given.
        zone: String,
    },
    /// The interval is shorter than [`INTERVAL_MIN_MS`].
    #[error("interval of {interval_ms} ms is shorter than the minimum of {INTERVAL_MIN_MS} ms")]
    IntervalTooShort {
        /// The interval as given.
        interval_ms: u64,
    },
    /// The schedule is valid but has no slot after the given instant (a cron expression for
    /// 30 February, a one-shot in the past under the `skip` misfire policy).
    #[error("schedule {schedule} never fires after {after}")]
    NeverFires {
        /// The schedule, displayed.
        schedule: String,
        /// The instant after which no slot exists.
        after: Timestamp,
    },
}

impl ScheduleError {
    /// The field this error is about.
    pub fn field(&self) -> ScheduleField {
        match self {
            ScheduleError::InvalidCron { field, .. } => *field,
            ScheduleError::UnknownZone { .. } => ScheduleField::Zone,
            ScheduleError::IntervalTooShort { .. } => ScheduleField::Interval,
            ScheduleError::NeverFires { .. } => ScheduleField::Schedule,
        }
    }
}

/// What to do with slots that were missed (SPEC S4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "policy")]
pub enum MisfirePolicy {
    /// Fire once now for all the missed slots (the latest one), then continue on schedule.
    #[default]
    FireOnceNow,
    /// Drop missed slots; continue with the next slot in the future.
    Skip,
    /// Fire each missed slot, oldest first, but at most `max` of them (the most recent ones);
    /// `max` is at most [`limits::CATCH_UP_MAX`].
    CatchUp {
        /// How many missed slots to fire at most.
        max: u32,
    },
}

/// The policy as users write it: `fire-once-now`, `skip`, `catch-up:N`.
impl fmt::Display for MisfirePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MisfirePolicy::FireOnceNow => f.write_str("fire-once-now"),
            MisfirePolicy::Skip => f.write_str("skip"),
            MisfirePolicy::CatchUp { max } => write!(f, "catch-up:{max}"),
        }
    }
}

/// The slots a due job fires now, decided by [`Schedule::resolve_due`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// Slots to fire, oldest first. Empty when the misfire policy skipped them all.
    pub fire: Vec<Timestamp>,
    /// Slots that were passed over, with the policy's reason; zero when none were.
    pub dropped: SlotCount,
    /// True if the cursor was reached later than the grace period (the policy applied).
    pub misfired: bool,
    /// The job's new cursor: the first slot after everything above, or `None` if the schedule
    /// has no more slots.
    pub next: Option<Timestamp>,
}

/// A count of slots that is exact up to a bound and says so when it is not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCount {
    /// Slots counted.
    pub counted: u32,
    /// True if counting stopped at the bound and there may be more.
    pub at_least: bool,
}

impl fmt::Display for SlotCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.at_least {
            write!(f, "at least {}", self.counted)
        } else {
            write!(f, "{}", self.counted)
        }
    }
}

impl Schedule {
    /// Validates a spec.
    pub fn parse(spec: &ScheduleSpec) -> Result<Self, ScheduleError> {
        match spec {
            ScheduleSpec::Cron { expr, zone } => Schedule::cron(expr, zone),
            ScheduleSpec::Once { at } => Ok(Schedule::once(*at)),
            ScheduleSpec::Every {
                interval_ms,
                anchor,
            } => Schedule::every(*interval_ms, *anchor),
        }
    }

    /// Rebuilds a schedule from a spec that was validated before (by [`Schedule::parse`]),
    /// skipping the cron syntax check; `None` if the spec is not even well-formed. Slot
    /// computations on an expression that does not parse find no slot.
    pub(crate) fn parse_trusted(spec: &ScheduleSpec) -> Option<Self> {
        let kind = match spec {
            ScheduleSpec::Cron { expr, zone } => Kind::Cron {
                expr: expr.trim().into(),
                zone: zone.parse().ok()?,
            },
            ScheduleSpec::Once { at } => Kind::Once { at: *at },
            ScheduleSpec::Every {
                interval_ms,
                anchor,
            } => {
                if *interval_ms < INTERVAL_MIN_MS {
                    return None;
                }
                Kind::Every {
                    interval_ms: *interval_ms,
                    anchor: *anchor,
                }
            }
        };
        Some(Schedule { kind })
    }

    /// A cron schedule in an IANA zone.
    pub fn cron(expr: &str, zone: &str) -> Result<Self, ScheduleError> {
        let zone: Tz = zone.parse().map_err(|_| ScheduleError::UnknownZone {
            zone: zone.to_owned(),
        })?;
        let expr = expr.trim();
        parse_cron(expr)?;
        Ok(Schedule {
            kind: Kind::Cron {
                expr: expr.into(),
                zone,
            },
        })
    }

    /// A one-shot schedule.
    pub fn once(at: Timestamp) -> Self {
        Schedule {
            kind: Kind::Once { at },
        }
    }

    /// A fixed-interval schedule on the grid `anchor + k * interval_ms`.
    pub fn every(interval_ms: u64, anchor: Timestamp) -> Result<Self, ScheduleError> {
        if interval_ms < INTERVAL_MIN_MS {
            return Err(ScheduleError::IntervalTooShort { interval_ms });
        }
        Ok(Schedule {
            kind: Kind::Every {
                interval_ms,
                anchor,
            },
        })
    }

    /// The spec this schedule was parsed from, for persisting.
    pub fn spec(&self) -> ScheduleSpec {
        match &self.kind {
            Kind::Cron { expr, zone } => ScheduleSpec::Cron {
                expr: Arc::from(&**expr),
                zone: Arc::from(zone.name()),
            },
            Kind::Once { at } => ScheduleSpec::Once { at: *at },
            Kind::Every {
                interval_ms,
                anchor,
            } => ScheduleSpec::Every {
                interval_ms: *interval_ms,
                anchor: *anchor,
            },
        }
    }

    /// True for cron and interval schedules, false for one-shots.
    pub fn is_recurring(&self) -> bool {
        !matches!(self.kind, Kind::Once { .. })
    }

    /// The first slot strictly after `t`, or `None` if there is none (a one-shot already past,
    /// a cron expression with no slot within `limits::CRON_SEARCH_YEARS` years).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.next_in(&self.window(t, t), t)
    }

    /// The latest slot at or before `t`, if any.
    pub fn latest_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        self.latest_in(&self.window(t, t), t)
    }

    /// Decides which slots fire now for a job whose cursor (its next unfired slot) is at or
    /// before `now`.
    ///
    /// A cursor reached within `grace_ms` is on time: it fires, and the cursor moves to the
    /// next slot (which the scheduler handles in the same tick if it is also due). A cursor
    /// reached later than that is a misfire, and `policy` decides. At most
    /// [`limits::CATCH_UP_MAX`] slots are ever enumerated.
    pub fn resolve_due(
        &self,
        cursor: Timestamp,
        now: Timestamp,
        policy: MisfirePolicy,
        grace_ms: u64,
    ) -> Due {
        debug_assert!(
            cursor <= now,
            "resolve_due called for a cursor in the future"
        );
        // One cron parse serves every slot computed below.
        let w = self.window(cursor, now);
        let after_cursor = self.next_in(&w, cursor);
        // On time: the cursor is the only slot due, and it is late by no more than the grace.
        // Two or more slots due at once are a misfire however short the stall, so a 59-second
        // stall does not fire 59 runs where a 61-second one fires one.
        let only_one_due = after_cursor.is_none_or(|next| next > now);
        if only_one_due && now.ms_since(cursor) <= grace_ms {
            return Due {
                fire: vec![cursor],
                dropped: SlotCount::default(),
                misfired: false,
                next: after_cursor,
            };
        }
        // Every slot in cursor..=latest was missed. `latest` exists because `cursor` itself is
        // a slot at or before `now`; fall back to it if the schedule cannot say.
        let latest = self.latest_in(&w, now).unwrap_or(cursor).max(cursor);
        let next = self.next_in(&w, latest);
        match policy {
            MisfirePolicy::Skip => {
                // The latest slot may itself be on time even though older ones were missed.
                if now.ms_since(latest) <= grace_ms {
                    let dropped = self.count_slots(&w, cursor, latest, limits::CATCH_UP_MAX);
                    Due {
                        fire: vec![latest],
                        dropped,
                        misfired: true,
                        next,
                    }
                } else {
                    let dropped = self.count_slots_inclusive(&w, cursor, latest);
                    Due {
                        fire: Vec::new(),
                        dropped,
                        misfired: true,
                        next,
                    }
                }
            }
            MisfirePolicy::FireOnceNow => Due {
                fire: vec![latest],
                dropped: self.count_slots(&w, cursor, latest, limits::CATCH_UP_MAX),
                misfired: true,
                next,
            },
            MisfirePolicy::CatchUp { max } => {
                let max = max.clamp(1, limits::CATCH_UP_MAX);
                let fire = self.latest_slots(&w, cursor, latest, max);
                let oldest_fired = fire.first().copied().unwrap_or(latest);
                Due {
                    dropped: self.count_slots(&w, cursor, oldest_fired, limits::CATCH_UP_MAX),
                    fire,
                    misfired: true,
                    next,
                }
            }
        }
    }

    /// Counts slots in `from..to` (half-open), stopping at `cap`.
    fn count_slots(&self, w: &Window, from: Timestamp, to: Timestamp, cap: u32) -> SlotCount {
        let mut counted = 0;
        let mut slot = Some(from);
        while let Some(s) = slot {
            if s >= to {
                break;
            }
            if counted == cap {
                return SlotCount {
                    counted,
                    at_least: true,
                };
            }
            counted += 1;
            slot = self.next_in(w, s);
        }
        SlotCount {
            counted,
            at_least: false,
        }
    }

    fn count_slots_inclusive(&self, w: &Window, from: Timestamp, to: Timestamp) -> SlotCount {
        let mut count = self.count_slots(w, from, to, limits::CATCH_UP_MAX);
        if !count.at_least {
            count.counted += 1;
        }
        count
    }

    /// Up to `max` slots in `from..=to`, the most recent ones, oldest first. Walks backwards
    /// from `to`, so the cost is bounded by `max` whatever the gap.
    fn latest_slots(&self, w: &Window, from: Timestamp, to: Timestamp, max: u32) -> Vec<Timestamp> {
        let mut slots = Vec::new();
        let mut slot = Some(to);
        while let Some(s) = slot {
            if s < from || slots.len() == max as usize {
                break;
            }
            slots.push(s);
            slot = s
                .as_millis()
                .checked_sub(1)
                .and_then(|before| self.latest_in(w, Timestamp(before)));
        }
        slots.reverse();
        slots
    }
}

/// A cron expression parsed for a window of years around the instants an operation looks at.
///
/// croner fills a bitfield for every year of an absent year field (year 1 to 5000), which makes
/// one parse cost about 16 µs; with an explicit window of a few years it costs about 3 µs. A
/// search that finds its answer inside the window has found the same answer as an unbounded
/// search (the window is a contiguous range of years containing the start), and one that does
/// not falls back to the full range, so the window changes cost, never results.
struct Window {
    cron: Option<Cron>,
}

impl Schedule {
    /// Parses a cron schedule for the years from `from` to `to`, padded by one year each side.
    fn window(&self, from: Timestamp, to: Timestamp) -> Window {
        self.window_years(from, -1, to, 1)
    }

    /// Parses a cron schedule for the years of `from` plus `from_pad` to `to` plus `to_pad`.
    fn window_years(&self, from: Timestamp, from_pad: i32, to: Timestamp, to_pad: i32) -> Window {
        let Kind::Cron { expr, zone } = &self.kind else {
            return Window { cron: None };
        };
        let year = |t: Timestamp, pad: i32| {
            zone_time(*zone, t)
                .map(|d| chrono::Datelike::year(&d).saturating_add(pad))
                .unwrap_or(1970)
                .clamp(1, 4999)
        };
        Window {
            cron: parse_cron_years(expr, Some((year(from, from_pad), year(to, to_pad)))),
        }
    }

    /// The first cron slot after `t` (forward) or the latest at or before it (backward): in the
    /// window if it is there, else in a bounded span of years, never croner's 1-5000.
    fn cron_search(
        &self,
        w: &Window,
        expr: &str,
        zone: Tz,
        t: Timestamp,
        direction: Direction,
    ) -> Option<Timestamp> {
        let start = zone_time(zone, floor_to_second(t))?;
        let search = |cron: &Cron| match direction {
            Direction::Forward => cron.find_next_occurrence(&start, false).ok(),
            Direction::Backward => cron.find_previous_occurrence(&start, true).ok(),
        };
        if let Some(found) = w.cron.as_ref().and_then(search) {
            return Some(Timestamp::from(found));
        }
        let wide = match direction {
            Direction::Forward => self.window_years(t, -1, t, limits::CRON_SEARCH_YEARS),
            Direction::Backward => self.window_years(t, -limits::CRON_SEARCH_YEARS, t, 1),
        };
        let cron = wide.cron.or_else(|| parse_cron_years(expr, None))?;
        search(&cron).map(Timestamp::from)
    }

    fn next_in(&self, w: &Window, t: Timestamp) -> Option<Timestamp> {
        match &self.kind {
            Kind::Cron { expr, zone } => self.cron_search(w, expr, *zone, t, Direction::Forward),
            Kind::Once { at } => (*at > t).then_some(*at),
            Kind::Every {
                interval_ms,
                anchor,
            } => {
                if t < *anchor {
                    return Some(*anchor);
                }
                every_slot(*anchor, *interval_ms, t, 1)
            }
        }
    }

    fn latest_in(&self, w: &Window, t: Timestamp) -> Option<Timestamp> {
        match &self.kind {
            Kind::Cron { expr, zone } => self.cron_search(w, expr, *zone, t, Direction::Backward),
            Kind::Once { at } => (*at <= t).then_some(*at),
            Kind::Every {
                interval_ms,
                anchor,
            } => {
                if t < *anchor {
                    return None;
                }
                every_slot(*anchor, *interval_ms, t, 0)
            }
        }
    }
}

/// Parses a valid expression, restricted to `years` when the expression has no year field of
/// its own (5 or 6 fields). `None` if it does not parse (it was validated when the job was
/// added, so only stored data from elsewhere can get here).
fn parse_cron_years(expr: &str, years: Option<(i32, i32)>) -> Option<Cron> {
    let parser = CronParser::builder().seconds(Seconds::Optional).build();
    let fields = expr.split_whitespace().count();
    let windowed = match (years, fields) {
        (Some((from, to)), 5) => Some(format!("0 {expr} {from}-{to}")),
        (Some((from, to)), 6) => Some(format!("{expr} {from}-{to}")),
        _ => None,
    };
    match windowed {
        Some(text) => parser.parse(&text).ok(),
        None => parser.parse(expr).ok(),
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Cron { expr, zone } => write!(f, "cron \"{expr}\" in {}", zone.name()),
            Kind::Once { at } => write!(f, "once at {at}"),
            Kind::Every {
                interval_ms,
                anchor,
            } => write!(f, "every {interval_ms} ms from {anchor}"),
        }
    }
}

/// Parses a cron expression; on failure, finds which field is at fault by parsing each field
/// alone in an otherwise all-wildcard expression.
fn parse_cron(expr: &str) -> Result<(), ScheduleError> {
    let invalid = |field, reason: String| ScheduleError::InvalidCron {
        expr: expr.to_owned(),
        field,
        reason,
    };
    if expr.len() > limits::CRON_EXPR_MAX_BYTES {
        return Err(invalid(
            ScheduleField::Expression,
            format!("longer than {} bytes", limits::CRON_EXPR_MAX_BYTES),
        ));
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let is_nickname = fields.len() == 1 && fields[0].starts_with('@');
    if !is_nickname && !(5..=6).contains(&fields.len()) {
        return Err(invalid(
            ScheduleField::Expression,
            format!(
                "has {} fields; expected 6 (second minute hour day-of-month month day-of-week) \
                 or 5 (seconds = 0); keel has no year field",
                fields.len()
            ),
        ));
    }
    let names: &[ScheduleField] = if fields.len() == 5 {
        &FIELDS[1..6]
    } else {
        &FIELDS[..6]
    };
    // croner accepts an empty item in a list (",", "1,,2") as a field that matches nothing,
    // and then searches for a slot that cannot exist.
    if !is_nickname {
        for (field, name) in fields.iter().zip(names) {
            if field.split(',').any(str::is_empty) {
                let reason = format!("{field:?} has an empty item in its list");
                return Err(invalid(*name, reason));
            }
        }
    }
    // Fast path: a valid expression also parses with a narrow year window (see `Window`).
    if !is_nickname && parse_cron_years(expr, Some((2000, 2001))).is_some() {
        return Ok(());
    }
    let parser = CronParser::builder().seconds(Seconds::Optional).build();
    let error = match parser.parse(expr) {
        Ok(_) => return Ok(()),
        Err(e) => e.to_string(),
    };
    if is_nickname {
        return Err(invalid(ScheduleField::Expression, error));
    }
    for (i, name) in names.iter().enumerate() {
        let probe: Vec<&str> = (0..fields.len())
            .map(|j| if i == j { fields[j] } else { "*" })
            .collect();
        if let Err(e) = parser.parse(&probe.join(" ")) {
            let reason = format!(
                "{:?} is not valid ({e}); allowed: {}",
                fields[i],
                allowed(*name)
            );
            return Err(invalid(*name, reason));
        }
    }
    Err(invalid(ScheduleField::Expression, error))
}

/// The values a field accepts, for error messages.
fn allowed(field: ScheduleField) -> &'static str {
    match field {
        ScheduleField::Second | ScheduleField::Minute => "0-59",
        ScheduleField::Hour => "0-23",
        ScheduleField::DayOfMonth => "1-31, L (last day), nW (nearest weekday)",
        ScheduleField::Month => "1-12 or JAN-DEC",
        ScheduleField::DayOfWeek => "0-7 or SUN-SAT (0 and 7 are Sunday), n#k, nL",
        _ => "see the field's documentation",
    }
}

const FIELDS: [ScheduleField; 6] = [
    ScheduleField::Second,
    ScheduleField::Minute,
    ScheduleField::Hour,
    ScheduleField::DayOfMonth,
    ScheduleField::Month,
    ScheduleField::DayOfWeek,
];

/// The grid point `anchor + (k + extra) * interval` where `k` is the number of whole intervals
/// from `anchor` to `t` (`t >= anchor`), or `None` if it is past the last representable
/// instant. Computed in 128 bits: a saturated result would be an instant off the grid.
fn every_slot(anchor: Timestamp, interval_ms: u64, t: Timestamp, extra: i128) -> Option<Timestamp> {
    let interval = i128::from(interval_ms);
    let whole = (i128::from(t.as_millis()) - i128::from(anchor.as_millis())) / interval;
    let slot = i128::from(anchor.as_millis()) + (whole + extra) * interval;
    i64::try_from(slot).ok().map(Timestamp)
}

fn floor_to_second(t: Timestamp) -> Timestamp {
    Timestamp(t.as_millis().div_euclid(1000) * 1000)
}

fn zone_time(zone: Tz, t: Timestamp) -> Option<chrono::DateTime<Tz>> {
    Some(
        Utc.timestamp_millis_opt(t.as_millis())
            .single()?
            .with_timezone(&zone),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).unwrap()
    }

    fn ny(expr: &str) -> Schedule {
        Schedule::cron(expr, "America/New_York").unwrap()
    }

    #[test]
    fn cron_errors_name_the_field() {
        let e = Schedule::cron("0 0 25 * * *", "UTC").unwrap_err();
        assert_eq!(e.field(), ScheduleField::Hour, "{e}");
        assert!(e.to_string().contains("\"25\" is not valid"), "{e}");
        assert!(e.to_string().contains("allowed: 0-23"), "{e}");
        let e = Schedule::cron("61 0 * * *", "UTC").unwrap_err();
        assert_eq!(e.field(), ScheduleField::Minute, "{e}");
        let e = Schedule::cron("* * * * * FOO", "UTC").unwrap_err();
        assert_eq!(e.field(), ScheduleField::DayOfWeek, "{e}");
        let e = Schedule::cron("* *", "UTC").unwrap_err();
        assert_eq!(e.field(), ScheduleField::Expression, "{e}");
        assert!(e.to_string().contains("has 2 fields"), "{e}");
        let e = Schedule::cron("0 0 * * *", "Mars/Olympus").unwrap_err();
        assert_eq!(e.field(), ScheduleField::Zone);
        assert!(e.to_string().contains("Mars/Olympus"));
    }

    #[test]
    fn empty_list_items_are_refused_with_the_field_named() {
        // Once accepted, and then searched for years: add_job took a minute in a debug build.
        for (expr, field) in [
            (", * * * * *", ScheduleField::Second),
            ("0 , * * * *", ScheduleField::Minute),
            ("0 0 1,,2 * * *", ScheduleField::Hour),
            ("0 0 0 * * 1,", ScheduleField::DayOfWeek),
        ] {
            let e = Schedule::cron(expr, "UTC").unwrap_err();
            assert_eq!(e.field(), field, "{expr}: {e}");
            assert!(e.to_string().contains("empty item"), "{e}");
        }
    }

    #[test]
    fn interval_must_be_at_least_a_second() {
        let e = Schedule::every(999, Timestamp(0)).unwrap_err();
        assert_eq!(e.field(), ScheduleField::Interval);
        assert!(Schedule::every(1000, Timestamp(0)).is_ok());
    }

    #[test]
    fn five_field_cron_means_second_zero() {
        let s = Schedule::cron("*/5 * * * *", "UTC").unwrap();
        assert_eq!(
            s.next_after(ts("2026-01-01T00:01:30Z")),
            Some(ts("2026-01-01T00:05:00Z"))
        );
    }

    #[test]
    fn seconds_field_is_honoured() {
        let s = Schedule::cron("*/10 * * * * *", "UTC").unwrap();
        assert_eq!(
            s.next_after(ts("2026-01-01T00:00:00.500Z")),
            Some(ts("2026-01-01T00:00:10Z"))
        );
    }

    #[test]
    fn next_after_is_strictly_after() {
        let s = Schedule::cron("0 * * * * *", "UTC").unwrap();
        let t = ts("2026-01-01T00:01:00Z");
        assert_eq!(s.next_after(t), Some(ts("2026-01-01T00:02:00Z")));
        let e = Schedule::every(60_000, t).unwrap();
        assert_eq!(e.next_after(t), Some(ts("2026-01-01T00:02:00Z")));
        assert_eq!(Schedule::once(t).next_after(t), None);
    }

    #[test]
    fn slots_beyond_the_year_window_are_still_found() {
        let leap = Schedule::cron("0 0 0 29 2 *", "UTC").unwrap();
        // 2100 is not a leap year: the next 29 February after 2097 is in 2104.
        assert_eq!(
            leap.next_after(ts("2097-03-01T00:00:00Z")),
            Some(ts("2104-02-29T00:00:00Z"))
        );
        assert_eq!(
            leap.latest_at_or_before(ts("2103-12-31T00:00:00Z")),
            Some(ts("2096-02-29T00:00:00Z"))
        );
        let e = Schedule::cron("0 0 0 1 1 * 2030", "UTC").unwrap_err();
        assert!(e.to_string().contains("no year field"), "{e}");
    }

    #[test]
    fn huge_intervals_end_the_schedule_instead_of_saturating() {
        // Found by the schedule_parse fuzz target (fuzz/regressions/schedule_parse/).
        let s = Schedule::every(u64::MAX, Timestamp(i64::MIN + 1)).unwrap();
        let t = ts("2026-01-01T00:00:00Z");
        assert_eq!(s.next_after(t), None);
        assert_eq!(s.latest_at_or_before(t), Some(Timestamp(i64::MIN + 1)));
        let s = Schedule::every(u64::MAX / 2 + 1, Timestamp(0)).unwrap();
        assert_eq!(s.next_after(Timestamp(1)), None);
        let near_end = Schedule::every(2_000, Timestamp(i64::MAX - 1_500)).unwrap();
        assert_eq!(near_end.next_after(Timestamp(i64::MAX - 1_500)), None);
    }

    #[test]
    fn impossible_date_has_no_next() {
        let s = Schedule::cron("0 0 0 30 2 *", "UTC").unwrap();
        assert_eq!(s.next_after(ts("2026-01-01T00:00:00Z")), None);
    }

    // SPEC S3, pinned for America/New_York on 2026-03-08: clocks go from 02:00 EST to 03:00 EDT.
    #[test]
    fn dst_spring_forward_daily_job_fires_once_after_the_gap() {
        let s = ny("0 30 2 * * *");
        let day_before = s.next_after(ts("2026-03-07T00:00:00Z")).unwrap();
        assert_eq!(day_before, ts("2026-03-07T07:30:00Z")); // 02:30 EST
        let gap_day = s.next_after(day_before).unwrap();
        assert_eq!(gap_day, ts("2026-03-08T07:00:00Z")); // 03:00 EDT, first instant after the gap
        let day_after = s.next_after(gap_day).unwrap();
        assert_eq!(day_after, ts("2026-03-09T06:30:00Z")); // 02:30 EDT
    }

    #[test]
    fn dst_spring_forward_wildcard_job_has_no_slots_in_the_gap() {
        let s = ny("0 */30 * * * *");
        let before = s.next_after(ts("2026-03-08T06:15:00Z")).unwrap();
        assert_eq!(before, ts("2026-03-08T06:30:00Z")); // 01:30 EST
        assert_eq!(s.next_after(before), Some(ts("2026-03-08T07:00:00Z"))); // 03:00 EDT
    }

    // SPEC S3, pinned for 2026-11-01: clocks go from 02:00 EDT back to 01:00 EST.
    #[test]
    fn dst_fall_back_daily_job_fires_once() {
        let s = ny("0 30 1 * * *");
        let first = s.next_after(ts("2026-11-01T00:00:00Z")).unwrap();
        assert_eq!(first, ts("2026-11-01T05:30:00Z")); // 01:30 EDT, the first pass
        let next = s.next_after(first).unwrap();
        assert_eq!(next, ts("2026-11-02T06:30:00Z")); // the next day, 01:30 EST
    }

    #[test]
    fn dst_fall_back_interval_cron_fires_in_both_passes() {
        let s = ny("0 0 * * * *");
        let mut slots = Vec::new();
        let mut t = ts("2026-11-01T04:30:00Z"); // 00:30 EDT
        for _ in 0..3 {
            t = s.next_after(t).unwrap();
            slots.push(t);
        }
        // 01:00 EDT, 01:00 EST, 02:00 EST: three real hours, three slots.
        assert_eq!(
            slots,
            vec![
                ts("2026-11-01T05:00:00Z"),
                ts("2026-11-01T06:00:00Z"),
                ts("2026-11-01T07:00:00Z")
            ]
        );
    }

    #[test]
    fn on_time_slot_fires_and_advances() {
        let s = Schedule::every(60_000, ts("2026-01-01T00:00:00Z")).unwrap();
        let cursor = ts("2026-01-01T00:01:00Z");
        let due = s.resolve_due(cursor, cursor.plus_ms(500), MisfirePolicy::Skip, 1_000);
        assert_eq!(due.fire, vec![cursor]);
        assert_eq!(due.next, Some(ts("2026-01-01T00:02:00Z")));
        assert_eq!(due.dropped, SlotCount::default());
    }

    #[test]
    fn misfire_fire_once_now_fires_the_latest_slot() {
        let s = Schedule::cron("0 0 * * * *", "UTC").unwrap();
        let cursor = ts("2026-01-01T01:00:00Z");
        let now = ts("2026-01-02T01:30:00Z"); // a day and a half hour later
        let due = s.resolve_due(cursor, now, MisfirePolicy::FireOnceNow, 1_000);
        assert_eq!(due.fire, vec![ts("2026-01-02T01:00:00Z")]);
        assert_eq!(due.dropped.counted, 24);
        assert_eq!(due.next, Some(ts("2026-01-02T02:00:00Z")));
    }

    #[test]
    fn misfire_skip_drops_everything_missed() {
        let s = Schedule::cron("0 0 * * * *", "UTC").unwrap();
        let due = s.resolve_due(
            ts("2026-01-01T01:00:00Z"),
            ts("2026-01-01T03:30:00Z"),
            MisfirePolicy::Skip,
            1_000,
        );
        assert!(due.fire.is_empty());
        assert_eq!(due.dropped.counted, 3);
        assert_eq!(due.next, Some(ts("2026-01-01T04:00:00Z")));
    }

    #[test]
    fn misfire_catch_up_fires_the_latest_max_slots_oldest_first() {
        let s = Schedule::cron("0 0 * * * *", "UTC").unwrap();
        let due = s.resolve_due(
            ts("2026-01-01T01:00:00Z"),
            ts("2026-01-01T06:30:00Z"),
            MisfirePolicy::CatchUp { max: 2 },
            1_000,
        );
        assert_eq!(
            due.fire,
            vec![ts("2026-01-01T05:00:00Z"), ts("2026-01-01T06:00:00Z")]
        );
        assert_eq!(due.dropped.counted, 4);
        assert_eq!(due.next, Some(ts("2026-01-01T07:00:00Z")));
    }

    #[test]
    fn misfire_never_enumerates_an_unbounded_gap() {
        // Every second for ten years missed: the answer comes from a backwards search.
        let s = Schedule::cron("* * * * * *", "UTC").unwrap();
        let cursor = ts("2016-01-01T00:00:00Z");
        let now = ts("2026-01-01T00:00:00.500Z");
        let due = s.resolve_due(cursor, now, MisfirePolicy::FireOnceNow, 100);
        assert_eq!(due.fire, vec![ts("2026-01-01T00:00:00Z")]);
        assert!(due.dropped.at_least);
        assert_eq!(due.dropped.counted, limits::CATCH_UP_MAX);
    }

    #[test]
    fn spec_round_trips() {
        for spec in [
            ScheduleSpec::Cron {
                expr: "0 30 2 * * *".into(),
                zone: "America/New_York".into(),
            },
            ScheduleSpec::Once { at: Timestamp(5) },
            ScheduleSpec::Every {
                interval_ms: 5_000,
                anchor: Timestamp(0),
            },
        ] {
            assert_eq!(Schedule::parse(&spec).unwrap().spec(), spec);
        }
    }
}
