//! Where presence state lives. [`Store`] is the one interface the transports use; the
//! embedded [`memory::MemoryStore`] is the default, and cluster backends (NATS, Redis)
//! implement the same trait over the same pure transitions in [`crate::core::state`].

pub mod clock;
pub mod locks;
pub mod memory;
pub mod nats;
pub mod persist;

use std::sync::Arc;

use async_trait::async_trait;

use crate::core::{Millis, NewSession, Presence, Registered, Session, Status, UserId};

pub use clock::{spawn_periodic, Clock, ManualClock, SystemClock};
pub use persist::DirTable;

/// Why a store operation failed. Input is validated before it reaches a store, so the
/// failures are the store's own, and the limits the store enforces atomically.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot take the operation now (disk or broker down); retry later. The
    /// message is safe to show clients: backends log their internal detail themselves.
    #[error("presence store unavailable: {0}")]
    Unavailable(String),
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

/// The presence store. Every method is safe to call concurrently from many tasks.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Presence of each id, in order; `None` for a user the service has never seen.
    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError>;

    /// Sets an explicit status and returns the resulting presence. Durable when it returns.
    async fn set_status(&self, id: &UserId, req: SetStatus) -> Result<Presence, StoreError>;

    /// Clears the explicit status: the derived status applies again.
    async fn clear_status(&self, id: &UserId) -> Result<Presence, StoreError>;

    /// Registers (or replaces) a device session alive for `req.ttl_ms` unless refreshed.
    /// A new device beyond `req.max_devices` live sessions is refused with
    /// [`StoreError::TooManyDevices`], atomically with the registration.
    async fn register_session(&self, id: &UserId, req: NewSession) -> Result<Registered, StoreError>;

    /// Extends a live session; `Ok(None)` when there is none (register again).
    async fn refresh_session(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError>;

    /// Removes a session; `Ok(false)` when there was none. With `sid`, only the
    /// registration with that tag (a connection ending its own session must not end a
    /// newer connection's registration of the same device).
    async fn unregister_session(&self, id: &UserId, device: &str, sid: Option<u64>) -> Result<bool, StoreError>;

    /// The user's live device sessions.
    async fn devices(&self, id: &UserId) -> Result<Vec<Session>, StoreError>;

    /// Counters for metrics and health.
    fn stats(&self) -> StoreStats;

    /// `Ok` when the store can serve reads and writes.
    async fn health(&self) -> Result<(), StoreError>;

    /// Stores (or deletes) a directory row: contacts, privacy settings, conversation
    /// members. Durable when it returns. The live copy is [`crate::directory::Directory`].
    async fn put_directory(&self, table: DirTable, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError>;

    /// Every directory row, read once at start-up to fill the directory.
    async fn load_directory(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError>;

    /// As [`Store::get_many`], from the source of truth rather than a cache (a snapshot
    /// that events will follow must not be older than the subscription).
    async fn get_many_fresh(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        self.get_many(ids).await
    }

    /// `Some(reason)` while the store serves reads from a possibly stale copy (a cluster
    /// node cut off from the center).
    fn degraded(&self) -> Option<String> {
        None
    }

    /// Directory rows as other nodes change them (cluster backends), so every node's
    /// directory stays current; `None` when this store has no other writers.
    async fn watch_directory(&self) -> Option<tokio::sync::mpsc::Receiver<DirRow>> {
        None
    }

    /// Flushes what must be durable and stops background work. Idempotent.
    async fn shutdown(&self);
}

/// A directory row as stored: table, key, value (`None`: deleted).
pub type DirRow = (DirTable, String, Option<Vec<u8>>);

/// Single-id read through [`Store::get_many`].
pub async fn get_one(store: &dyn Store, id: &UserId) -> Result<Option<Presence>, StoreError> {
    Ok(store.get_many(std::slice::from_ref(id)).await?.pop().flatten())
}
