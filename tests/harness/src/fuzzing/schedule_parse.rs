//! The `schedule_parse` target: the schedule parser and fire-time arithmetic on hostile text
//! and extreme instants.

use super::*;

// ----- schedule_parse -----------------------------------------------------------------------

/// The earliest instant the fuzz targets feed to fire-time arithmetic.
pub(super) const T_MIN: i64 = i64::MIN / 2;
/// 1900-01-01T00:00:00Z.
pub(super) const T_1900: i64 = -2_208_988_800_000;
/// 2026-01-01T00:00:00Z.
pub(super) const T_2026: i64 = 1_767_225_600_000;
/// 4999-06-01T00:00:00Z: near the end of the range croner searches.
pub(super) const T_4999: i64 = 95_599_094_400_000;
/// 5000-01-01T00:00:00Z.
pub(super) const T_5000: i64 = 95_617_584_000_000;

/// Zones with interesting offsets and transitions, picked when the input names none.
pub(super) const ZONES: [&str; 8] = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe", // 30-minute DST shift
    "Asia/Kathmandu",      // +05:45
    "Pacific/Apia",        // skipped 2011-12-30 entirely
    "America/Sao_Paulo",   // DST changes at midnight (until 2019)
    "Pacific/Chatham",     // +12:45 / +13:45
];

/// Fuzz target body: the schedule parser and fire-time arithmetic.
///
/// The input is read as UTF-8 (lossily). Its first line is a cron expression and its second
/// line, if any, an IANA zone name (otherwise a zone is picked from a list of awkward ones by a
/// hash of the input). Numbers for instants, grace periods, intervals and anchors come from a
/// hash of the input and from its trailing bytes.
///
/// Checked, for every input:
///
/// - a refused expression, zone or interval has a non-empty `Display` message;
/// - a parsed schedule's `spec()` parses back to the same schedule, and `Schedule::parse`
///   agrees with `Schedule::cron`;
/// - `next_after(t) > t` and `latest_at_or_before(t) <= t` whenever they return a slot, for
///   instants from `i64::MIN / 2` through 1900, 1970, 2026 and year 4999 to year 5000;
/// - `resolve_due(cursor, now, policy, grace)` with a real slot as `cursor`, for each
///   [`MisfirePolicy`]: the slots to fire are strictly increasing, within `cursor..=now`, at most
///   [`limits::CATCH_UP_MAX`] (and at most what the policy allows), and the new cursor is after
///   all of them;
///
/// and the same for `Schedule::every` (any interval, an anchor within `i64::MIN / 2 ..=
/// i64::MAX / 2`, both from the input) and `Schedule::once`.
pub fn schedule_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let expr = lines.next().unwrap_or_default();
    let hash = fnv1a(data);
    let picked_zone = ZONES[(hash % ZONES.len() as u64) as usize];
    let zone = lines.next().unwrap_or(picked_zone);

    // Numbers from the tail of the input, so that a fuzzer can steer them directly.
    let tail = &data[data.len().saturating_sub(24)..];
    let mut nums = Bytes::new(tail);
    let (w0, w1, w2) = (nums.u64(), nums.u64(), nums.u64());

    let instants = [
        T_MIN,
        T_1900,
        -1,
        0,
        T_2026,
        T_2026 + 499, // mid-second
        T_4999,
        T_5000 - 1,
        in_range(hash, T_1900, T_5000),
        in_range(w0, T_MIN, T_5000),
        in_range(
            w1.rotate_left(17),
            T_2026 - 86_400_000 * 400,
            T_2026 + 86_400_000 * 400,
        ),
    ];

    match Schedule::cron(expr, zone) {
        Ok(schedule) => {
            let spec = ScheduleSpec::Cron {
                expr: expr.into(),
                zone: zone.into(),
            };
            assert_eq!(
                Schedule::parse(&spec).as_ref(),
                Ok(&schedule),
                "Schedule::parse and Schedule::cron disagree on {expr:?} in {zone:?}"
            );
            check_schedule(&schedule, &instants, w2, hash);
        }
        Err(e) => {
            assert!(
                !e.to_string().is_empty(),
                "empty error message for {expr:?} in {zone:?}"
            );
            // The field it names must display too.
            assert!(!e.field().to_string().is_empty());
            // An unknown zone must not hide what is wrong with the expression: try a known one.
            if let Ok(schedule) = Schedule::cron(expr, picked_zone) {
                check_schedule(&schedule, &instants, w2, hash);
            }
        }
    }

    // Fixed intervals: any interval (short ones are refused), anchors over a wide range.
    let interval = match w1 % 4 {
        0 => w0,                  // anything, including < 1000 and u64::MAX
        1 => 1_000 + w0 % 10_000, // seconds
        2 => 60_000 * (1 + w0 % 1_440),
        _ => 1 + w0 % 2_000, // around the minimum
    };
    let anchor = Timestamp(in_range(w2, T_MIN, -T_MIN));
    match Schedule::every(interval, anchor) {
        Ok(schedule) => {
            assert!(schedule.is_recurring());
            check_schedule(&schedule, &instants, w2, hash);
            check_schedule(&schedule, &[anchor.0, anchor.0.saturating_sub(1)], w0, hash);
        }
        Err(e) => {
            assert!(interval < keel_core::schedule::INTERVAL_MIN_MS);
            assert!(!e.to_string().is_empty());
        }
    }

    // One-shots.
    let once = Schedule::once(anchor);
    assert!(!once.is_recurring());
    check_schedule(&once, &instants, w1, hash);
    check_schedule(&once, &[anchor.0, anchor.0.saturating_sub(1)], w1, hash);
}

/// Checks the fire-time properties of one valid schedule at each instant in `instants`.
pub(super) fn check_schedule(schedule: &Schedule, instants: &[i64], w: u64, hash: u64) {
    assert!(!schedule.to_string().is_empty());
    let spec = schedule.spec();
    assert_eq!(
        Schedule::parse(&spec).as_ref(),
        Ok(schedule),
        "{schedule}: spec {spec:?} does not parse back to the same schedule"
    );

    // Fire-time searches are not free (an impossible date such as 30 February makes croner
    // search up to year 5000), so instants go in ascending order for `next_after` and
    // descending for `latest_at_or_before`, and each stops at the first `None`: no slot after
    // `t` means none after any later instant either.
    let mut sorted = instants.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut nexts = Vec::new();
    for &t in &sorted {
        let t = Timestamp(t);
        match schedule.next_after(t) {
            Some(next) => {
                assert!(
                    next > t,
                    "{schedule}: next_after({t}) = {next} is not after it"
                );
                nexts.push(next);
            }
            None if t.to_utc().is_none() => {} // outside chrono's range: no answer expected
            None => break,
        }
    }
    for &t in sorted.iter().rev() {
        let t = Timestamp(t);
        match schedule.latest_at_or_before(t) {
            Some(latest) => {
                assert!(
                    latest <= t,
                    "{schedule}: latest_at_or_before({t}) = {latest} is after it"
                );
            }
            None if t.to_utc().is_none() => {}
            None => break,
        }
    }

    // resolve_due needs a real slot as the cursor and a `now` at or after it: on time, just
    // past a grace period, a long outage. Two cursors per schedule keep the cost bounded
    // (after an outage each resolution may walk up to CATCH_UP_MAX slots).
    let graces = [0, 999, 60_000, w % 100_000_000];
    let catch_up = [0, 1, 3, (w >> 32) as u32 % 1_500, u32::MAX];
    for (i, &cursor) in nexts.iter().rev().take(2).enumerate() {
        // Only the first cursor gets a long outage.
        let lateness = match (hash >> (8 * i)) % if i == 0 { 4 } else { 2 } {
            0 => 0,
            1 => 60_001,
            2 => 86_400_000 * 3 + 1,
            _ => w % (86_400_000 * 400),
        };
        let now = cursor.plus_ms(lateness);
        let grace = graces[(hash as usize).wrapping_add(i) % graces.len()];
        let max = catch_up[(w as usize).wrapping_add(i) % catch_up.len()];
        for policy in [
            MisfirePolicy::FireOnceNow,
            MisfirePolicy::Skip,
            MisfirePolicy::CatchUp { max },
        ] {
            let due = schedule.resolve_due(cursor, now, policy, grace);
            check_due(schedule, &due, cursor, now, policy, grace);
        }
    }
}

pub(super) fn check_due(
    schedule: &Schedule,
    due: &Due,
    cursor: Timestamp,
    now: Timestamp,
    policy: MisfirePolicy,
    grace: u64,
) {
    let ctx = || format!("{schedule}: resolve_due({cursor}, {now}, {policy:?}, {grace}) = {due:?}");
    assert!(
        due.fire.windows(2).all(|w| w[0] < w[1]),
        "{}: fire list not strictly increasing",
        ctx()
    );
    assert!(
        due.fire.len() <= limits::CATCH_UP_MAX as usize,
        "{}: more than CATCH_UP_MAX slots",
        ctx()
    );
    let allowed = match policy {
        MisfirePolicy::FireOnceNow | MisfirePolicy::Skip => 1,
        MisfirePolicy::CatchUp { max } => max.clamp(1, limits::CATCH_UP_MAX) as usize,
    };
    assert!(
        due.fire.len() <= allowed,
        "{}: more slots than the policy allows",
        ctx()
    );
    if policy != MisfirePolicy::Skip {
        assert!(!due.fire.is_empty(), "{}: a due slot fired nothing", ctx());
    }
    for slot in &due.fire {
        assert!(*slot <= now, "{}: fires {slot}, after now", ctx());
        assert!(
            *slot >= cursor,
            "{}: fires {slot}, before the cursor",
            ctx()
        );
    }
    if let Some(next) = due.next {
        assert!(
            next > cursor,
            "{}: the new cursor does not move forward",
            ctx()
        );
        if let Some(last) = due.fire.last() {
            assert!(
                next > *last,
                "{}: the new cursor is not after the fired slots",
                ctx()
            );
        }
    }
}
