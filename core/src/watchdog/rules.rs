//! The watchdog's rules as data (SPEC A2): what each watches, its live threshold, what it does,
//! how it escalates, what shows it passed, and the incidents it raises. The HTTP API and the
//! console render [`rules`] as the rules table; nothing in the core reads it back, so it
//! describes the code in `scheduler/supervise.rs`, `scheduler/watch.rs` and
//! `scheduler/workers.rs` and a test pins its thresholds to [`Config`].

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::incident::IncidentKind;
use crate::limits;

/// One watchdog rule, with its threshold as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Its name: `lease_expired`, `queue_stuck`, `claim_loop_idle`, `artifact_gate`,
    /// `job_failing`.
    pub name: String,
    /// What it watches.
    pub signal: String,
    /// Its threshold, in words, with the live values.
    pub threshold: String,
    /// The thresholds as numbers, by `Config` field name (`lease_grace_ms`, …); empty for a
    /// rule without one.
    pub settings: Vec<(String, u64)>,
    /// What keel does when it fires.
    pub action: String,
    /// What happens if that is not enough.
    pub escalation: String,
    /// What shows the problem is over.
    pub pass_evidence: String,
    /// The incident kinds it opens.
    pub incidents: Vec<IncidentKind>,
}

/// The rules, with `config`'s thresholds, in the order the console shows them.
pub fn rules(config: &Config) -> Vec<Rule> {
    let grace_ms = config.lease.grace_ms;
    let stuck_ms = config.stuck_after_ms;
    let unclaimed_ms = config.unclaimed_after_ms;
    let idle = config.idle_claims_max;
    let failing = config.failing_after;
    let unclaimed = if unclaimed_ms == 0 {
        "queued work: never (unclaimed_after = 0)".to_owned()
    } else {
        format!("queued work: unclaimed for {}", words(unclaimed_ms))
    };
    vec![
        Rule {
            name: "lease_expired".into(),
            signal: "a running attempt's lease is not renewed".into(),
            threshold: format!("now ≥ lease expiry + {}", words(grace_ms)),
            settings: vec![("lease_grace_ms".into(), grace_ms)],
            action: "reclaim: the attempt is recorded as lost and the run retries or fails by \
                     its retry policy; audited (watchdog, old and new state, reason)"
                .into(),
            escalation: format!(
                "the write recording a reclaim fails {} times: reclaim_escalation",
                limits::RECLAIM_FAILURES_ESCALATE
            ),
            pass_evidence: "the run is claimable again or running under a new lease (the \
                            lease_reclaimed incident resolves when its next attempt runs)"
                .into(),
            incidents: vec![
                IncidentKind::LeaseReclaimed,
                IncidentKind::ReclaimEscalation,
            ],
        },
        Rule {
            name: "queue_stuck".into(),
            signal: "running work shows no heartbeat or progress; queued work that external \
                     workers must claim is not claimed"
                .into(),
            threshold: format!("running work: silent for {}; {unclaimed}", words(stuck_ms)),
            settings: vec![
                ("stuck_after_ms".into(), stuck_ms),
                ("unclaimed_after_ms".into(), unclaimed_ms),
            ],
            action: "diagnose: job, kind, worker and last progress of a silent attempt; kind, \
                     source jobs, runs waiting, oldest wait and eligible workers seen of a \
                     queue"
                .into(),
            escalation: "no eligible worker seen: the diagnosis proposes a repair (start a \
                         worker for the kind, or pause the job)"
                .into(),
            pass_evidence: "the attempt shows life again or ends; a run of the kind is claimed \
                            or none waits"
                .into(),
            incidents: vec![IncidentKind::StuckRun, IncidentKind::UnclaimedQueue],
        },
        Rule {
            name: "claim_loop_idle".into(),
            signal: "a worker's claims find nothing while runs of other kinds wait".into(),
            threshold: format!("{idle} empty claims in a row"),
            settings: vec![("idle_claims_max".into(), u64::from(idle))],
            action: "report the backlog's shape (runs waiting per kind) and the worker's kinds"
                .into(),
            escalation: "recommend a capability repair: a worker for a waiting kind, or the \
                         kind for this worker"
                .into(),
            pass_evidence: "the worker's next claim gets a run, or no run waits".into(),
            incidents: vec![IncidentKind::IdleClaimLoop],
        },
        Rule {
            name: "artifact_gate".into(),
            signal: "a success of a job with required artifacts: each must be reported, each \
                     http(s) URL must answer 200 and each absolute path must exist"
                .into(),
            threshold: "before completion".into(),
            settings: Vec::new(),
            action: "check each artifact (an effect the runtime performs) and store the status \
                     and a bounded excerpt as verification evidence; a failed check refuses the \
                     completion, says why, and the run stays running"
                .into(),
            escalation: "an artifact_gate incident with the evidence; the attempt times out or \
                         its lease expires like any other"
                .into(),
            pass_evidence: "the check's output stored with the verification, and the completion \
                            accepted"
                .into(),
            incidents: vec![IncidentKind::ArtifactGate],
        },
        Rule {
            name: "job_failing".into(),
            signal: "a job's runs fail in a row (SPEC O4)".into(),
            threshold: if failing == 0 {
                "never (failing_after = 0)".into()
            } else {
                format!("{failing} failed runs in a row")
            },
            settings: vec![("failing_after".into(), u64::from(failing))],
            action: "open an incident naming the last run and its error".into(),
            escalation: "incident sinks notify (a job's notify-on-failure sinks fire per run)"
                .into(),
            pass_evidence: "the job's next run succeeds".into(),
            incidents: vec![IncidentKind::FailingJob],
        },
    ]
}

/// A duration in words: "60 s", "10 min", "1500 ms".
fn words(ms: u64) -> String {
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{} min", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{} s", ms / 1_000)
    } else {
        format!("{ms} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WatchdogProfile;

    #[test]
    fn the_table_names_every_rule_with_its_live_thresholds() {
        let design = WatchdogProfile::Design.apply(Config::default());
        let table = rules(&design);
        let names: Vec<&str> = table.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "lease_expired",
                "queue_stuck",
                "claim_loop_idle",
                "artifact_gate",
                "job_failing"
            ]
        );
        let threshold = |name: &str| {
            table
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.threshold.clone())
                .unwrap()
        };
        assert_eq!(threshold("lease_expired"), "now ≥ lease expiry + 1 min");
        assert_eq!(
            threshold("queue_stuck"),
            "running work: silent for 10 min; queued work: unclaimed for 10 min"
        );
        assert_eq!(threshold("claim_loop_idle"), "3 empty claims in a row");
        assert_eq!(table[0].settings, [("lease_grace_ms".to_owned(), 60_000)]);

        let keel = rules(&Config::default());
        assert_eq!(keel[0].threshold, "now ≥ lease expiry + 10 s");
        assert_eq!(keel[2].settings, [("idle_claims_max".to_owned(), 10)]);
        let off = Config {
            unclaimed_after_ms: 0,
            failing_after: 0,
            ..Config::default()
        };
        let off = rules(&off);
        assert!(off[1].threshold.ends_with("never (unclaimed_after = 0)"));
        assert_eq!(off[4].threshold, "never (failing_after = 0)");
        // Every kind keel opens by itself belongs to a rule.
        let kinds: Vec<IncidentKind> = keel.iter().flat_map(|r| r.incidents.clone()).collect();
        for kind in [
            IncidentKind::LeaseReclaimed,
            IncidentKind::ReclaimEscalation,
            IncidentKind::StuckRun,
            IncidentKind::UnclaimedQueue,
            IncidentKind::IdleClaimLoop,
            IncidentKind::FailingJob,
        ] {
            assert!(kinds.contains(&kind), "{kind:?}");
        }
    }

    #[test]
    fn durations_read_in_the_largest_whole_unit() {
        assert_eq!(words(600_000), "10 min");
        assert_eq!(words(10_000), "10 s");
        assert_eq!(words(1_500), "1500 ms");
        assert_eq!(words(0), "0 s");
    }
}
