//! kube-proxy's `ProxyHealthServer` state (`pkg/proxy/healthcheck/proxy_health.go`):
//! a change queued by a watcher and not yet synced is late once it waited
//! `timeout`; until then, and while nothing waits (starting up included),
//! the agent is healthy.
//!
//! kube-proxy has one notion of "synced": its rules were restored. Here a
//! sync can complete and still leave a service port out (a Service that does
//! not fit the maps), so two clocks run:
//! - `/livez` waits on the sync loop: late when a queued change was not
//!   taken by a completed sync within `timeout` (the loop is stuck). Restarting
//!   helps only then, so one Service that does not fit cannot put every
//!   node's agent into a crash loop.
//! - `/healthz` waits on the maps: late when a queued change is still not
//!   programmed, every service port of it, after `timeout`; and unhealthy
//!   while this node's Node is being deleted or is tainted
//!   `ToBeDeletedByClusterAutoscaler`, as kube-proxy's.

use std::time::{Duration, Instant, SystemTime};

/// kube-proxy's health timeout: twice its `--iptables-sync-period` (30 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The taint the Cluster Autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug)]
pub struct HealthState {
    timeout: Duration,
    /// The oldest change not yet taken by a completed sync.
    oldest_unsynced: Option<Instant>,
    /// The oldest change not yet programmed by a sync without errors.
    oldest_unprogrammed: Option<Instant>,
    /// The newest change queued (a change queued while a sync runs may have
    /// missed it).
    last_queued: Option<(Instant, SystemTime)>,
    /// When a sync last completed, and last completed without errors.
    last_synced: Option<SystemTime>,
    last_programmed: Option<SystemTime>,
    /// kube-proxy's `nodeEligible`: true while starting, until a Node event
    /// says otherwise.
    node_eligible: bool,
}

/// What the probes answer at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub livez: bool,
    pub healthz: bool,
    pub node_eligible: bool,
}

impl HealthState {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            oldest_unsynced: None,
            oldest_unprogrammed: None,
            last_queued: None,
            last_synced: None,
            last_programmed: None,
            node_eligible: true,
        }
    }

    /// A watcher observed a change the maps must follow (kube-proxy's
    /// `QueuedUpdate`): the oldest waiting one is kept.
    pub fn queued(&mut self, now: Instant, wall: SystemTime) {
        self.oldest_unsynced.get_or_insert(now);
        self.oldest_unprogrammed.get_or_insert(now);
        self.last_queued = Some((now, wall));
    }

    /// A sync that began at `started` completed; `programmed` when it left
    /// no service port out (kube-proxy's `Updated` is called only then).
    /// Changes queued after `started` may not be covered: they stay waiting,
    /// from the newest of them.
    pub fn synced(&mut self, started: Instant, programmed: bool, wall: SystemTime) {
        let uncovered = self.last_queued.map(|(at, _)| at).filter(|&at| at > started);
        self.oldest_unsynced = uncovered;
        self.last_synced = Some(wall);
        if programmed {
            self.oldest_unprogrammed = uncovered;
            self.last_programmed = Some(wall);
        } else {
            // Whatever this sync left out waits at least since it began.
            self.oldest_unprogrammed.get_or_insert(started);
        }
    }

    /// kube-proxy's `SyncNode`: the Node is being deleted or tainted for
    /// deletion (`eligible` false), or not.
    pub fn set_node_eligible(&mut self, eligible: bool) {
        self.node_eligible = eligible;
    }

    pub fn verdict(&self, now: Instant) -> Verdict {
        let in_time = |oldest: Option<Instant>| {
            oldest.is_none_or(|at| now.saturating_duration_since(at) < self.timeout)
        };
        Verdict {
            livez: in_time(self.oldest_unsynced),
            healthz: in_time(self.oldest_unprogrammed) && self.node_eligible,
            node_eligible: self.node_eligible,
        }
    }

    /// When a sync last completed without errors
    /// (`kubeproxy_sync_proxy_rules_last_timestamp_seconds`).
    pub fn last_programmed(&self) -> Option<SystemTime> {
        self.last_programmed
    }

    /// When a sync last completed at all.
    pub fn last_synced(&self) -> Option<SystemTime> {
        self.last_synced
    }

    /// When a change was last queued
    /// (`kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`).
    pub fn last_queued(&self) -> Option<SystemTime> {
        self.last_queued.map(|(_, wall)| wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn verdict(livez: bool, healthz: bool) -> Verdict {
        Verdict {
            livez,
            healthz,
            node_eligible: true,
        }
    }

    #[test]
    fn healthy_while_starting_until_a_queued_change_is_late() {
        let t0 = Instant::now();
        let mut h = HealthState::new(TIMEOUT);
        assert_eq!(
            h.verdict(t0 + secs(3600)),
            verdict(true, true),
            "nothing queued, ever"
        );
        h.queued(t0, SystemTime::now());
        assert_eq!(
            h.verdict(t0 + secs(59)),
            verdict(true, true),
            "queued, not late yet"
        );
        assert_eq!(
            h.verdict(t0 + TIMEOUT),
            verdict(false, false),
            "queued and never synced: late at the timeout"
        );
        h.queued(t0 + secs(50), SystemTime::now());
        assert_eq!(
            h.verdict(t0 + TIMEOUT),
            verdict(false, false),
            "a later change does not reset the oldest"
        );
        h.synced(t0 + secs(61), true, SystemTime::now());
        assert_eq!(
            h.verdict(t0 + secs(62)),
            verdict(true, true),
            "synced: healthy again"
        );
        assert!(h.last_programmed().is_some(), "the successful sync is recorded");
    }

    #[test]
    fn a_sync_that_leaves_a_port_out_fails_healthz_but_not_livez() {
        let t0 = Instant::now();
        let mut h = HealthState::new(TIMEOUT);
        h.queued(t0, SystemTime::now());
        h.synced(t0 + secs(1), false, SystemTime::now());
        assert_eq!(h.verdict(t0 + secs(59)), verdict(true, true), "not late yet");
        assert_eq!(
            h.verdict(t0 + secs(600)),
            verdict(true, false),
            "the loop keeps up (livez) while the change is not programmed (healthz)"
        );
        assert_eq!(h.last_programmed(), None, "no sync programmed everything");
        assert!(h.last_synced().is_some(), "a sync completed");
        h.queued(t0 + secs(700), SystemTime::now());
        h.synced(t0 + secs(700), false, SystemTime::now());
        assert_eq!(
            h.verdict(t0 + secs(701)),
            verdict(true, false),
            "failing again keeps the oldest unprogrammed change's age"
        );
        h.queued(t0 + secs(800), SystemTime::now());
        h.synced(t0 + secs(800), true, SystemTime::now());
        assert_eq!(
            h.verdict(t0 + secs(801)),
            verdict(true, true),
            "programmed at last"
        );
    }

    #[test]
    fn a_failed_sync_with_nothing_queued_counts_from_its_start() {
        let t0 = Instant::now();
        let mut h = HealthState::new(TIMEOUT);
        h.synced(t0, false, SystemTime::now());
        assert_eq!(h.verdict(t0 + secs(59)), verdict(true, true), "not late yet");
        assert_eq!(
            h.verdict(t0 + TIMEOUT),
            verdict(true, false),
            "late at the timeout"
        );
    }

    #[test]
    fn a_change_queued_during_a_sync_stays_waiting() {
        let t0 = Instant::now();
        let mut h = HealthState::new(TIMEOUT);
        h.queued(t0, SystemTime::now());
        // The sync began at t0 + 1 and the next change came at t0 + 2,
        // before it completed.
        h.queued(t0 + secs(2), SystemTime::now());
        h.synced(t0 + secs(1), true, SystemTime::now());
        assert_eq!(
            h.verdict(t0 + secs(61)),
            verdict(true, true),
            "counted from the uncovered change, not the first"
        );
        assert_eq!(
            h.verdict(t0 + secs(62)),
            verdict(false, false),
            "the uncovered change is late if no sync takes it"
        );
    }

    #[test]
    fn node_deletion_fails_healthz_only() {
        let t0 = Instant::now();
        let mut h = HealthState::new(TIMEOUT);
        h.set_node_eligible(false);
        assert_eq!(
            h.verdict(t0),
            Verdict {
                livez: true,
                healthz: false,
                node_eligible: false
            },
            "a Node being deleted or tainted ToBeDeletedByClusterAutoscaler"
        );
        h.set_node_eligible(true);
        assert_eq!(h.verdict(t0), verdict(true, true), "eligible again");
    }
}
