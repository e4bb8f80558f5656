//! What the scheduler writes: audit records, the outbox's writes and sends moved into the
//! journal, the batches built from the journal for the store, and what the store's
//! acknowledgement of a batch releases (runs leave memory, deliveries may be sent).

use super::*;
use crate::persist::Group;

impl Scheduler {
    /// Moves what the outbox produced into the journal: writes, sends (released when their
    /// attempt is durable) and end-of-delivery events (released when the end is durable). A
    /// run's result travels in the group of its job, with the run record it reports; an
    /// incident notification travels with the incident records.
    pub(super) fn pump_outbox(&mut self) {
        let (puts, deletes) = self.outbox.take_writes();
        for delivery in puts {
            match &delivery.payload {
                DeliveryPayload::Run(result) => {
                    let job = result.job.clone();
                    self.delivery_jobs.insert(delivery.id, job.clone());
                    self.journal.delivery(&job, delivery.id, JobWrite::Put);
                }
                DeliveryPayload::Incident { .. } => {
                    self.notice_deliveries.insert(delivery.id);
                    self.journal.notice_delivery(delivery.id, JobWrite::Put);
                }
            }
        }
        for id in deletes {
            if let Some(job) = self.delivery_jobs.get(&id).cloned() {
                self.journal.delivery(&job, id, JobWrite::Delete);
            } else if self.notice_deliveries.contains(&id) {
                self.journal.notice_delivery(id, JobWrite::Delete);
            }
        }
        while let Some(send) = self.outbox.poll_send() {
            match &send.payload {
                DeliveryPayload::Run(result) => {
                    let job = result.job.clone();
                    self.journal.send(&job, send);
                }
                DeliveryPayload::Incident { .. } => self.journal.notice_send(send),
            }
        }
        while let Some(event) = self.outbox.poll_event() {
            let id = match &event {
                OutboxEvent::Finished { id, .. } | OutboxEvent::Dropped { id: Some(id), .. } => {
                    Some(*id)
                }
                _ => None,
            };
            let job = id.and_then(|id| self.delivery_jobs.get(&id).cloned());
            let notice = id.is_some_and(|id| self.notice_deliveries.contains(&id));
            match (job, notice) {
                (Some(job), _) => self.journal.held_event(&job, event),
                (None, true) => self.journal.notice_event(event),
                (None, false) => self
                    .effects
                    .push_back(Effect::Event(Event::Delivery(event))),
            }
        }
        // The delivery id counter rides in `Meta`; write it only when it moved, or every
        // acknowledgement would call for another batch.
        if self.outbox.next_id() != self.meta.next_delivery {
            self.meta.next_delivery = self.outbox.next_id();
            self.journal.meta();
        }
    }

    pub(super) fn mark_job(&mut self, id: &JobId) {
        self.journal.put_job(id);
    }

    pub(super) fn next_seq(&mut self) -> u64 {
        let seq = self.meta.next_audit_seq;
        self.meta.next_audit_seq += 1;
        self.journal.meta();
        seq
    }

    pub(super) fn audit_job(
        &mut self,
        id: &JobId,
        old: Option<StateName>,
        new: StateName,
        actor: Actor,
        reason: &str,
    ) {
        let record = self.job_audit_record(id, old, new, actor, crate::run::truncate(reason));
        self.journal.audit(record);
    }

    /// An audit record of a change to job `id` itself (no run), numbered with the next audit
    /// sequence number.
    pub(super) fn job_audit_record(
        &mut self,
        id: &JobId,
        old: Option<StateName>,
        new: StateName,
        actor: Actor,
        reason: String,
    ) -> AuditRecord {
        let seq = self.next_seq();
        AuditRecord {
            seq,
            at: self.now,
            job: id.clone(),
            run: None,
            attempt: None,
            fencing_token: None,
            old,
            new,
            actor,
            reason,
            output: None,
        }
    }

    pub(super) fn audit_run(
        &mut self,
        id: RunId,
        old: Option<StateName>,
        new: StateName,
        actor: Actor,
        reason: &str,
    ) {
        self.audit_run_with_output(id, old, new, actor, reason, None);
    }

    /// [`Scheduler::audit_run`] with what the action printed or found (SPEC A3), truncated to
    /// [`limits::AUDIT_OUTPUT_MAX_BYTES`].
    pub(super) fn audit_run_with_output(
        &mut self,
        id: RunId,
        old: Option<StateName>,
        new: StateName,
        actor: Actor,
        reason: &str,
        output: Option<String>,
    ) {
        let seq = self.next_seq();
        let run = &self.runs[&id];
        self.journal.audit(AuditRecord {
            seq,
            at: self.now,
            job: run.job.clone(),
            run: Some(id),
            attempt: Some(run.attempt),
            // The lease under which the change was made: the live one, or for the end of an
            // attempt the one that just ended, so a completion names its holder's token.
            fencing_token: match (&run.lease, old) {
                (Some(lease), _) => Some(lease.token),
                (None, Some(StateName::Starting | StateName::Running)) => run.last_token,
                (None, _) => None,
            },
            old,
            new,
            actor,
            reason: crate::run::truncate(reason),
            output: output.map(|o| crate::text::truncate(&o, limits::AUDIT_OUTPUT_MAX_BYTES)),
        });
    }

    pub(super) fn build_batch(&mut self) -> Batch {
        let batch = self.journal.start_batch();
        self.work.groups_batched += batch.groups.len() as u64;
        let mut records = Vec::new();
        for (id, group) in &batch.groups {
            match group.job {
                JobWrite::Put => {
                    if let Some(job) = self.jobs.get(id) {
                        records.push(Record::PutJob(Arc::clone(job)));
                    }
                }
                JobWrite::Delete => records.push(Record::DeleteJob { id: id.clone() }),
                JobWrite::Nothing => {}
            }
            match group.tombstone {
                JobWrite::Put => {
                    if let Some(tombstone) = self.tombstones.get(id) {
                        records.push(Record::PutTombstone(tombstone.clone()));
                    }
                }
                JobWrite::Delete => records.push(Record::DeleteTombstone { job: id.clone() }),
                JobWrite::Nothing => {}
            }
            records.extend(
                group
                    .runs
                    .iter()
                    .filter_map(|run| self.runs.get(run).cloned().map(Record::PutRun)),
            );
            records.extend(group.audit.iter().cloned().map(Record::Audit));
            records.extend(group.prunes.iter().cloned());
            delivery_records(&self.outbox, group, &mut records);
        }
        records.extend(batch.global_prunes.iter().cloned());
        records.extend(batch.incidents.iter().cloned().map(Record::PutIncident));
        // After the incident records, in the same batch: a notification is durable no
        // earlier than the incident it tells about.
        delivery_records(&self.outbox, &batch.notices, &mut records);
        // The counters ride in every batch, so a durable run id or audit seq is never ahead
        // of the durable counters.
        records.push(Record::PutMeta(Meta {
            clock: self.now,
            ..self.meta
        }));
        Batch {
            id: batch.id,
            at: self.now,
            records,
        }
    }

    /// After batch acknowledgement: terminal runs whose final record is now durable leave
    /// memory (they are history), and checkpoint saves the batch held are announced.
    pub(super) fn acknowledge_runs(&mut self, now: Timestamp, groups: &[(JobId, Group)]) {
        for (job, group) in groups {
            for run_id in &group.runs {
                if self.journal.run_pending(job, *run_id) {
                    continue; // a newer write of the run is still to come
                }
                self.reclaim_failures.remove(run_id);
                if self.runs.get(run_id).is_some_and(|r| r.state.is_terminal()) {
                    self.runs.remove(run_id);
                    self.runs_by_job.remove(&(job.clone(), *run_id));
                }
            }
            for (run, seq) in &group.checkpoints {
                let saved = self
                    .throttles
                    .get_mut(run)
                    .is_some_and(|t| t.acknowledged(*seq, now));
                if saved {
                    self.effects
                        .push_back(Effect::Event(Event::CheckpointSaved {
                            run: *run,
                            seq: *seq,
                        }));
                }
            }
        }
    }

    /// After batch acknowledgement: deliveries whose record is durable may be sent, deleted
    /// ones are forgotten, and the sends and delivery events the batch held are released.
    pub(super) fn acknowledge_deliveries<'a>(&mut self, groups: impl Iterator<Item = &'a Group>) {
        for group in groups {
            let durable: Vec<DeliveryId> = group
                .deliveries
                .iter()
                .filter(|(_, write)| **write == JobWrite::Put)
                .map(|(id, _)| *id)
                .collect();
            self.outbox.mark_durable(&durable);
            for (id, write) in &group.deliveries {
                if *write == JobWrite::Delete {
                    self.delivery_jobs.remove(id);
                    self.notice_deliveries.remove(id);
                }
            }
            self.effects
                .extend(group.sends.iter().cloned().map(Effect::Deliver));
            self.effects.extend(
                group
                    .events
                    .iter()
                    .cloned()
                    .map(|e| Effect::Event(Event::Delivery(e))),
            );
        }
    }
}

/// The outbox records of `group`'s deliveries, appended to `records`.
fn delivery_records(outbox: &Outbox, group: &Group, records: &mut Vec<Record>) {
    for (delivery, write) in &group.deliveries {
        match write {
            JobWrite::Put => {
                if let Some(d) = outbox.delivery(*delivery) {
                    records.push(Record::PutDelivery(d.clone()));
                }
            }
            JobWrite::Delete => records.push(Record::DeleteDelivery { id: *delivery }),
            JobWrite::Nothing => {}
        }
    }
}
