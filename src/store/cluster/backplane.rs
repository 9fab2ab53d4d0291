//! What a cluster node needs from the engine it shares with the other nodes: versioned
//! records (users, node leases, the owner index, directory rows) and messages (events,
//! typing, node-to-node requests). NATS JetStream ([`crate::store::nats`]) and Redis
//! ([`crate::store::redis`]) implement it; everything else about cluster mode (the
//! compare-and-swap transitions, leases and the janitor, degraded mode, interest-routed
//! fan-out) is written once, in [`super`], over this trait.
//!
//! Records carry a revision that grows with every write of the key; a write can be made
//! conditional on it (compare-and-swap). A backend never blocks a caller for long: each
//! call fails with a [`Fault`] after the backend's request timeout.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::core::{EventKind, UserId};
use crate::store::DirTable;

/// The backend could not be reached, or did not answer in time (feeds the circuit breaker).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Fault(pub String);

impl Fault {
    pub fn new(e: impl std::fmt::Display) -> Fault {
        Fault(e.to_string())
    }
}

/// Why a conditional write was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The key's revision was not the expected one (someone wrote in between).
    #[error("revision changed")]
    Conflict,
    #[error("{0}")]
    Fault(#[from] Fault),
}

/// A stored value and its revision. `value: None` is a deletion marker (the revision
/// stays, so the next write of the key still compares against it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Option<Bytes>,
    pub revision: u64,
}

/// The keyspaces of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space<'a> {
    /// One record per user: the user's whole [`crate::core::UserState`] (key: the user id).
    Users,
    /// One record per node: its [`super::lease::NodeLease`] (key: the node id).
    Leases,
    /// The users a node holds sessions of (key: the user id; the value is empty).
    Owners(&'a str),
    /// One record per gateway instance lease (key: the instance id; the value: its
    /// deadline, decimal Unix milliseconds), so a refresh on any node is seen by all.
    Instances,
}

/// A change of a directory row, as a backend delivers it to every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowChange {
    pub table: DirTable,
    pub key: String,
    /// `None`: the row was deleted.
    pub value: Option<Bytes>,
    pub revision: u64,
}

/// A request from another node (see [`Backplane::serve`]).
#[derive(Debug)]
pub struct Incoming {
    pub op: String,
    pub payload: Bytes,
    /// Where the answer goes (`None`: the sender expects none).
    pub reply: Option<String>,
}

/// Connection health for `/health/<backend>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    pub state: &'static str,
    pub connected: bool,
    pub server: String,
    pub urls: String,
}

/// Metric names of one backend (`nats_*`, `redis_*`), so the shared logic reports under
/// the names its operators already use.
#[derive(Debug)]
pub struct Names {
    /// The `backend` label of `store_writes_total`.
    pub backend: &'static str,
    pub degraded: &'static str,
    pub cas_writes: &'static str,
    pub cas_conflicts: &'static str,
    pub interest_users: &'static str,
    /// Gauge: 1 while the node takes every user's events (batched interest), else 0.
    pub interest_all: &'static str,
    /// Snapshot reads that waited for newly watched users' subscriptions.
    pub interest_waits: &'static str,
    pub events_received: &'static str,
    pub events_out_of_order: &'static str,
    pub publish_timeouts: &'static str,
    pub forwarded_heartbeats: &'static str,
    pub janitor_claims: &'static str,
    /// Lapsed leases left unclaimed: their node answered, or the janitor's own renewals
    /// were late.
    pub janitor_spared: &'static str,
    pub lease_lost: &'static str,
    pub lease_renewed_at: &'static str,
    pub degraded_local_changes: &'static str,
    /// Users whose stored record lacked a session held here, written again.
    pub repairs: &'static str,
    /// Events made up after this node's subscriptions were interrupted (a watched user's
    /// stored state newer than what its watchers were given).
    pub made_up: &'static str,
    /// Sessions of a drained or dead node adopted here.
    pub adopted: &'static str,
    pub directory_rewatch: &'static str,
    /// What a refused write tells the client while degraded.
    pub degraded_reason: &'static str,
}

/// A set of event subscriptions that follows this node's interest. Messages (event
/// payloads, [`crate::wire::event::WireEvent`] JSON) arrive on the channel given to
/// [`Backplane::feed`].
#[async_trait]
pub trait Feed: Send {
    /// Starts receiving `user`'s events.
    async fn watch(&mut self, user: &UserId) -> Result<(), Fault>;
    /// Stops receiving `user`'s events.
    async fn unwatch(&mut self, user: &UserId);
    /// Every user's events (`true`) or only the watched users' (`false`) from now on.
    async fn watch_all(&mut self, on: bool) -> Result<(), Fault>;
    /// Returns once the server has every subscription asked for so far.
    async fn settle(&mut self);
}

/// The shared engine of a cluster.
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    fn names(&self) -> &'static Names;

    // Records.

    async fn get(&self, space: Space<'_>, key: &str) -> Result<Option<Versioned>, Fault>;
    /// Writes unconditionally; returns the new revision.
    async fn put(&self, space: Space<'_>, key: &str, value: Bytes) -> Result<u64, Fault>;
    /// Writes only if the key is at `expected` (`None`: only if it does not exist).
    /// `forget_after`: the record may be dropped after that long without a write (a user
    /// with nothing live to remember); backends without per-key expiry ignore it.
    async fn swap(
        &self,
        space: Space<'_>,
        key: &str,
        expected: Option<u64>,
        value: Bytes,
        forget_after: Option<Duration>,
    ) -> Result<u64, Refused>;
    /// Removes the key (only if still at `expected`, when given).
    async fn remove(&self, space: Space<'_>, key: &str, expected: Option<u64>) -> Result<(), Refused>;
    /// The keys of a space (leases, one node's owner index); not offered for users.
    async fn keys(&self, space: Space<'_>) -> Result<Vec<String>, Fault>;
    /// Every write of any user's record, as made (keeps a read cache coherent). `None`:
    /// this backend does not offer it, and reads always go to the backend.
    fn watch_users(&self) -> Option<mpsc::Receiver<(UserId, Versioned)>>;

    // The directory.

    /// Stores a row (`value` empty: deleted); returns its revision.
    async fn put_row(&self, table: DirTable, key: &str, value: Bytes) -> Result<u64, Fault>;
    /// Every row (deleted ones left out).
    async fn rows(&self) -> Result<Vec<(DirTable, String, Bytes)>, Fault>;
    /// Rows as any node changes them, from now on; the backend resumes where it left off
    /// after a lost connection (a row may then come twice, never not at all).
    async fn watch_rows(&self) -> Result<mpsc::Receiver<RowChange>, Fault>;

    // Messages.

    /// Publishes a presence event to the user's watchers on every node (and to the
    /// backend's durable event log, where it has one).
    async fn publish_event(&self, kind: EventKind, user: &UserId, payload: Bytes) -> Result<(), Fault>;
    /// A set of subscriptions delivering event payloads to `tx`.
    async fn feed(&self, tx: mpsc::Sender<Bytes>) -> Result<Box<dyn Feed>, Fault>;
    async fn publish_typing(&self, conversation: &str, payload: Bytes) -> Result<(), Fault>;
    async fn subscribe_typing(&self) -> Result<mpsc::Receiver<Bytes>, Fault>;
    /// Tells other nodes (and operators) that `node` wrote its sessions back.
    async fn announce_sync(&self, node: &str, payload: Bytes) -> Result<(), Fault>;
    /// Asks `node` and waits for its answer.
    async fn request(&self, node: &str, op: &str, payload: Bytes, timeout: Duration) -> Result<Bytes, Fault>;
    /// Tells `node`, expecting no answer.
    async fn tell(&self, node: &str, op: &str, payload: Bytes) -> Result<(), Fault>;
    /// Requests addressed to `node` (this node), from now on.
    async fn serve(&self, node: &str) -> Result<mpsc::Receiver<Incoming>, Fault>;
    async fn respond(&self, reply: &str, payload: Bytes) -> Result<(), Fault>;

    /// Counts the times this node's subscriptions came back after an interruption (a
    /// reconnect, a failover), each counted once they are in place at the server again:
    /// what other nodes published meanwhile did not reach this node.
    fn resumed(&self) -> watch::Receiver<u64>;

    fn health(&self) -> Health;
    /// Waits until what was published so far reached the server.
    async fn flush(&self);
    /// Stops the backend's own tasks.
    fn close(&self);
}
