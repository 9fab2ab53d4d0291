//! Durability for the embedded store: explicit statuses, their expiry and `last_seen`
//! survive a restart (sessions are ephemeral by design and are not written).
//!
//! One redb file under `service.data_dir`. Writers put their record into a dirty map
//! (latest write per user wins) and a single writer task commits the whole map in one
//! transaction: group commit, so a burst of status writes costs one fsync, and a writer that
//! asked for it is told when its record is on disk. A failed commit keeps the records
//! dirty and is retried with backoff; until one succeeds the store reports itself
//! unavailable, so writes answer 503 instead of being acknowledged and lost. After a
//! failed commit (a full disk, say) redb refuses every later operation until the file is
//! opened again, so the writer reopens it before retrying: the store recovers by itself
//! once space is back.
//!
//! Opening is careful with the file: a 0-byte file (which redb would silently turn into
//! an empty database, making invisible users visible) is refused, the file's integrity is
//! checked (and repaired by redb where it can be) at every open, a damaged file that
//! cannot be repaired is refused with a message naming it, never a panic, and a file
//! locked by another process says so. `store.start_fresh` moves such a file aside and
//! starts empty instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::at_rest::{Sealer, Sealing};
use crate::core::{Explicit, Millis, Status, UserState};
use crate::store::DirTable;

const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");

/// The redb table of a directory table.
fn dir_def(t: DirTable) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(t.name())
}

/// Which table a pending write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Table {
    Users,
    Dir(DirTable),
}

impl Table {
    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Users => USERS,
            Table::Dir(d) => dir_def(d),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Table::Users => "users",
            Table::Dir(d) => d.name(),
        }
    }

    fn all() -> impl Iterator<Item = Table> {
        std::iter::once(Table::Users).chain(DirTable::ALL.into_iter().map(Table::Dir))
    }
}

/// Everything read back at open.
#[derive(Debug, Default)]
pub struct Loaded {
    pub users: Vec<(String, DurableUser)>,
    pub directory: Vec<(DirTable, String, Vec<u8>)>,
}

/// The durable part of a [`UserState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default)]
    pub set_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Millis>,
    #[serde(default)]
    pub node_id: String,
    /// The status was written while the user had no live session (see
    /// [`Explicit::standalone`]); records written before this field read as preferences.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standalone: bool,
}

impl DurableUser {
    pub fn of(state: &UserState) -> DurableUser {
        let e = state.explicit.as_ref();
        DurableUser {
            status: e.map(|e| e.status),
            message: e.map(|e| e.message.to_string()).unwrap_or_default(),
            set_at: e.map_or(0, |e| e.set_at),
            expires_at: e.and_then(|e| e.expires_at),
            last_seen: state.last_seen,
            updated_at: state.updated_at,
            node_id: state.node_id.to_string(),
            standalone: e.is_some_and(|e| e.standalone),
        }
    }

    /// The state this record restores: no sessions (they are not durable).
    pub fn into_state(self) -> UserState {
        UserState {
            explicit: self.status.map(|status| Explicit {
                status,
                message: Arc::from(self.message),
                set_at: self.set_at,
                expires_at: self.expires_at,
                standalone: self.standalone,
            }),
            sessions: Vec::new(),
            last_seen: self.last_seen,
            updated_at: self.updated_at,
            away: None,
            node_id: Arc::from(self.node_id),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open presence database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "another presenced is using {dir} (its presence database is locked): stop it, or give this one its own \
         service.data_dir"
    )]
    InUse { dir: PathBuf },
    #[error(
        "the presence database {path} is empty (0 bytes): it was truncated, so the statuses, last_seen and privacy \
         settings it held are gone. Restore it from a backup, or start with an empty store: set store.start_fresh: true \
         (PRESENCE_STORE__START_FRESH=true), which moves the file aside"
    )]
    Empty { path: PathBuf },
    #[error(
        "the presence database {path} is encrypted and no key was given: set store.encryption_key_file (or \
         store.encryption_key) to the key it was written with"
    )]
    KeyMissing { path: PathBuf },
    #[error(
        "the key of store.encryption_key_file (fingerprint {fingerprint}) does not open the presence database {path}: \
         it was written with another key. Give the key it was written with (`presenced rekey` changes it)"
    )]
    WrongKey { path: PathBuf, fingerprint: String },
    #[error(
        "the presence database {path} is damaged and could not be repaired ({detail}). Restore it from a backup, or start \
         with an empty store: set store.start_fresh: true (PRESENCE_STORE__START_FRESH=true), which moves the damaged file aside"
    )]
    Damaged { path: PathBuf, detail: String },
}

#[derive(Default)]
struct Pending {
    /// (table, key) → value to write, or `None` to delete.
    dirty: HashMap<(Table, String), Option<Vec<u8>>>,
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// A user was erased: after the commit, the file is rewritten so that no freed page
    /// still holds their records.
    purge: bool,
}

struct Shared {
    /// `None` while it is being reopened after a failed commit.
    db: Mutex<Option<Database>>,
    /// `store.encryption_key_file`: every record is sealed (see [`crate::at_rest`]).
    sealer: Option<Arc<Sealer>>,
    path: PathBuf,
    pending: Mutex<Pending>,
    wake: Notify,
    closing: AtomicBool,
    /// `None` when the last commit succeeded.
    failure: Mutex<Option<String>>,
}

/// Handle to the database and its writer task.
pub struct Persister {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Resolves when the write it was issued for is on disk (or failed).
pub type Ack = oneshot::Receiver<Result<(), String>>;

impl Persister {
    /// Opens (or creates) `dir/presence.redb` and returns everything stored. With
    /// `start_fresh`, an empty or damaged file is moved aside (`presence.redb.<reason>-<ms>`)
    /// and an empty database created instead of refusing to start.
    pub fn open(dir: &Path, start_fresh: bool, sealer: Option<Arc<Sealer>>) -> Result<(Persister, Loaded), PersistError> {
        std::fs::create_dir_all(dir).map_err(|source| PersistError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join("presence.redb");
        let (db, loaded) = match open_and_load(&path, sealer.as_deref()) {
            Err(e @ (PersistError::Empty { .. } | PersistError::Damaged { .. })) if start_fresh => {
                let reason = if matches!(e, PersistError::Empty { .. }) { "empty" } else { "damaged" };
                let aside = dir.join(format!("presence.redb.{reason}-{}", crate::clock::Clock::now(&crate::clock::SystemClock)));
                std::fs::rename(&path, &aside)
                    .map_err(|e| PersistError::Open { path: path.clone(), message: format!("cannot move it aside: {e}") })?;
                tracing::warn!(path = %path.display(), moved_to = %aside.display(), error = %e, "store.start_fresh: starting with an empty presence database");
                open_and_load(&path, sealer.as_deref())?
            }
            other => other?,
        };
        let shared = Arc::new(Shared {
            db: Mutex::new(Some(db)),
            sealer,
            path,
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        Ok((Persister { shared, writer: Mutex::new(None) }, loaded))
    }

    /// Starts the writer task on the current runtime.
    pub fn start(&self) {
        let shared = self.shared.clone();
        *self.writer.lock() = Some(tokio::spawn(writer(shared)));
    }

    /// Queues `record` (or its deletion) for `user`; with `ack`, returns a receiver that
    /// resolves once it is committed.
    pub fn enqueue(&self, user: &str, record: Option<&DurableUser>, ack: bool) -> Option<Ack> {
        let bytes = record.map(|r| serde_json::to_vec(r).unwrap_or_default());
        self.push(Table::Users, user, bytes, ack)
    }

    /// Deletes the user's record, then rewrites the file without it (erasure: no freed page
    /// keeps an old copy); resolves once the deletion is committed.
    pub fn erase(&self, user: &str) -> Ack {
        let (tx, rx) = oneshot::channel();
        let mut p = self.shared.pending.lock();
        p.dirty.insert((Table::Users, user.to_string()), None);
        p.purge = true;
        p.waiters.push(tx);
        drop(p);
        self.shared.wake.notify_one();
        rx
    }

    /// Queues a directory value (or its deletion) and returns its commit acknowledgement.
    pub fn enqueue_dir(&self, table: DirTable, key: &str, value: Option<Vec<u8>>) -> Ack {
        let (tx, rx) = oneshot::channel();
        let mut p = self.shared.pending.lock();
        p.dirty.insert((Table::Dir(table), key.to_string()), value);
        p.waiters.push(tx);
        drop(p);
        self.shared.wake.notify_one();
        rx
    }

    fn push(&self, table: Table, key: &str, value: Option<Vec<u8>>, ack: bool) -> Option<Ack> {
        let mut p = self.shared.pending.lock();
        p.dirty.insert((table, key.to_string()), value);
        let rx = ack.then(|| {
            let (tx, rx) = oneshot::channel();
            p.waiters.push(tx);
            rx
        });
        drop(p);
        self.shared.wake.notify_one();
        rx
    }

    /// `Err` with the reason while commits fail.
    pub fn health(&self) -> Result<(), String> {
        match &*self.shared.failure.lock() {
            None => Ok(()),
            Some(e) => Err(e.clone()),
        }
    }

    /// Commits what is pending and stops the writer. Idempotent.
    pub async fn close(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        let handle = self.writer.lock().take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }
}

async fn writer(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    // Between tries of a rewrite that failed (a full disk: it needs room for a copy).
    let mut purge_backoff = Duration::from_millis(100);
    loop {
        let closing = shared.closing.load(Ordering::SeqCst);
        let batch = std::mem::take(&mut *shared.pending.lock());
        if batch.dirty.is_empty() && !batch.purge {
            for w in batch.waiters {
                let _ = w.send(Ok(()));
            }
            if closing {
                return;
            }
            shared.wake.notified().await;
            continue;
        }
        let db_shared = shared.clone();
        let dirty = batch.dirty;
        let purge = batch.purge;
        let result = tokio::task::spawn_blocking(move || {
            let mut db = db_shared.db.lock();
            if db.is_none() {
                // A commit failed before: redb wants the file opened again.
                match reopen(&db_shared.path) {
                    Ok(fresh) => {
                        tracing::info!(path = %db_shared.path.display(), "presence database reopened");
                        *db = Some(fresh);
                    }
                    Err(e) => return (dirty, Err(format!("cannot reopen the database: {e}"))),
                }
            }
            let r = match db.as_ref() {
                Some(d) => commit(d, &dirty, db_shared.sealer.as_deref()),
                None => Err("database closed".to_string()),
            };
            if r.is_err() {
                *db = None; // closed now, reopened before the next try
            } else if purge {
                // Copy the live records into a fresh file (same key) and reopen it.
                *db = None;
                let sealer = db_shared.sealer.as_deref();
                match quietly(|| reseal(&db_shared.path, sealer, sealer)) {
                    Ok(Ok(_)) => metrics::counter!("presence_persist_purges_total").increment(1),
                    Ok(Err(e)) | Err(e) => {
                        tracing::error!(error = %e, "rewriting the presence database after an erasure failed; the erased records are deleted, the rewrite is tried again");
                        db_shared.pending.lock().purge = true;
                    }
                }
                match reopen(&db_shared.path) {
                    Ok(fresh) => *db = Some(fresh),
                    Err(e) => return (HashMap::new(), Err(format!("cannot reopen the database after the rewrite: {e}"))),
                }
            }
            (dirty, r)
        })
        .await;
        let (dirty, result) = match result {
            Ok(v) => v,
            Err(e) => (HashMap::new(), Err(format!("writer task failed: {e}"))),
        };
        match result {
            Ok(()) => {
                metrics::counter!("presence_persist_commits_total").increment(1);
                *shared.failure.lock() = None;
                backoff = Duration::from_millis(50);
                for w in batch.waiters {
                    let _ = w.send(Ok(()));
                }
                if purge && shared.pending.lock().purge {
                    tokio::time::sleep(purge_backoff).await;
                    purge_backoff = (purge_backoff * 2).min(Duration::from_secs(30));
                } else if purge {
                    purge_backoff = Duration::from_millis(100);
                }
            }
            Err(e) => {
                metrics::counter!("presence_persist_failures_total").increment(1);
                tracing::error!(error = %e, records = dirty.len(), "presence database commit failed; will retry");
                *shared.failure.lock() = Some(e.clone());
                {
                    // Keep the records (and a rewrite asked for) for the next try; newer
                    // writes queued meanwhile win.
                    let mut p = shared.pending.lock();
                    p.purge |= purge;
                    for (k, v) in dirty {
                        p.dirty.entry(k).or_insert(v);
                    }
                }
                for w in batch.waiters {
                    let _ = w.send(Err(e.clone()));
                }
                if closing {
                    tracing::error!("shutting down with uncommitted presence records");
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Opens the database with an integrity check (redb repairs what it can), never letting
/// a damaged file panic the process.
fn open_checked(path: &Path) -> Result<Database, PersistError> {
    let damaged = |detail: String| PersistError::Damaged { path: path.to_path_buf(), detail };
    match quietly(|| Database::builder().set_check_integrity_on_open(true).create(path)) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(PersistError::InUse { dir: path.parent().unwrap_or(path).to_path_buf() }),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))) if e.kind() != std::io::ErrorKind::InvalidData => {
            Err(PersistError::Open { path: path.to_path_buf(), message: e.to_string() })
        }
        Ok(Err(e)) => Err(damaged(e.to_string())),
        Err(panic) => Err(damaged(panic)),
    }
}

fn reopen(path: &Path) -> Result<Database, PersistError> {
    open_checked(path)
}

/// Opens `path` (refusing a 0-byte file), checks it against the key (encrypting a plain
/// database when a key is given), makes sure the tables exist, and reads everything; a
/// panic inside redb on a damaged page is reported as damage.
fn open_and_load(path: &Path, sealer: Option<&Sealer>) -> Result<(Database, Loaded), PersistError> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Err(PersistError::Empty { path: path.to_path_buf() });
    }
    let damaged = |detail: String| PersistError::Damaged { path: path.to_path_buf(), detail };
    let mut db = open_checked(path)?;
    match quietly(|| crate::at_rest::sealing(&db, sealer)).map_err(damaged)?.map_err(damaged)? {
        Sealing::Plain | Sealing::Sealed => {}
        Sealing::KeyMissing => return Err(PersistError::KeyMissing { path: path.to_path_buf() }),
        Sealing::WrongKey => {
            let fingerprint = sealer.map(|s| s.fingerprint.clone()).unwrap_or_default();
            return Err(PersistError::WrongKey { path: path.to_path_buf(), fingerprint });
        }
        Sealing::ToSeal => {
            drop(db);
            // Not "damaged": the plain file is whole (`start_fresh` must not set it aside).
            let failed =
                |message: String| PersistError::Open { path: path.to_path_buf(), message: format!("cannot encrypt it: {message}") };
            let records = quietly(|| reseal(path, None, sealer)).map_err(failed)?.map_err(failed)?;
            if records > 0 {
                tracing::warn!(path = %path.display(), records, "presence database encrypted with store.encryption_key_file (it was plain text); the plain file is gone");
            }
            db = open_checked(path)?;
        }
    }
    let loaded = quietly(|| load(&db, sealer)).map_err(damaged)?.map_err(damaged)?;
    Ok((db, loaded))
}

/// Rewrites the database at `path` from key `from` to key `to` (`None`: plain) into a
/// fresh file; returns how many records it holds. `presenced rekey` and the first start
/// with a key use it; the node must not have the file open.
pub fn reseal(path: &Path, from: Option<&Sealer>, to: Option<&Sealer>) -> Result<usize, String> {
    let mut records = 0;
    crate::at_rest::rewrite(path, |old, new| {
        let rtx = old.begin_read().map_err(|e| e.to_string())?;
        let tx = new.begin_write().map_err(|e| e.to_string())?;
        for t in Table::all() {
            let mut dst = tx.open_table(t.def()).map_err(|e| e.to_string())?;
            let src = match rtx.open_table(t.def()) {
                Ok(src) => src,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(e.to_string()),
            };
            for item in src.iter().map_err(|e| e.to_string())? {
                let (k, v) = item.map_err(|e| e.to_string())?;
                let Some((key, value)) = unseal(t, k.value(), v.value(), from) else {
                    return Err(format!("a record of table {} does not open with the current key", t.name()));
                };
                let (stored, bytes) = seal(t, &key, value, to);
                dst.insert(stored.as_str(), bytes.as_slice()).map_err(|e| e.to_string())?;
                records += 1;
            }
        }
        crate::at_rest::mark(&tx, to).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())
    })?;
    Ok(records)
}

/// A record as stored: its key (blinded when sealed) and value.
fn seal(t: Table, key: &str, value: Vec<u8>, sealer: Option<&Sealer>) -> (String, Vec<u8>) {
    match sealer {
        None => (key.to_string(), value),
        Some(s) => s.seal_named(t.name(), key, &value),
    }
}

/// A stored record's real key and value; `None` when it does not open.
fn unseal(t: Table, stored: &str, bytes: &[u8], sealer: Option<&Sealer>) -> Option<(String, Vec<u8>)> {
    match sealer {
        None => Some((stored.to_string(), bytes.to_vec())),
        Some(s) => s.open_named(t.name(), stored, bytes),
    }
}

fn load(db: &Database, sealer: Option<&Sealer>) -> Result<Loaded, String> {
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    for t in Table::all() {
        tx.open_table(t.def()).map_err(|e| e.to_string())?;
    }
    if sealer.is_some() {
        // A new database: sealed from its first record.
        crate::at_rest::mark(&tx, sealer).map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())?;
    let mut loaded = Loaded::default();
    let rtx = db.begin_read().map_err(|e| e.to_string())?;
    for t in Table::all() {
        let table = rtx.open_table(t.def()).map_err(|e| e.to_string())?;
        for item in table.iter().map_err(|e| e.to_string())? {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let Some((key, value)) = unseal(t, k.value(), v.value(), sealer) else {
                tracing::warn!(table = t.name(), "skipping a presence record that does not open");
                continue;
            };
            match t {
                Table::Users => match serde_json::from_slice::<DurableUser>(&value) {
                    Ok(r) => loaded.users.push((key, r)),
                    Err(e) => tracing::warn!(user = key, error = %e, "skipping unreadable presence record"),
                },
                Table::Dir(d) => loaded.directory.push((d, key, value)),
            }
        }
    }
    Ok(loaded)
}

thread_local! {
    /// Set while this thread runs [`quietly`]: its panics are reported as errors.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into `Err(message)` without the default hook printing it
/// (redb may panic on a page damaged outside it). Other threads' panics print as usual.
fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    r.map_err(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
        format!("redb: {}", msg.unwrap_or_else(|| "internal error".into()))
    })
}

/// Rows to write to one table: key and value (`None` deletes).
type Rows<'a> = Vec<(&'a str, &'a Option<Vec<u8>>)>;

fn commit(db: &Database, dirty: &HashMap<(Table, String), Option<Vec<u8>>>, sealer: Option<&Sealer>) -> Result<(), String> {
    let mut tx = db.begin_write().map_err(|e| e.to_string())?;
    tx.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
    let mut by_table: HashMap<Table, Rows> = HashMap::new();
    for ((t, k), v) in dirty {
        by_table.entry(*t).or_default().push((k.as_str(), v));
    }
    for (t, rows) in by_table {
        let mut table = tx.open_table(t.def()).map_err(|e| e.to_string())?;
        for (k, v) in rows {
            match (v, sealer) {
                (Some(bytes), None) => {
                    table.insert(k, bytes.as_slice()).map_err(|e| e.to_string())?;
                }
                (Some(bytes), Some(s)) => {
                    let (stored, sealed) = s.seal_named(t.name(), k, bytes);
                    table.insert(stored.as_str(), sealed.as_slice()).map_err(|e| e.to_string())?;
                }
                (None, None) => {
                    table.remove(k).map_err(|e| e.to_string())?;
                }
                (None, Some(s)) => {
                    table.remove(s.blind(t.name(), k).as_str()).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    tx.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_survive_reopen_and_deletes_apply() {
        let dir = tempfile::tempdir().unwrap();
        let rec = DurableUser {
            status: Some(Status::Busy),
            message: "In a meeting".into(),
            set_at: 5,
            expires_at: Some(10),
            last_seen: Some(5),
            updated_at: Some(5),
            node_id: "n1".into(),
            standalone: true,
        };
        {
            let (p, loaded) = Persister::open(dir.path(), false, None).unwrap();
            assert!(loaded.users.is_empty() && loaded.directory.is_empty());
            p.start();
            let ack = p.enqueue("alice", Some(&rec), true).unwrap();
            ack.await.unwrap().unwrap();
            p.enqueue("bob", Some(&rec), false);
            p.enqueue("bob", None, false);
            p.enqueue_dir(DirTable::Contacts, "alice", Some(b"[\"bob\"]".to_vec())).await.unwrap().unwrap();
            p.enqueue_dir(DirTable::Privacy, "gone", Some(b"{}".to_vec()));
            p.enqueue_dir(DirTable::Privacy, "gone", None);
            p.close().await;
        }
        let (_p, loaded) = Persister::open(dir.path(), false, None).unwrap();
        assert_eq!(loaded.users, vec![("alice".to_string(), rec.clone())]);
        assert_eq!(loaded.directory, vec![(DirTable::Contacts, "alice".to_string(), b"[\"bob\"]".to_vec())]);
        let state = rec.into_state();
        assert_eq!(state.explicit.unwrap().status, Status::Busy);
        assert!(state.sessions.is_empty());
    }

    #[test]
    fn a_second_process_cannot_open_the_same_database() {
        let dir = tempfile::tempdir().unwrap();
        let (_a, _) = Persister::open(dir.path(), false, None).unwrap();
        let err = Persister::open(dir.path(), false, None).err().expect("second open must fail");
        assert!(matches!(err, PersistError::InUse { .. }), "{err}");
        assert!(
            err.to_string().contains("another presenced is using") && err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_zero_byte_database_is_refused_unless_starting_fresh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("presence.redb"), b"").unwrap();
        let err = Persister::open(dir.path(), false, None).err().expect("refused");
        assert!(matches!(err, PersistError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("start_fresh"), "{err}");
        let (_p, loaded) = Persister::open(dir.path(), true, None).unwrap();
        assert!(loaded.users.is_empty());
        let moved = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("presence.redb.empty-"))
            .count();
        assert_eq!(moved, 1, "the empty file is kept aside");
    }

    /// Zeroes one 4 KiB page of a database holding data, for every page: opening never
    /// panics, and either repairs (the data that survived is read) or refuses clearly.
    #[test]
    fn a_damaged_page_never_panics_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let rec = DurableUser {
            status: Some(Status::Busy),
            message: "m".repeat(100),
            set_at: 1,
            expires_at: None,
            last_seen: Some(1),
            updated_at: Some(1),
            node_id: "n".into(),
            standalone: false,
        };
        {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (p, _) = Persister::open(dir.path(), false, None).unwrap();
                p.start();
                for i in 0..300 {
                    p.enqueue(&format!("user-{i}"), Some(&rec), false);
                }
                p.enqueue("last", Some(&rec), true).unwrap().await.unwrap().unwrap();
                p.close().await;
            });
        }
        let pristine = std::fs::read(dir.path().join("presence.redb")).unwrap();
        let pages = pristine.len() / 4096;
        assert!(pages > 4, "{pages} pages");
        let (mut repaired, mut refused) = (0, 0);
        for page in 0..pages {
            let case = tempfile::tempdir().unwrap();
            let mut bytes = pristine.clone();
            bytes[page * 4096..(page + 1) * 4096].fill(0);
            std::fs::write(case.path().join("presence.redb"), &bytes).unwrap();
            match Persister::open(case.path(), false, None) {
                Ok(_) => repaired += 1,
                Err(e) => {
                    assert!(matches!(e, PersistError::Damaged { .. }), "page {page}: {e}");
                    assert!(e.to_string().contains("presence.redb") && e.to_string().contains("start_fresh"), "{e}");
                    refused += 1;
                }
            }
        }
        assert_eq!(repaired + refused, pages);
    }
}
