//! Leadership across hosts, simulated: self-fencing (SPEC M2) under stalls, slow and lost
//! messages and clocks that run at different rates.
//!
//! Each simulated host runs one process driving a [`Fence`], as `keel run --store postgres`
//! does: a standby asks for the lease every second, a leader renews it when its fence says so,
//! and a process that fences itself exits and is restarted a little later (a new process, a
//! new holder). The database holds one lease row judged by *its* clock (the simulation's true
//! time): an acquisition succeeds once the lease has expired, a renewal extends it while holder
//! and term are unchanged (even after expiry, as `keel_leader`'s renewal does), and anything
//! else finds another holder.
//!
//! After every step the simulator checks the property M2 is for: a process that is not stalled
//! and whose fence says it leads holds the lease row, with that term, and the database has not
//! expired it yet, so no successor could have taken over and reclaimed its attempts. At most one
//! process leads at any instant follows. [`LeaderSim::check_liveness`] heals every fault and
//! asserts that some process leads again. The same seed replays the same trace.

use keel_core::fence::{Fence, FenceEffect, FencePolicy};
use keel_core::rng::SplitMix64;
use keel_core::Timestamp;

/// How often the simulation advances, in true milliseconds.
const STEP_MS: u64 = 10;
/// How often a standby asks for the lease, on its own clock (the daemon's `STANDBY_POLL`).
const STANDBY_POLL_MS: u64 = 1_000;

/// What happened in a simulation, for assertions and for replay checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaderReport {
    /// Terms granted by the database.
    pub terms: u64,
    /// Processes that fenced themselves.
    pub fenced: u64,
    /// Processes that were stalled (SIGSTOP, a long GC pause).
    pub stalls: u64,
    /// Requests or replies lost.
    pub lost: u64,
    /// Renewals acknowledged.
    pub renewals: u64,
}

/// A seeded world of `hosts` processes sharing one leadership lease of `ttl_ms`.
#[derive(Debug)]
pub struct LeaderSim {
    rng: SplitMix64,
    policy: FencePolicy,
    hosts: Vec<Host>,
    lease: Option<DbLease>,
    /// The true time, which is also the database's clock.
    now_ms: u64,
    faults: bool,
    report: LeaderReport,
}

#[derive(Debug)]
struct Host {
    fence: Fence,
    /// This host's clock: `offset + true * rate / 1000`.
    rate_per_mille: u64,
    offset_ms: i64,
    /// Which process of this host runs (a new one after each fence).
    incarnation: u64,
    stalled_until_ms: u64,
    restart_at_ms: Option<u64>,
    request: Option<Request>,
    next_poll: Timestamp,
}

#[derive(Clone, Copy, Debug)]
struct Request {
    kind: Kind,
    sent_at: Timestamp,
    /// When it reaches the database (true time), `None` if lost on the way.
    arrives_ms: Option<u64>,
    /// The database's answer and when it reaches the host, once it has been processed.
    reply: Option<(Reply, Option<u64>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Acquire,
    Renew { term: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    Acquired { term: u64 },
    Held,
    Renewed,
    Deposed,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DbLease {
    host: usize,
    incarnation: u64,
    term: u64,
    expires_ms: u64,
}

impl LeaderSim {
    /// A world of `hosts` standbys, seeded with `seed`, sharing a lease of `ttl_ms`.
    pub fn new(seed: u64, hosts: usize, ttl_ms: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let policy = FencePolicy::for_ttl(ttl_ms);
        let hosts = (0..hosts)
            .map(|_| Host {
                fence: Fence::new(policy),
                // Within ±5 %: the margin (a fifth of the TTL) covers that with room.
                rate_per_mille: 950 + rng.below_inclusive(100),
                offset_ms: 1_000_000 + rng.below_inclusive(1_000_000) as i64,
                incarnation: 0,
                stalled_until_ms: 0,
                restart_at_ms: None,
                request: None,
                next_poll: Timestamp::EPOCH,
            })
            .collect();
        LeaderSim {
            rng,
            policy,
            hosts,
            lease: None,
            now_ms: 0,
            faults: true,
            report: LeaderReport::default(),
        }
    }

    /// Runs for `ms` true milliseconds with faults, checking the invariant after every step.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now_ms + ms;
        while self.now_ms < until {
            self.step();
        }
    }

    /// Heals every fault, runs for `ms` and asserts that exactly one process leads.
    pub fn check_liveness(&mut self, ms: u64) {
        self.faults = false;
        self.run_for(ms);
        let leading = self.leaders();
        assert_eq!(
            leading.len(),
            1,
            "after healing, leaders: {leading:?}\n{self:#?}"
        );
    }

    /// What happened so far.
    pub fn report(&self) -> LeaderReport {
        self.report
    }

    fn step(&mut self) {
        self.now_ms += STEP_MS;
        let t = self.now_ms;
        // The database answers requests that reached it, stalled senders or not.
        for h in 0..self.hosts.len() {
            let Some(mut request) = self.hosts[h].request else {
                continue;
            };
            if request.reply.is_some() || request.arrives_ms.is_none_or(|at| at > t) {
                continue;
            }
            let reply = self.database(h, request.kind);
            let back = self.delay();
            request.reply = Some((reply, back.map(|d| t + d)));
            self.hosts[h].request = Some(request);
        }
        for h in 0..self.hosts.len() {
            self.step_host(h, t);
        }
        self.check();
    }

    fn step_host(&mut self, h: usize, t: u64) {
        if self.faults && self.rng.chance(1, 2_000) {
            let ms = self.rng.below_inclusive(2 * self.policy.ttl_ms);
            self.hosts[h].stalled_until_ms = self.hosts[h].stalled_until_ms.max(t + ms);
            self.report.stalls += 1;
        }
        if t < self.hosts[h].stalled_until_ms {
            return;
        }
        if let Some(at) = self.hosts[h].restart_at_ms {
            if t < at {
                return;
            }
            let host = &mut self.hosts[h];
            host.restart_at_ms = None;
            host.incarnation += 1;
            host.fence = Fence::new(self.policy);
            host.request = None;
            host.next_poll = Timestamp::EPOCH;
        }
        let now = self.local(h, t);
        // A reply that arrived.
        if let Some(Request {
            kind,
            sent_at,
            reply: Some((reply, arrives)),
            ..
        }) = self.hosts[h].request
        {
            match arrives {
                Some(at) if at <= t => {
                    self.hosts[h].request = None;
                    let fence = &mut self.hosts[h].fence;
                    match (kind, reply) {
                        (Kind::Acquire, Reply::Acquired { term }) => {
                            fence
                                .handle_acquired(now, sent_at, term)
                                .expect("a new process's first term");
                        }
                        (Kind::Renew { .. }, Reply::Renewed) => {
                            self.report.renewals += 1;
                            fence.handle_renew_acked(now, sent_at);
                        }
                        (Kind::Renew { .. }, Reply::Deposed) => fence.handle_deposed(now),
                        (Kind::Renew { .. }, Reply::Failed) => {
                            fence.handle_renew_failed(now, sent_at);
                        }
                        _ => {}
                    }
                }
                Some(_) => {}
                // Lost: an acquisition's caller gives up and asks again; a renewal's waits
                // for the fence deadline, as the daemon does.
                None => {
                    if kind == Kind::Acquire {
                        self.hosts[h].request = None;
                    }
                }
            }
        }
        if let Some(Request {
            kind: Kind::Acquire,
            arrives_ms: None,
            ..
        }) = self.hosts[h].request
        {
            self.hosts[h].request = None;
        }
        self.hosts[h].fence.handle_timeout(now);
        while let Some(effect) = self.hosts[h].fence.poll_effect() {
            match effect {
                FenceEffect::Renew { term, sent_at } => {
                    let request = self.send(Kind::Renew { term }, sent_at);
                    self.hosts[h].request = Some(request);
                }
                FenceEffect::Fence { .. } => {
                    // The daemon exits; its supervisor starts it again a little later.
                    self.report.fenced += 1;
                    let restart = t + 1 + self.rng.below_inclusive(2_000);
                    let host = &mut self.hosts[h];
                    host.restart_at_ms = Some(restart);
                    host.request = None;
                    return;
                }
            }
        }
        if let Some(next) = self.hosts[h].fence.poll_timeout() {
            assert!(next > now, "a timeout {next} not after {now}");
        }
        let host = &self.hosts[h];
        if host.fence.term().is_none() && host.request.is_none() && now >= host.next_poll {
            let request = self.send(Kind::Acquire, now);
            let host = &mut self.hosts[h];
            host.request = Some(request);
            host.next_poll = now.plus_ms(STANDBY_POLL_MS);
        }
    }

    /// The database's answer to `kind` from host `h`, at the true time.
    fn database(&mut self, h: usize, kind: Kind) -> Reply {
        let t = self.now_ms;
        let ttl = self.policy.ttl_ms;
        let incarnation = self.hosts[h].incarnation;
        if self.faults && self.rng.chance(1, 100) {
            return Reply::Failed;
        }
        match (kind, self.lease) {
            (Kind::Acquire, Some(lease)) if lease.expires_ms > t => Reply::Held,
            (Kind::Acquire, lease) => {
                let term = lease.map_or(1, |l| l.term + 1);
                self.lease = Some(DbLease {
                    host: h,
                    incarnation,
                    term,
                    expires_ms: t + ttl,
                });
                self.report.terms += 1;
                Reply::Acquired { term }
            }
            (Kind::Renew { term }, Some(lease))
                if lease.host == h && lease.incarnation == incarnation && lease.term == term =>
            {
                self.lease = Some(DbLease {
                    expires_ms: t + ttl,
                    ..lease
                });
                Reply::Renewed
            }
            (Kind::Renew { .. }, _) => Reply::Deposed,
        }
    }

    fn send(&mut self, kind: Kind, sent_at: Timestamp) -> Request {
        let there = self.delay();
        Request {
            kind,
            sent_at,
            arrives_ms: there.map(|d| self.now_ms + d),
            reply: None,
        }
    }

    /// A one-way delay: usually short, sometimes most of a TTL, sometimes lost (`None`).
    fn delay(&mut self) -> Option<u64> {
        if !self.faults {
            return Some(self.rng.below_inclusive(50));
        }
        if self.rng.chance(1, 100) {
            self.report.lost += 1;
            return None;
        }
        if self.rng.chance(1, 30) {
            return Some(self.rng.below_inclusive(self.policy.ttl_ms));
        }
        Some(self.rng.below_inclusive(200))
    }

    /// Host `h`'s clock at true time `t`.
    fn local(&self, h: usize, t: u64) -> Timestamp {
        let host = &self.hosts[h];
        Timestamp(host.offset_ms + (t * host.rate_per_mille / 1_000) as i64)
    }

    /// The hosts whose process is running, not stalled, and believes it leads.
    fn leaders(&self) -> Vec<usize> {
        let t = self.now_ms;
        (0..self.hosts.len())
            .filter(|&h| {
                let host = &self.hosts[h];
                t >= host.stalled_until_ms
                    && host.restart_at_ms.is_none()
                    && host.fence.is_leading(self.local(h, t))
            })
            .collect()
    }

    /// M2: a process acting as leader holds a lease the database has not expired.
    fn check(&self) {
        let t = self.now_ms;
        for h in self.leaders() {
            let host = &self.hosts[h];
            let lease = self.lease.expect("a leader without a lease row");
            assert!(
                lease.host == h
                    && lease.incarnation == host.incarnation
                    && Some(lease.term) == host.fence.term()
                    && t < lease.expires_ms,
                "host {h} (term {:?}) acts as leader at {t} ms but the lease is {lease:?}",
                host.fence.term()
            );
        }
    }
}
