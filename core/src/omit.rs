//! Predicates for `#[serde(skip_serializing_if = …)]`: which fields a stored record leaves out.
//!
//! A firing rewrites its job, two runs and three audit records, so every byte of their stored
//! form is written and flushed thousands of times a second at scale. Most fields sit at their
//! defaults most of the time (no error yet, no lease, no checkpoint, the default retry policy),
//! and the stored form leaves such a field out.
//!
//! # The rule
//!
//! A field is left out **only when it holds exactly the value its absence decodes to**, in this
//! build and in every build that reads the same store format: a field that is an `Option`
//! (absent decodes to `None`), or carries `#[serde(default)]` (absent decodes to
//! `Default::default()`), or `#[serde(default = "…")]` with a predicate for that value. So a
//! record reads back equal to what was written, and a store written by this build opens in an
//! earlier build of the same format: omitting a field is not a format change, while adding
//! `skip_serializing_if` to a field that earlier builds require would be one.
//! The tests below (`every_omitted_field_of_a_run_decodes_from_its_absence` and its job and
//! audit twins) check it for every field.
//!
//! Two consequences. The lists of fields always written, in those tests, must never shrink:
//! a field an earlier build requires may not be left out, even if it gains a default here. And
//! the values an absence decodes to are now part of the format: changing
//! `RetryPolicy::default()`, `Watch::default()`, the policies' defaults or `default_true`
//! would change every record that left the field out, so it is a format change.

use std::sync::Arc;

/// The value is its type's default, which is what its absence decodes to under
/// `#[serde(default)]`.
pub(crate) fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// `false`, the default of a `bool`.
pub(crate) fn is_false(value: &bool) -> bool {
    !*value
}

/// `true`, for the fields whose absence decodes to `true`.
pub(crate) fn is_true(value: &bool) -> bool {
    *value
}

/// Zero.
pub(crate) fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// The empty text, the default of an `Arc<str>` (compared without building one).
pub(crate) fn is_empty_text(value: &Arc<str>) -> bool {
    value.is_empty()
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use serde_json::Value;

    use crate::audit::{Actor, AuditRecord};
    use crate::ids::JobId;
    use crate::job::{Backlog, Job, JobSpec, JobState};
    use crate::run::tests::manual_run;
    use crate::run::{RunTerms, StateName};
    use crate::schedule::ScheduleSpec;
    use crate::time::Timestamp;

    /// Encodes `value` with every optional field at its default, checks that exactly the
    /// `required` keys are written (the fields an earlier build of the format needs: these
    /// lists may grow, never shrink), and that the bytes decode back to `value`: every omitted
    /// field decodes from its absence.
    fn omitted_fields_decode_from_their_absence<T>(value: &T, required: &[&str])
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let json = serde_json::to_string(value).unwrap();
        let written: Vec<String> = match serde_json::from_str::<Value>(&json).unwrap() {
            Value::Object(fields) => fields.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        };
        let mut expected: Vec<String> = required.iter().map(|k| k.to_string()).collect();
        expected.sort();
        let mut written_sorted = written.clone();
        written_sorted.sort();
        assert_eq!(written_sorted, expected, "fields written, in {json}");
        assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), value, "{json}");
    }

    #[test]
    fn every_omitted_field_of_a_run_decodes_from_its_absence() {
        // The fields without `#[serde(default)]` that are not `Option`s: every build of the
        // format requires them, so they are always written.
        let required = [
            "id",
            "job",
            "trigger",
            "created_at",
            "attempt",
            "snoozes",
            "state",
            "cancel_requested",
            "retry",
            "resume_after_crash",
            "kind",
        ];
        omitted_fields_decode_from_their_absence(&manual_run(RunTerms::new("k")), &required);
    }

    #[test]
    fn every_omitted_field_of_a_job_decodes_from_its_absence() {
        let job = Job {
            spec: JobSpec::new(
                JobId::new("j").unwrap(),
                "k",
                ScheduleSpec::cron("0 * * * * *"),
            ),
            state: JobState::Scheduled {
                next: Timestamp(60_000),
            },
            backlog: Backlog::default(),
            last_fired: None,
            active_runs: 0,
            delete_when_idle: false,
            last_run: None,
            failures_in_a_row: 0,
        };
        omitted_fields_decode_from_their_absence(&job, &["spec", "state"]);
        omitted_fields_decode_from_their_absence(&job.spec, &["id", "kind", "schedule"]);
    }

    /// The other half: a field away from its default is written, and reads back.
    #[test]
    fn fields_away_from_their_defaults_are_written() {
        let mut spec = JobSpec::new(
            JobId::new("j").unwrap(),
            "k",
            ScheduleSpec::cron("0 * * * * *"),
        );
        spec.payload = "p".into();
        spec.retry.attempts_max = 5;
        spec.delete_after_run = true;
        spec.resume_after_crash = false;
        spec.external = true;
        spec.timeout_ms = Some(1_000);
        spec.required_artifacts = vec!["report".to_owned()].into();
        spec.sinks = vec![std::sync::Arc::from("mail")].into();
        let job = Job {
            spec,
            state: JobState::Scheduled {
                next: Timestamp(60_000),
            },
            backlog: Backlog::default(),
            last_fired: Some(Timestamp(0)),
            active_runs: 0,
            delete_when_idle: true,
            last_run: None,
            failures_in_a_row: 0,
        };
        let value = serde_json::to_value(&job).unwrap();
        for key in ["last_fired", "delete_when_idle"] {
            assert!(value.get(key).is_some(), "{key} missing from {value}");
        }
        for key in [
            "payload",
            "retry",
            "delete_after_run",
            "resume_after_crash",
            "external",
            "timeout_ms",
            "required_artifacts",
            "sinks",
        ] {
            assert!(
                value["spec"].get(key).is_some(),
                "{key} missing from {value}"
            );
        }
        assert_eq!(serde_json::from_value::<Job>(value).unwrap(), job);
    }

    #[test]
    fn every_omitted_field_of_an_audit_record_decodes_from_its_absence() {
        let record = AuditRecord {
            seq: 1,
            at: Timestamp(5),
            job: JobId::new("j").unwrap(),
            run: None,
            attempt: None,
            fencing_token: None,
            old: None,
            new: StateName::Queued,
            actor: Actor::Operator,
            reason: "added".into(),
            output: None,
        };
        omitted_fields_decode_from_their_absence(
            &record,
            &["seq", "at", "job", "new", "actor", "reason"],
        );
    }
}
