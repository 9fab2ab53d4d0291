//! Node leases and the janitor.
//!
//! Each node keeps one lease record ([`Space::Leases`]), renewed every third of
//! `presence.node_lease_ttl`; that is all a node writes while its users are connected and
//! idle, so store writes are O(nodes), not O(sessions). The lease carries its own
//! timestamps: liveness never depends on a backend's key expiry (silent on nats-server
//! 2.9; and an expired Redis key would take with it the record that the node existed).
//!
//! Which users a node holds sessions of is in the owner index ([`Space::Owners`], written
//! on a user's first session on the node and removed with the last). When a lease has not been renewed for its TTL, every surviving node's janitor
//! sees it; each tries to claim it with a compare-and-swap that marks the lease
//! `ended_by` itself, so exactly one wins and ends the dead node's sessions (one CAS per
//! user, so one `UserOffline` per user), then removes the index entries and the lease.
//! A claim not finished within two TTLs (the janitor died too) is claimed again.
//!
//! The janitor does not end a dead node's sessions outright: it *adopts* them, held for
//! the offline grace from the moment each was last heard of (for a session held by the
//! lease, the node's last renewal), so a client that reconnected elsewhere meanwhile
//! continues, and one that does not ends at its deadline, on the adopter, with one
//! `UserOffline`. A draining node (SIGTERM) hands its sessions over: it writes their
//! deadlines into the store, marks its lease `handed_over` (claimable at once, no
//! liveness question asked) and asks one live node to adopt them now.
//!
//! A node that was only cut off finds its lease claimed at the next renewal: it takes a
//! new lease, reconciles its sessions with the store by registration tag (a session whose
//! connection is still here comes back; one that moved or ended does not) and announces
//! it ([`Backplane::announce_sync`](super::Backplane::announce_sync)). A lease that is
//! simply gone (a Redis restarted without its data) is handled the same way: every node
//! writes its own sessions back. A restarted node adopts its previous incarnation's
//! sessions before taking its lease.
//!
//! Times are wall-clock milliseconds of the nodes: their clocks must agree to well
//! within the lease TTL (NTP).

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::owned::Owned;
use super::{unavailable, wrote, ClusterStore, Refused, Space};
use crate::core::{Millis, Session, UserId};
use crate::store::StoreError;

/// A node's lease, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLease {
    pub node_id: String,
    pub started_at: Millis,
    pub renewed_at: Millis,
    pub ttl_ms: i64,
    /// The node whose janitor claimed this lapsed lease, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Millis>,
    /// The node's sessions and users with a session on it at the last renewal (for the
    /// operator view: no write of its own).
    #[serde(default)]
    pub sessions: u64,
    #[serde(default)]
    pub users: u64,
    /// The node drained (SIGTERM) and wrote its sessions' deadlines into the store: any
    /// janitor may claim the lease at once and adopt them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_over: bool,
}

impl NodeLease {
    /// Whether a janitor at `now` may claim it: lapsed and unclaimed, or claimed by a
    /// janitor that has not finished within two TTLs.
    pub fn claimable(&self, now: Millis) -> bool {
        match self.ended_at {
            None => self.handed_over || self.renewed_at.saturating_add(self.ttl_ms) < now,
            Some(t) => t.saturating_add(2 * self.ttl_ms) < now,
        }
    }

    /// Lapsed for more than `SPARED_TTLS` TTLs: claimed even if its node answers (it
    /// runs, but cannot keep its state in the store).
    pub fn long_lapsed(&self, now: Millis) -> bool {
        self.renewed_at.saturating_add(SPARED_TTLS * self.ttl_ms) < now
    }
}

/// This node's view of its own lease.
#[derive(Debug, Default)]
pub struct LeaseState {
    /// Revision of our lease key as we last wrote it; `None` until written.
    revision: Mutex<Option<u64>>,
    /// How many leases the last scan listed (this node's view of the cluster's size).
    nodes_seen: std::sync::atomic::AtomicUsize,
    /// When this node's own renewal last failed or took over a third of the TTL (wall
    /// clock ms; 0: never).
    troubled_at: std::sync::atomic::AtomicI64,
}

/// Whether a renewal of this node's own lease failed or was slow within the last TTL: the
/// store is then too slow to tell a dead node from one whose renewals are late, and this
/// node's janitor claims nobody's lease (short of `SPARED_TTLS`).
fn recently_troubled(now: Millis, troubled_at: Millis, ttl_ms: i64) -> bool {
    troubled_at != 0 && now.saturating_sub(troubled_at) < ttl_ms
}

/// How many janitor scans the whole cluster aims at per renewal period. Every node
/// scanning every period would cost O(nodes²) store requests (a listing and a read of
/// each lease, per node): 52 nodes made 2,700 requests every 5 s, and under a connect
/// ramp the scans took 8-28 s. Each node scans with probability `SCANS / nodes` instead,
/// so a lapsed lease is still seen within about a third of a period after it lapses.
const SCANS_PER_PERIOD: f64 = 3.0;

/// Whether this node scans this period, given the cluster's size and a roll in [0, 1).
fn scans(nodes: usize, roll: f64) -> bool {
    nodes as f64 <= SCANS_PER_PERIOD || roll < SCANS_PER_PERIOD / nodes as f64
}

/// How many TTLs a lapsed lease whose node still answers is left unclaimed.
const SPARED_TTLS: i64 = 4;

/// A node's announcement that it wrote its sessions back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncNotice {
    pub node_id: String,
    pub sessions: usize,
    pub at: Millis,
}

impl ClusterStore {
    fn lease_value(&self, now: Millis) -> Result<Bytes, StoreError> {
        let (sessions, users) = {
            let owned = self.inner.owned.lock();
            (owned.session_count(), owned.user_count())
        };
        let l = NodeLease {
            sessions,
            users,
            node_id: self.inner.node.to_string(),
            started_at: self.inner.started_at,
            renewed_at: now,
            ttl_ms: self.inner.opts.lease_ttl_ms,
            ended_by: None,
            ended_at: None,
            handed_over: false,
        };
        serde_json::to_vec(&l).map(Bytes::from).map_err(unavailable)
    }

    /// Whether `node` answers a request within the store's timeout (a dead node's
    /// subscription is gone: NATS says so at once, Redis when the timeout passes).
    async fn answers(&self, node: &str) -> bool {
        self.inner.bp.request(node, "alive", Bytes::new(), self.inner.opts.kv_timeout).await.is_ok()
    }

    /// At start-up: ends what a previous incarnation of this node left, then takes the lease.
    pub(super) async fn take_lease(&self) -> Result<(), StoreError> {
        let node = self.inner.node.clone();
        let now = self.inner.clock.now();
        let prev = self.inner.bp.get(Space::Leases, &node).await.map_err(unavailable)?;
        if let Some(value) = prev.and_then(|r| r.value) {
            if let Ok(prev) = serde_json::from_slice::<NodeLease>(&value) {
                if prev.ended_at.is_none() && prev.renewed_at.saturating_add(prev.ttl_ms) > now {
                    tracing::warn!(
                        node = %self.inner.node,
                        renewed_ms_ago = now - prev.renewed_at,
                        "this node's lease is still live: a previous process just stopped, or another process runs with the same service.node_id"
                    );
                }
                let (n, failed) = self.adopt_sessions_of(&self.inner.node.clone(), self.inner.started_at, prev.renewed_at).await;
                if n > 0 {
                    tracing::info!(users = n, "took over the sessions of this node's previous run (held for the offline grace)");
                }
                if failed > 0 {
                    return Err(unavailable(format!("could not end {failed} sessions of this node's previous run")));
                }
            }
        }
        let rev = self.inner.bp.put(Space::Leases, &node, self.lease_value(now)?).await.map_err(unavailable)?;
        wrote(&self.inner, "lease");
        *self.inner.lease.revision.lock() = Some(rev);
        Ok(())
    }

    /// Renews this node's lease; if a janitor claimed it meanwhile (this node was cut
    /// off for longer than the TTL), writes this node's sessions again.
    pub(super) async fn renew_lease(&self) {
        if !self.inner.degraded.breaker.allow(std::time::Instant::now()) {
            return; // degraded: a probe goes through once the back-off has passed
        }
        let node = self.inner.node.clone();
        let now = self.inner.clock.now();
        let Ok(value) = self.lease_value(now) else { return };
        let rev = *self.inner.lease.revision.lock();
        let t0 = std::time::Instant::now();
        let r = match rev {
            // A different revision, or no lease at all: claimed by a janitor, or lost
            // with the store's data.
            Some(rev) => self.inner.bp.swap(Space::Leases, &node, Some(rev), value, None).await.map_err(|e| match e {
                Refused::Conflict => (true, "claimed".to_string()),
                Refused::Fault(f) => (false, f.0),
            }),
            None => self.inner.bp.put(Space::Leases, &node, value).await.map_err(|e| (false, e.0)),
        };
        self.outcome(!matches!(r, Err((false, _))));
        let slow = t0.elapsed().as_millis() as i64 > self.inner.opts.lease_ttl_ms / 3;
        if slow || matches!(r, Err((false, _))) {
            self.inner.lease.troubled_at.store(now, std::sync::atomic::Ordering::Relaxed);
        }
        match r {
            Ok(rev) => {
                wrote(&self.inner, "lease");
                *self.inner.lease.revision.lock() = Some(rev);
                metrics::gauge!(self.inner.bp.names().lease_renewed_at).set(now as f64 / 1000.0);
                if !self.inner.degraded.dirty.lock().is_empty() {
                    self.sync_dirty().await;
                }
            }
            Err((true, _)) if self.renewal_answer_lost(&node).await => {
                tracing::info!(node = %self.inner.node, "an earlier renewal of this node's lease was written though its answer timed out; carrying on from it");
            }
            Err((true, _)) => {
                tracing::warn!(node = %self.inner.node, "this node's lease was claimed while it was unreachable, or lost with the store's data; writing its sessions again");
                metrics::counter!(self.inner.bp.names().lease_lost).increment(1);
                *self.inner.lease.revision.lock() = None;
                self.resync().await;
            }
            Err((false, e)) => tracing::warn!(error = %e, "could not renew this node's lease; retrying"),
        }
    }

    /// After a renewal's conflict: whether the stored lease is still this run's, unclaimed
    /// (a renewal that timed out on the way back was written all the same, so the
    /// revision moved). Then its revision is taken and nothing was lost. Without this
    /// check, every renewal answer lost under load looked like a claim, and the node wrote
    /// all its sessions back (the 52-node ramp: 45 "claims" in 9 minutes).
    async fn renewal_answer_lost(&self, node: &str) -> bool {
        let Ok(Some(record)) = self.inner.bp.get(Space::Leases, node).await else { return false };
        let Some(lease) = record.value.and_then(|v| serde_json::from_slice::<NodeLease>(&v).ok()) else { return false };
        let ours = lease.node_id == node && lease.started_at == self.inner.started_at && lease.ended_at.is_none();
        if ours {
            *self.inner.lease.revision.lock() = Some(record.revision);
        }
        ours
    }

    /// After the lease was lost: takes a new one and writes every session this node holds
    /// back into the store (the janitor ended them meanwhile).
    async fn resync(&self) {
        let now = self.inner.clock.now();
        let Ok(v) = self.lease_value(now) else { return };
        match self.inner.bp.put(Space::Leases, &self.inner.node, v).await {
            Ok(rev) => {
                wrote(&self.inner, "lease");
                *self.inner.lease.revision.lock() = Some(rev);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not take a new lease; retrying");
                return;
            }
        }
        let mut users: Vec<UserId> = self.inner.owned.lock().all().into_iter().map(|(u, _, _)| u).collect();
        users.extend(self.inner.degraded.dirty.lock().drain());
        users.sort();
        users.dedup();
        let n = self.sync_users(&users).await;
        self.announce_sync(n).await;
    }

    /// Looks for lapsed leases of other nodes and, for each one it wins the claim of,
    /// ends that node's sessions. Returns how many sessions' users it handled.
    /// Every node's lease, as last renewed (the operator view's nodes).
    pub async fn nodes(&self) -> Result<Vec<NodeLease>, StoreError> {
        let keys = self.inner.bp.keys(Space::Leases).await.map_err(unavailable)?;
        let mut out = Vec::with_capacity(keys.len());
        for node in keys {
            if let Ok(Some(record)) = self.inner.bp.get(Space::Leases, &node).await {
                if let Some(lease) = record.value.and_then(|v| serde_json::from_slice::<NodeLease>(&v).ok()) {
                    out.push(lease);
                }
            }
        }
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(out)
    }

    /// A periodic janitor round: scans with probability `SCANS_PER_PERIOD / nodes`.
    pub(super) async fn janitor_round(&self) -> usize {
        let nodes = self.inner.lease.nodes_seen.load(std::sync::atomic::Ordering::Relaxed);
        if !scans(nodes, rand::random::<f64>()) {
            return 0;
        }
        self.janitor().await
    }

    pub async fn janitor(&self) -> usize {
        if self.inner.degraded.breaker.is_open() {
            return 0;
        }
        let nodes = match self.inner.bp.keys(Space::Leases).await {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(error = %e, "janitor cannot list leases");
                return 0;
            }
        };
        self.inner.lease.nodes_seen.store(nodes.len(), std::sync::atomic::Ordering::Relaxed);
        let mut handled = 0;
        for node in nodes.into_iter().filter(|n| **n != *self.inner.node) {
            let now = self.inner.clock.now();
            let Ok(Some(record)) = self.inner.bp.get(Space::Leases, &node).await else { continue };
            let Some(value) = record.value else { continue };
            let Ok(lease) = serde_json::from_slice::<NodeLease>(&value) else { continue };
            if !lease.claimable(now) {
                continue;
            }
            if !lease.handed_over && !lease.long_lapsed(now) {
                // A lease lapses when its node is gone, or when the store was too slow to
                // take its renewals. Claiming a running node's lease takes all its
                // sessions, and the node writes them all back at its next renewal: under
                // overload that doubles the load that made the renewals late (52 nodes: 61
                // claims in 10 minutes). So a node that still answers keeps its lease, up
                // to `SPARED_TTLS` TTLs lapsed. And a janitor whose own renewals are late
                // cannot tell the two apart at all. A handed-over lease needs no question.
                let troubled = recently_troubled(
                    now,
                    self.inner.lease.troubled_at.load(std::sync::atomic::Ordering::Relaxed),
                    self.inner.opts.lease_ttl_ms,
                );
                if troubled || self.answers(&lease.node_id).await {
                    metrics::counter!(self.inner.bp.names().janitor_spared).increment(1);
                    tracing::info!(node = %lease.node_id, last_renewal_ms_ago = now - lease.renewed_at, troubled, "a lapsed lease not claimed: its node answers, or this node's own renewals are late");
                    continue;
                }
            }
            handled += self.claim(&node, record.revision, lease, now).await;
        }
        handled
    }

    /// Claims the lapsed or handed-over lease of `node` (a compare-and-swap on it: exactly
    /// one janitor wins) and adopts the node's sessions. Returns the users handled.
    async fn claim(&self, node: &str, revision: u64, lease: NodeLease, now: Millis) -> usize {
        let claim = NodeLease { ended_by: Some(self.inner.node.to_string()), ended_at: Some(now), handed_over: false, ..lease.clone() };
        let Ok(body) = serde_json::to_vec(&claim) else { return 0 };
        let Ok(claim_rev) = self.inner.bp.swap(Space::Leases, node, Some(revision), body.into(), None).await else { return 0 };
        wrote(&self.inner, "lease");
        metrics::counter!(self.inner.bp.names().janitor_claims).increment(1);
        let (n, failed) = self.adopt_sessions_of(&lease.node_id, now, lease.renewed_at).await;
        if lease.handed_over {
            tracing::info!(node = %lease.node_id, users = n, "a draining node handed its sessions over; adopted them");
        } else {
            tracing::warn!(node = %lease.node_id, users = n, last_renewal_ms_ago = now - lease.renewed_at, "node lease lapsed: adopted its sessions (held for the offline grace)");
        }
        if failed > 0 {
            // The claim stays: after two TTLs a janitor claims it again and retries.
            tracing::warn!(node = %lease.node_id, failed, "some of a dead node's sessions could not be taken over yet");
        } else if self.inner.bp.remove(Space::Leases, node, Some(claim_rev)).await.is_ok() {
            wrote(&self.inner, "lease");
        }
        n
    }

    /// A draining node asked this one to adopt its sessions now (see [`NodeLease::handed_over`]).
    pub(super) async fn adopt_drained(&self, node: &str) {
        if node == &*self.inner.node || self.inner.degraded.breaker.is_open() {
            return;
        }
        let Ok(Some(record)) = self.inner.bp.get(Space::Leases, node).await else { return };
        let Some(lease) = record.value.and_then(|v| serde_json::from_slice::<NodeLease>(&v).ok()) else { return };
        if lease.handed_over && lease.ended_at.is_none() {
            self.claim(node, record.revision, lease, self.inner.clock.now()).await;
        }
    }

    /// Takes over the sessions `owner` held that started at or before `until` (see
    /// [`crate::core::UserState::adopt_node`]): each is held here for the rest of its
    /// offline grace (from `last_alive` for one held by the owner's lease), or ends now
    /// if that is over. Removes the owner's index entries. Returns the users handled and
    /// those that failed (or could not be listed).
    async fn adopt_sessions_of(&self, owner: &str, until: Millis, last_alive: Millis) -> (usize, usize) {
        let mut failed = 0;
        let users = match self.inner.bp.keys(Space::Owners(owner)).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the owner index");
                failed += 1;
                Vec::new()
            }
        };
        let node = self.inner.node.clone();
        let grace = self.inner.opts.offline_grace_ms;
        let mut n = 0;
        for user in users {
            let Ok(id) = UserId::parse(&user, usize::MAX) else { continue };
            let rev = match self.inner.bp.get(Space::Owners(owner), &user).await {
                Ok(Some(r)) => r.revision,
                Ok(None) => continue,
                Err(_) => {
                    failed += 1;
                    continue;
                }
            };
            if self.index_begin(&id).await.is_err() {
                failed += 1;
                continue;
            }
            let r = self
                .apply(&id, false, |s, now| {
                    let (change, adopted) = s.adopt_node(owner, until, last_alive, grace, &node, &node, now);
                    (adopted, change)
                })
                .await;
            let adopted = match &r {
                Ok(Some((adopted, _))) => adopted.clone(),
                _ => Vec::new(),
            };
            {
                let mut owned = self.inner.owned.lock();
                for a in &adopted {
                    owned.insert(&id, &a.device_id, Owned::of(a, self.inner.clock.now()));
                }
                owned.finish(&id, &crate::core::DeviceId::from(""), None);
            }
            metrics::counter!(self.inner.bp.names().adopted).increment(adopted.len() as u64);
            if let Err(e) = r {
                tracing::warn!(user = %id, error = %e, "could not take over a dead node's session");
                self.index_end(&id).await;
                failed += 1;
                continue;
            }
            n += 1;
            if owner != &*node {
                // Only if nobody re-wrote it meanwhile (a new incarnation of that node).
                if self.inner.bp.remove(Space::Owners(owner), &user, Some(rev)).await.is_ok() {
                    wrote(&self.inner, "index");
                }
            }
            self.index_end(&id).await;
        }
        (n, failed)
    }

    /// At a drain (SIGTERM): writes the deadline of every session this node holds into
    /// the store (each held for the offline grace: its connection was closed with 1012,
    /// or, for a gateway's session, the node that took its registrations is leaving),
    /// marks the lease handed over and asks another node to adopt them now. A client that
    /// reconnects anywhere within the grace continues its session; the adopter ends the
    /// others at their deadlines. Returns the users written.
    pub(super) async fn hand_over_all(&self) -> usize {
        let node = self.inner.node.clone();
        let now = self.inner.clock.now();
        let grace = self.inner.opts.offline_grace_ms;
        let mut users: Vec<UserId> = self.inner.owned.lock().all().into_iter().map(|(u, _, _)| u).collect();
        users.sort();
        users.dedup();
        let (mut written, mut failed) = (0, 0);
        for user in &users {
            let held: Vec<Session> = self
                .inner
                .owned
                .lock()
                .all_of(user)
                .into_iter()
                .map(|(d, o)| {
                    let mut s = o.session(&d, &node);
                    if !s.lingering {
                        s.expires_at = s.expires_at.min(now.saturating_add(grace));
                        s.last_heartbeat = now;
                        s.lingering = true;
                    }
                    s
                })
                .collect();
            match self.apply(user, false, |s, now| ((), s.hand_over(&node, &held, &node, now))).await {
                Ok(_) => written += 1,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(user = %user, error = %e, "could not hand a session over; the node lease's lapse will");
                }
            }
        }
        if failed > 0 {
            return written;
        }
        let Ok(mut lease) = self.lease_value(now).and_then(|v| serde_json::from_slice::<NodeLease>(&v).map_err(unavailable)) else {
            return written;
        };
        lease.handed_over = true;
        let Ok(body) = serde_json::to_vec(&lease) else { return written };
        let rev = *self.inner.lease.revision.lock();
        match self.inner.bp.swap(Space::Leases, &node, rev, body.into(), None).await {
            Ok(rev) => {
                wrote(&self.inner, "lease");
                *self.inner.lease.revision.lock() = Some(rev);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not mark this node's lease handed over; it will lapse instead");
                return written;
            }
        }
        // One live node adopts at once; the janitors would within a renewal period.
        if let Ok(nodes) = self.inner.bp.keys(Space::Leases).await {
            let others: Vec<&String> = nodes.iter().filter(|n| **n != *node).collect();
            if !others.is_empty() {
                let peer = others[(rand::random::<u64>() % others.len() as u64) as usize];
                if let Err(e) = self.inner.bp.tell(peer, "adopt", Bytes::from(node.to_string())).await {
                    tracing::debug!(peer = %peer, error = %e, "could not ask a node to adopt this one's sessions");
                }
            }
        }
        tracing::info!(users = written, "draining: this node's sessions handed over (held for the offline grace)");
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renewed_at: Millis) -> NodeLease {
        NodeLease {
            node_id: "a".into(),
            started_at: 0,
            renewed_at,
            ttl_ms: 1000,
            ended_by: None,
            ended_at: None,
            sessions: 0,
            users: 0,
            handed_over: false,
        }
    }

    #[test]
    fn janitors_scan_about_three_times_a_period_whatever_the_cluster_size() {
        let rolls: Vec<f64> = (0..10_000).map(|i| i as f64 / 10_000.0).collect();
        for nodes in [0, 1, 3] {
            assert!(rolls.iter().all(|r| scans(nodes, *r)), "small clusters: every node, every period");
        }
        for nodes in [4, 10, 52, 500] {
            let share = rolls.iter().filter(|r| scans(nodes, **r)).count() as f64 / rolls.len() as f64;
            let cluster_wide = share * nodes as f64;
            assert!((cluster_wide - SCANS_PER_PERIOD).abs() < 0.05, "{nodes} nodes: {cluster_wide} scans per period");
        }
    }

    #[test]
    fn a_lease_is_claimable_after_its_ttl_and_a_claim_after_two() {
        let l = lease(5000);
        assert!(!l.claimable(5500));
        assert!(!l.claimable(6000));
        assert!(l.claimable(6001));
        let claimed = NodeLease { ended_by: Some("b".into()), ended_at: Some(6001), ..l };
        assert!(!claimed.claimable(7000), "someone is on it");
        assert!(claimed.claimable(8002), "its janitor died: claim again");
        let drained = NodeLease { handed_over: true, ..lease(5000) };
        assert!(drained.claimable(5001), "a drained node's lease at once");
    }

    #[test]
    fn a_janitor_with_late_renewals_of_its_own_spares_lapsed_leases_for_a_ttl() {
        assert!(!recently_troubled(10_000, 0, 1000), "never troubled");
        assert!(recently_troubled(10_000, 9_500, 1000));
        assert!(!recently_troubled(10_000, 9_000, 1000), "a TTL after its last late renewal");
        let l = lease(5000);
        assert!(!l.long_lapsed(9000));
        assert!(l.long_lapsed(9001), "four TTLs: claimed whatever the janitor's health");
    }
}
