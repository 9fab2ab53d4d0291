//! Durability for the embedded store: explicit statuses, their expiry and `last_seen`
//! survive a restart (sessions are ephemeral by design and are not written).
//!
//! One redb file under `service.data_dir`. Writers put their record into a dirty map
//! (latest write per user wins) and a single writer task commits the whole map in one
//! transaction: group commit, so a burst of status writes costs one fsync, and a writer that
//! asked for it is told when its record is on disk. A failed commit keeps the records
//! dirty and is retried with backoff; until one succeeds the store reports itself
//! unavailable, so writes answer 503 instead of being acknowledged and lost.

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

use crate::core::{Explicit, Millis, Status, UserState};

const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");

/// Durable side data kept beside presence records.
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

    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            DirTable::Contacts => TableDefinition::new("contacts"),
            DirTable::Privacy => TableDefinition::new("privacy"),
            DirTable::Conversations => TableDefinition::new("conversations"),
        }
    }
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
            Table::Dir(d) => d.def(),
        }
    }
}

/// Everything read back at open.
#[derive(Debug, Default)]
pub struct Loaded {
    pub users: Vec<(String, Record)>,
    pub directory: Vec<(DirTable, String, Vec<u8>)>,
}

/// The durable part of a [`UserState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
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
}

impl Record {
    pub fn of(state: &UserState) -> Record {
        let e = state.explicit.as_ref();
        Record {
            status: e.map(|e| e.status),
            message: e.map(|e| e.message.to_string()).unwrap_or_default(),
            set_at: e.map_or(0, |e| e.set_at),
            expires_at: e.and_then(|e| e.expires_at),
            last_seen: state.last_seen,
            updated_at: state.updated_at,
            node_id: state.node_id.to_string(),
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
            }),
            sessions: Vec::new(),
            last_seen: self.last_seen,
            updated_at: self.updated_at,
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
}

#[derive(Default)]
struct Pending {
    /// (table, key) → value to write, or `None` to delete.
    dirty: HashMap<(Table, String), Option<Vec<u8>>>,
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

struct Shared {
    db: Database,
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
    /// Opens (or creates) `dir/presence.redb` and returns everything stored.
    pub fn open(dir: &Path) -> Result<(Persister, Loaded), PersistError> {
        std::fs::create_dir_all(dir).map_err(|source| PersistError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join("presence.redb");
        let open_err = |e: &dyn std::fmt::Display| PersistError::Open { path: path.clone(), message: e.to_string() };
        let db = Database::create(&path).map_err(|e| open_err(&e))?;
        let tx = db.begin_write().map_err(|e| open_err(&e))?;
        tx.open_table(USERS).map_err(|e| open_err(&e))?;
        for t in DirTable::ALL {
            tx.open_table(t.def()).map_err(|e| open_err(&e))?;
        }
        tx.commit().map_err(|e| open_err(&e))?;

        let mut loaded = Loaded::default();
        let rtx = db.begin_read().map_err(|e| open_err(&e))?;
        let table = rtx.open_table(USERS).map_err(|e| open_err(&e))?;
        for item in table.iter().map_err(|e| open_err(&e))? {
            let (k, v) = item.map_err(|e| open_err(&e))?;
            match serde_json::from_slice::<Record>(v.value()) {
                Ok(r) => loaded.users.push((k.value().to_string(), r)),
                Err(e) => tracing::warn!(user = k.value(), error = %e, "skipping unreadable presence record"),
            }
        }
        drop(table);
        for t in DirTable::ALL {
            let table = rtx.open_table(t.def()).map_err(|e| open_err(&e))?;
            for item in table.iter().map_err(|e| open_err(&e))? {
                let (k, v) = item.map_err(|e| open_err(&e))?;
                loaded.directory.push((t, k.value().to_string(), v.value().to_vec()));
            }
        }
        drop(rtx);

        let shared = Arc::new(Shared {
            db,
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
    pub fn enqueue(&self, user: &str, record: Option<&Record>, ack: bool) -> Option<Ack> {
        let bytes = record.map(|r| serde_json::to_vec(r).unwrap_or_default());
        self.push(Table::Users, user, bytes, ack)
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
    loop {
        let closing = shared.closing.load(Ordering::SeqCst);
        let batch = std::mem::take(&mut *shared.pending.lock());
        if batch.dirty.is_empty() {
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
        let result = tokio::task::spawn_blocking(move || {
            let r = commit(&db_shared.db, &dirty);
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
            }
            Err(e) => {
                metrics::counter!("presence_persist_failures_total").increment(1);
                tracing::error!(error = %e, records = dirty.len(), "presence database commit failed; will retry");
                *shared.failure.lock() = Some(e.clone());
                {
                    // Keep the records for the next try; newer writes queued meanwhile win.
                    let mut p = shared.pending.lock();
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

/// Rows to write to one table: key and value (`None` deletes).
type Rows<'a> = Vec<(&'a str, &'a Option<Vec<u8>>)>;

fn commit(db: &Database, dirty: &HashMap<(Table, String), Option<Vec<u8>>>) -> Result<(), String> {
    let mut tx = db.begin_write().map_err(|e| e.to_string())?;
    tx.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
    let mut by_table: HashMap<Table, Rows> = HashMap::new();
    for ((t, k), v) in dirty {
        by_table.entry(*t).or_default().push((k.as_str(), v));
    }
    for (t, rows) in by_table {
        let mut table = tx.open_table(t.def()).map_err(|e| e.to_string())?;
        for (k, v) in rows {
            match v {
                Some(bytes) => {
                    table.insert(k, bytes.as_slice()).map_err(|e| e.to_string())?;
                }
                None => {
                    table.remove(k).map_err(|e| e.to_string())?;
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
        let rec = Record {
            status: Some(Status::Busy),
            message: "In a meeting".into(),
            set_at: 5,
            expires_at: Some(10),
            last_seen: Some(5),
            updated_at: Some(5),
            node_id: "n1".into(),
        };
        {
            let (p, loaded) = Persister::open(dir.path()).unwrap();
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
        let (_p, loaded) = Persister::open(dir.path()).unwrap();
        assert_eq!(loaded.users, vec![("alice".to_string(), rec.clone())]);
        assert_eq!(loaded.directory, vec![(DirTable::Contacts, "alice".to_string(), b"[\"bob\"]".to_vec())]);
        let state = rec.into_state();
        assert_eq!(state.explicit.unwrap().status, Status::Busy);
        assert!(state.sessions.is_empty());
    }

    #[test]
    fn a_second_process_cannot_open_the_same_database() {
        let dir = tempfile::tempdir().unwrap();
        let (_a, _) = Persister::open(dir.path()).unwrap();
        let err = Persister::open(dir.path()).err().expect("second open must fail");
        assert!(err.to_string().contains("presence.redb"), "{err}");
    }
}
