//! Helpers shared by the store-fs integration tests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use keel_core::outbox::Delivery;
use keel_core::{
    AuditRecord, Batch, BatchId, Job, JobId, JobSpec, JobState, Record, RetryPolicy, Run, RunTerms,
    ScheduleSpec, Timestamp, Tombstone,
};

pub const T0: Timestamp = Timestamp(1_800_000_000_000);

/// The log of generation 0.
pub const LOG0: &str = "log-0000000000000000";

pub use keel_harness::conformance::incident;
use keel_harness::conformance::{audit_record, run_with};
pub use keel_harness::TempDir;

pub fn job_id(name: &str) -> JobId {
    JobId::new(name).unwrap()
}

pub fn batch(epoch: u64, n: u64, records: Vec<Record>) -> Batch {
    Batch {
        id: BatchId((epoch << 32) + n),
        at: T0,
        records,
    }
}

/// A scheduled run of `job` for `slot`.
pub fn run(id: u64, job: &str, slot: Timestamp) -> Run {
    let terms = RunTerms {
        retry: RetryPolicy {
            backoff_factor: 1.7,
            jitter: 0.1,
            ..RetryPolicy::default()
        },
        payload: "{\"KLF1\": \"magic inside a payload\"}".into(),
        timeout_ms: Some(60_000),
        ..RunTerms::new("work")
    };
    run_with(id, job, slot, terms)
}

/// `run` in a terminal state, finished at `at`.
pub fn finished(run: Run, at: Timestamp) -> Run {
    let mut record = run.record();
    record.state = keel_core::RunState::Succeeded;
    record.finished_at = Some(at);
    record.summary = Some("done".into());
    Run::from_record(record)
}

pub fn job(name: &str) -> Job {
    let spec = JobSpec::new(
        job_id(name),
        "work",
        ScheduleSpec::Cron {
            expr: "0 * * * * *".into(),
            zone: "Europe/Paris".into(),
        },
    );
    Job {
        spec,
        state: JobState::Scheduled { next: T0 },
        backlog: Default::default(),
        last_fired: Some(T0),
        active_runs: 0,
        delete_when_idle: false,
        last_run: None,
        failures_in_a_row: 0,
    }
}

pub fn audit(seq: u64, job: &str, run: Option<u64>) -> AuditRecord {
    AuditRecord {
        reason: format!("record {seq} ✓"),
        ..audit_record(seq, job, run, T0.plus_ms(seq))
    }
}

pub fn tombstone(name: &str) -> Tombstone {
    Tombstone {
        job: job_id(name),
        last_fired: T0,
        deleted_at: T0.plus_ms(1),
    }
}

/// A delivery, built the way a store reads one back (its `durable` flag is not persisted).
pub fn delivery(id: u64) -> Delivery {
    keel_harness::conformance::delivery(id, 1)
}

/// A batch with one of everything.
pub fn everything(epoch: u64, n: u64) -> Batch {
    batch(
        epoch,
        n,
        vec![
            Record::PutJob(job("a").into()),
            Record::PutJob(job("b").into()),
            Record::PutRun(run(1, "a", T0)),
            Record::PutRun(finished(
                run(2, "a", T0.plus_ms(60_000)),
                T0.plus_ms(61_000),
            )),
            Record::PutRun(run(3, "b", T0)),
            Record::Audit(audit(1, "a", Some(1))),
            Record::Audit(audit(2, "a", None)),
            Record::Audit(audit(3, "b", Some(3))),
            Record::PutTombstone(tombstone("gone")),
            Record::PutIncident(incident(1, false)),
            Record::PutIncident(incident(2, true)),
            Record::PutDelivery(delivery(1)),
            Record::PutDelivery(delivery(2)),
            Record::DeleteDelivery {
                id: keel_core::DeliveryId(2),
            },
            Record::DeleteJob { id: job_id("b") },
            Record::PutMeta(keel_core::Meta {
                next_run_id: 4,
                next_audit_seq: 4,
                clock: T0,
                epoch,
                next_token: 1,
                next_incident: 3,
                next_delivery: 3,
            }),
        ],
    )
}
