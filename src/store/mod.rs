//! Where presence state lives. A backend implements two small traits:
//! [`PresenceStore`] (users' statuses and device sessions, over the pure transitions in
//! [`crate::core::state`]) and [`DirectoryStore`] (the rows of the directory: contacts,
//! privacy settings, conversation members); [`Store`] is both, the one interface the
//! service uses. The embedded [`memory::MemoryStore`] is the default; cluster mode is
//! [`cluster::ClusterStore`], over a [`cluster::Backplane`]: [`nats`] (JetStream) or
//! [`redis`]. One conformance suite (tests/store_conformance.rs) runs on each.

pub mod cluster;
pub mod memory;
pub mod nats;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;

use crate::core::{Activity, Ending, Millis, NewSession, Presence, Registered, Session, Status, UserId};

/// The directory's tables (durable side data kept beside presence records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DirTable {
    /// user id → JSON array of contact ids (the user's audience).
    Contacts,
    /// user id → JSON privacy settings.
    Privacy,
    /// conversation id → JSON array of member ids.
    Conversations,
}

impl DirTable {
    pub const ALL: [DirTable; 3] = [DirTable::Contacts, DirTable::Privacy, DirTable::Conversations];

    /// The table's name (redb table, key prefix of the cluster backends).
    pub fn name(self) -> &'static str {
        match self {
            DirTable::Contacts => "contacts",
            DirTable::Privacy => "privacy",
            DirTable::Conversations => "conversations",
        }
    }

    pub fn from_name(name: &str) -> Option<DirTable> {
        DirTable::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Why a store operation failed: a small closed set of kinds (async-nats's
/// `Error<Kind>` idea), so callers match what they can act on. Input is validated before
/// it reaches a store; these are the store's own failures, and the limits it enforces
/// atomically. Messages are safe to show clients, except [`StoreError::Corrupt`]'s detail,
/// which the error table turns into an internal error (logged, never sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached, or did not answer in time.
    #[error("presence store unavailable: {0}")]
    Unreachable(String),
    /// The backend's settings cannot work (a bad URL, a missing TLS or credentials file,
    /// refused credentials): waiting would not help.
    #[error("{0}")]
    Misconfigured(String),
    /// A cluster node cut off from the center refuses what it cannot order (degraded mode).
    #[error("{0}")]
    Degraded(String),
    /// The write could not be made durable (the database cannot commit: a full disk).
    #[error("{0}")]
    NotDurable(String),
    /// The store is stopping.
    #[error("the presence store is shutting down")]
    ShuttingDown,
    /// A stored value cannot be read.
    #[error("stored value of {key} is not readable: {detail}")]
    Corrupt { key: String, detail: String },
    /// A key kept changing under a compare-and-swap: too many writers at once; retry.
    #[error("too many concurrent changes of {key}; retry")]
    Contended { key: String },
    /// A new device session was refused: the user already has `max` live ones.
    #[error("at most {max} devices per user")]
    TooManyDevices { max: usize },
}

/// An explicit status write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetStatus {
    pub status: Status,
    pub message: Arc<str>,
    /// `None`: the status holds until changed.
    pub ttl_ms: Option<i64>,
}

/// Cheap counters for gauges and health (centrifuge's `PresenceStats` idea: never a listing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Users held in memory (known users).
    pub users: u64,
    /// Users with at least one live device session.
    pub online_users: u64,
    /// Live device sessions.
    pub sessions: u64,
    /// Reads that found a known user / an unknown one (embedded store), or read-cache
    /// hits / misses (cluster backends: see `read_cache`).
    pub hits: u64,
    pub misses: u64,
    /// Whether `hits`/`misses` count a read cache (cluster backends) rather than lookups.
    pub read_cache: bool,
    /// Writes to a shared store (cluster backends) since start: the `store_writes_total` metric.
    pub writes: u64,
    /// Cluster backends: other nodes' events received, and the users this node follows
    /// (interest-routed fan-out).
    pub remote_events: u64,
    pub watched_users: u64,
    /// Read cache (cluster backends): entries evicted for space, and its cost (bytes).
    pub evictions: u64,
    pub cache_cost: u64,
}

/// Users' presence: explicit statuses and device sessions. Every method is safe to call
/// concurrently from many tasks.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Presence of each id, in order; `None` for a user the service has never seen.
    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError>;

    /// Sets an explicit status and returns the resulting presence. Durable when it returns.
    async fn set_status(&self, id: &UserId, req: SetStatus) -> Result<Presence, StoreError>;

    /// Clears the explicit status: the derived status applies again.
    async fn clear_status(&self, id: &UserId) -> Result<Presence, StoreError>;

    /// Erases the user's record (status, message, `last_seen`, and any session still held)
    /// wherever this store keeps it, and publishes one `user_erased` event. `false` when
    /// there was no record. The caller ends the sessions first (their owners must hear it).
    async fn erase(&self, id: &UserId) -> Result<bool, StoreError>;

    /// Registers (or replaces) a device session alive for `req.ttl_ms` unless refreshed.
    /// A new device beyond `req.max_devices` live sessions is refused with
    /// [`StoreError::TooManyDevices`], atomically with the registration.
    async fn register_session(&self, id: &UserId, req: NewSession) -> Result<Registered, StoreError>;

    /// Extends a live session; `Ok(None)` when there is none (register again).
    async fn refresh_session(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError>;

    /// Ends a session as `ending` says: at once, or held for the offline grace (no
    /// event; a registration of the device before the deadline continues it). `Ok(false)`
    /// when there was none. With `sid`, only the registration with that tag (a connection
    /// ending its own session must not end a newer connection's registration of the same
    /// device).
    async fn end_session(&self, id: &UserId, device: &str, sid: Option<u64>, ending: Ending) -> Result<bool, StoreError>;

    /// Says whether the user is active on `device` (the registration tagged `sid`, when
    /// given): an event when readers see a change (the device's state, automatic away
    /// beginning or ending), and it arms automatic away. One write per change; none when
    /// nothing changes. `Ok(false)` when the device has no live, connected session.
    /// `reassert`: the device says it with every heartbeat, so a state a cluster node's
    /// read cache already shows is taken as is (no write; on NATS, whose cache follows the
    /// KV, no round trip either); a stale cache is corrected by the next heartbeat.
    async fn set_activity(
        &self,
        id: &UserId,
        device: &str,
        sid: Option<u64>,
        activity: Activity,
        reassert: bool,
    ) -> Result<bool, StoreError>;

    /// [`PresenceStore::end_session`] at once (a deliberate sign-out).
    async fn unregister_session(&self, id: &UserId, device: &str, sid: Option<u64>) -> Result<bool, StoreError> {
        self.end_session(id, device, sid, Ending::Now).await
    }

    /// The user's live device sessions.
    async fn devices(&self, id: &UserId) -> Result<Vec<Session>, StoreError>;

    /// The sessions this node holds of gateway instance `instance` (live or held for the
    /// grace), each with its user, its TTL (a lease's mark, or its own) and its real
    /// deadline. A scan: called when a lease begins or ends, not per request.
    async fn sessions_of_instance(&self, instance: &str) -> Result<Vec<(UserId, Session)>, StoreError>;

    /// Gives the live registration of `device` tagged `sid` that this node holds the TTL
    /// `ttl_ms` from now, with no event (a gateway session bound to its instance's lease
    /// once the instance holds one). `Ok(false)` when there is none: ended, held for the
    /// grace, replaced, or held by another node.
    async fn rebind_session(&self, id: &UserId, device: &str, sid: u64, ttl_ms: i64) -> Result<bool, StoreError>;

    /// Counters for metrics and health.
    fn stats(&self) -> StoreStats;

    /// `Ok` when the store can serve reads and writes.
    async fn health(&self) -> Result<(), StoreError>;

    /// As [`PresenceStore::get_many`], from the source of truth rather than a cache (a
    /// snapshot that events will follow must not be older than the subscription).
    async fn get_many_fresh(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        self.get_many(ids).await
    }

    /// Shares a gateway instance's lease deadline with the other nodes (one store write),
    /// or removes it (`None`). A store with no other nodes has nothing to share.
    async fn put_instance_lease(&self, _instance: &str, _expires_at: Option<Millis>) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether other nodes share instance leases through this store (a lease refreshed
    /// through one node binds the sessions another node holds).
    fn shares_instance_leases(&self) -> bool {
        false
    }

    /// The instance lease deadline another node shared, if any.
    async fn instance_lease(&self, _instance: &str) -> Result<Option<Millis>, StoreError> {
        Ok(None)
    }

    /// `Some(reason)` while the store serves reads from a possibly stale copy (a cluster
    /// node cut off from the center).
    fn degraded(&self) -> Option<String> {
        None
    }

    /// The node is stopping for good after its connections were closed (SIGTERM): the
    /// embedded store ends every session now (they do not outlive the process; sinks get
    /// each user's offline); a cluster node hands its sessions over to the other nodes,
    /// which hold them for the offline grace. Then [`PresenceStore::shutdown`].
    async fn drain(&self) {}

    /// Flushes what must be durable and stops background work. Idempotent.
    async fn shutdown(&self);
}

/// The directory's rows: contacts, privacy settings, conversation members. The live copy
/// is [`crate::directory::Directory`]; the store keeps them durable and, in a cluster,
/// shared.
#[async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    /// Stores (or deletes) a row. Durable when it returns.
    async fn put_directory(&self, table: DirTable, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError>;

    /// Every row, read once at start-up to fill the directory.
    async fn load_directory(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError>;

    /// Rows as other nodes change them (cluster backends), so every node's directory
    /// stays current; `None` when this store has no other writers.
    async fn watch_directory(&self) -> Option<tokio::sync::mpsc::Receiver<DirRow>> {
        None
    }
}

/// A whole backend: presence and directory.
pub trait Store: PresenceStore + DirectoryStore {}

impl<T: PresenceStore + DirectoryStore> Store for T {}

/// A directory row as stored: table, key, value (`None`: deleted).
pub type DirRow = (DirTable, String, Option<Vec<u8>>);

/// Single-id read through [`PresenceStore::get_many`].
pub async fn get_one(store: &dyn Store, id: &UserId) -> Result<Option<Presence>, StoreError> {
    Ok(store.get_many(std::slice::from_ref(id)).await?.pop().flatten())
}
