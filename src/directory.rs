//! The directory: who shares presence with whom (contacts), privacy settings, and
//! conversation membership, held in memory for the hot paths (every fan-out consults it)
//! and persisted through [`crate::store::DirectoryStore::put_directory`].
//!
//! A user's contacts are their *audience*: the people told of their changes, and the
//! people who see them under `visibility: contacts`. The reverse index (`audiences`)
//! answers "whose changes may this viewer follow", for the snapshot sent on connect; it
//! lives under the same lock as the contacts, so no update can leave them disagreeing.
//!
//! Writes are serialised (one async lock for all of them: they are rare): each stores its
//! row, then applies it in memory, before the next one starts, so memory and disk end in
//! the same order; rows written by other nodes are applied under the same lock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::bus::DirectoryChanged;
use crate::core::{Privacy, UserId};
use crate::store::{DirTable, Store, StoreError};

pub type Members = Arc<HashSet<UserId>>;

/// What a directory row changed, for the watchers concerned (published on the bus).
pub type RowChange = DirectoryChanged;

#[derive(Default)]
pub struct Directory {
    graph: RwLock<Graph>,
    privacy: RwLock<HashMap<UserId, Privacy>>,
    conversations: RwLock<HashMap<Arc<str>, Members>>,
    /// Held from a write's store call to its application in memory.
    writes: tokio::sync::Mutex<()>,
}

/// Contacts and their reverse index, changed together.
#[derive(Default)]
struct Graph {
    contacts: HashMap<UserId, Members>,
    /// viewer → users whose contacts include the viewer.
    audiences: HashMap<UserId, HashSet<UserId>>,
}

fn empty() -> Members {
    static EMPTY: std::sync::OnceLock<Members> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Default::default).clone()
}

fn parse_ids(raw: &[u8]) -> Option<Vec<UserId>> {
    let ids: Vec<String> = serde_json::from_slice(raw).ok()?;
    Some(ids.iter().filter_map(|s| UserId::parse(s, usize::MAX).ok()).collect())
}

fn ids_json(ids: &[UserId]) -> Vec<u8> {
    serde_json::to_vec(&ids.iter().map(UserId::as_str).collect::<Vec<_>>()).unwrap_or_default()
}

impl Directory {
    /// Fills the directory from the store's rows (read once at start-up).
    pub async fn load(store: &dyn Store) -> Result<Directory, StoreError> {
        let dir = Directory::default();
        for (table, key, value) in store.load_directory().await? {
            dir.apply_row(table, &key, Some(&value));
        }
        Ok(dir)
    }

    /// [`Directory::apply_row`] for a row another node wrote: in turn with this node's
    /// own writes.
    pub async fn apply_remote_row(&self, table: DirTable, key: &str, value: Option<&[u8]>) -> Option<RowChange> {
        let _turn = self.writes.lock().await;
        self.apply_row(table, key, value)
    }

    /// Applies a stored row (`None`: deleted) as read from the store, e.g. one another
    /// node wrote; returns what changed, for the hub to tell the watchers concerned.
    pub fn apply_row(&self, table: DirTable, key: &str, value: Option<&[u8]>) -> Option<RowChange> {
        match table {
            DirTable::Contacts => {
                let user = UserId::parse(key, usize::MAX).ok()?;
                let ids = match value {
                    Some(v) => parse_ids(v)?,
                    None => Vec::new(),
                };
                let old = self.apply_contacts(&user, ids);
                let new = self.contacts(&user);
                let changed: Vec<UserId> = old.symmetric_difference(&new).cloned().collect();
                Some(RowChange::Contacts { user, changed })
            }
            DirTable::Privacy => {
                let user = UserId::parse(key, usize::MAX).ok()?;
                let p = match value {
                    Some(v) => serde_json::from_slice::<Privacy>(v).ok()?,
                    None => Privacy::default(),
                };
                let previous = self.apply_privacy(&user, p);
                (previous != p).then_some(RowChange::Privacy { user, previous })
            }
            DirTable::Conversations => {
                let ids = match value {
                    Some(v) => parse_ids(v)?,
                    None => Vec::new(),
                };
                let (added, removed) = self.apply_members(key, ids);
                (!added.is_empty() || !removed.is_empty()).then(|| RowChange::Members { conversation: Arc::from(key), added, removed })
            }
        }
    }

    /// The user's contacts (audience).
    pub fn contacts(&self, user: &UserId) -> Members {
        self.graph.read().contacts.get(user).cloned().unwrap_or_else(empty)
    }

    /// Users whose contacts include `viewer`.
    pub fn audience_of(&self, viewer: &UserId) -> Vec<UserId> {
        self.graph.read().audiences.get(viewer).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// What decides how `user` is shown to each viewer: their contacts and their privacy.
    pub fn view(&self, user: &UserId) -> (Members, Privacy) {
        (self.contacts(user), self.privacy(user))
    }

    pub fn privacy(&self, user: &UserId) -> Privacy {
        self.privacy.read().get(user).copied().unwrap_or_default()
    }

    /// The conversations `user` is a member of (a scan: for erasure and export).
    pub fn conversations_of(&self, user: &UserId) -> Vec<Arc<str>> {
        self.conversations.read().iter().filter(|(_, m)| m.contains(user)).map(|(c, _)| c.clone()).collect()
    }

    /// Members of a conversation; `None` when no backend has set them.
    pub fn members(&self, conversation: &str) -> Option<Members> {
        self.conversations.read().get(conversation).cloned()
    }

    /// Replaces the user's contacts durably; returns the previous set.
    pub async fn set_contacts(&self, store: &dyn Store, user: &UserId, ids: Vec<UserId>) -> Result<Members, StoreError> {
        let value = if ids.is_empty() { None } else { Some(ids_json(&ids)) };
        let _turn = self.writes.lock().await;
        store.put_directory(DirTable::Contacts, user.as_str(), value).await?;
        Ok(self.apply_contacts(user, ids))
    }

    fn apply_contacts(&self, user: &UserId, ids: Vec<UserId>) -> Members {
        let new: HashSet<UserId> = ids.into_iter().filter(|c| c != user).collect();
        let new = Arc::new(new);
        let mut graph = self.graph.write();
        let old = if new.is_empty() { graph.contacts.remove(user) } else { graph.contacts.insert(user.clone(), new.clone()) };
        let old = old.unwrap_or_else(empty);
        let aud = &mut graph.audiences;
        for gone in old.difference(&new) {
            if let Some(s) = aud.get_mut(gone) {
                s.remove(user);
                if s.is_empty() {
                    aud.remove(gone);
                }
            }
        }
        for added in new.difference(&old) {
            aud.entry(added.clone()).or_default().insert(user.clone());
        }
        old
    }

    /// Replaces the user's privacy settings durably; returns the previous ones.
    pub async fn set_privacy(&self, store: &dyn Store, user: &UserId, p: Privacy) -> Result<Privacy, StoreError> {
        let value = if p == Privacy::default() { None } else { serde_json::to_vec(&p).ok() };
        let _turn = self.writes.lock().await;
        store.put_directory(DirTable::Privacy, user.as_str(), value).await?;
        Ok(self.apply_privacy(user, p))
    }

    /// Sets the user's privacy in memory (defaults are not kept); returns the previous one.
    fn apply_privacy(&self, user: &UserId, p: Privacy) -> Privacy {
        let old = if p == Privacy::default() { self.privacy.write().remove(user) } else { self.privacy.write().insert(user.clone(), p) };
        old.unwrap_or_default()
    }

    /// Replaces a conversation's members durably; returns what changed, for the hub.
    pub async fn set_members(&self, store: &dyn Store, conversation: &str, ids: Vec<UserId>) -> Result<Option<RowChange>, StoreError> {
        let value = if ids.is_empty() { None } else { Some(ids_json(&ids)) };
        let _turn = self.writes.lock().await;
        store.put_directory(DirTable::Conversations, conversation, value).await?;
        let (added, removed) = self.apply_members(conversation, ids);
        Ok((!added.is_empty() || !removed.is_empty()).then(|| RowChange::Members { conversation: Arc::from(conversation), added, removed }))
    }

    /// Sets a conversation's members in memory (none: the conversation is forgotten);
    /// returns who joined and who left.
    fn apply_members(&self, conversation: &str, ids: Vec<UserId>) -> (Vec<UserId>, Vec<UserId>) {
        let new: HashSet<UserId> = ids.into_iter().collect();
        let mut conv = self.conversations.write();
        let old = if new.is_empty() { conv.remove(conversation) } else { conv.insert(Arc::from(conversation), Arc::new(new.clone())) };
        let old = old.unwrap_or_else(empty);
        let added = new.iter().filter(|u| !old.contains(*u)).cloned().collect();
        let removed = old.iter().filter(|u| !new.contains(*u)).cloned().collect();
        (added, removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::EventBus;
    use crate::clock::SystemClock;
    use crate::core::Visibility;
    use crate::store::memory::{MemoryConfig, MemoryStore};
    use crate::store::PresenceStore as _;

    fn u(s: &str) -> UserId {
        UserId::parse(s, 64).unwrap()
    }

    #[tokio::test]
    async fn contacts_reverse_index_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = MemoryConfig::new("n");
        cfg.data_dir = Some(dir.path().to_path_buf());
        {
            let store = MemoryStore::open(cfg.clone(), Arc::new(SystemClock), EventBus::new(8)).unwrap();
            store.start();
            let d = Directory::load(&store).await.unwrap();
            d.set_contacts(&store, &u("alice"), vec![u("bob"), u("carol"), u("alice")]).await.unwrap();
            d.set_contacts(&store, &u("dave"), vec![u("bob")]).await.unwrap();
            let mut a = d.audience_of(&u("bob"));
            a.sort();
            assert_eq!(a, vec![u("alice"), u("dave")]);
            assert!(!d.contacts(&u("alice")).contains(&u("alice")), "self is never a contact");
            let old = d.set_contacts(&store, &u("alice"), vec![u("carol")]).await.unwrap();
            assert_eq!(old.len(), 2);
            assert_eq!(d.audience_of(&u("bob")), vec![u("dave")]);
            d.set_privacy(&store, &u("alice"), Privacy { visibility: Visibility::Nobody, last_seen: Visibility::Contacts }).await.unwrap();
            d.set_members(&store, "conv-1", vec![u("alice"), u("bob")]).await.unwrap();
            store.shutdown().await;
        }
        let store = MemoryStore::open(cfg, Arc::new(SystemClock), EventBus::new(8)).unwrap();
        let d = Directory::load(&store).await.unwrap();
        assert_eq!(d.contacts(&u("alice")).iter().cloned().collect::<Vec<_>>(), vec![u("carol")]);
        assert_eq!(d.audience_of(&u("bob")), vec![u("dave")]);
        assert_eq!(d.privacy(&u("alice")).visibility, Visibility::Nobody);
        assert!(d.members("conv-1").unwrap().contains(&u("bob")));
        assert!(d.members("conv-2").is_none());
    }

    /// Many writers changing one user's contacts at once: the reverse index agrees with
    /// the contacts, and what is on disk is what is in memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_contact_updates_keep_index_memory_and_disk_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = MemoryConfig::new("n");
        cfg.data_dir = Some(dir.path().to_path_buf());
        let pool: Vec<UserId> = (0..12).map(|i| u(&format!("v{i}"))).collect();
        let owner = u("owner");
        {
            let store = Arc::new(MemoryStore::open(cfg.clone(), Arc::new(SystemClock), EventBus::new(8)).unwrap());
            store.start();
            let d = Arc::new(Directory::load(&*store).await.unwrap());
            let mut tasks = Vec::new();
            for t in 0..8u64 {
                let (d, store, pool, owner) = (d.clone(), store.clone(), pool.clone(), owner.clone());
                tasks.push(tokio::spawn(async move {
                    for i in 0..60u64 {
                        let pick: Vec<UserId> = pool
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| (t * 7 + i * 3 + *j as u64).is_multiple_of(3))
                            .map(|(_, v)| v.clone())
                            .collect();
                        d.set_contacts(&*store, &owner, pick).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let contacts = d.contacts(&owner);
            for v in &pool {
                assert_eq!(d.audience_of(v).contains(&owner), contacts.contains(v), "reverse index of {v}");
            }
            let mut in_memory: Vec<UserId> = contacts.iter().cloned().collect();
            in_memory.sort();
            store.shutdown().await;
            drop(store);
            let store = MemoryStore::open(cfg, Arc::new(SystemClock), EventBus::new(8)).unwrap();
            let reloaded = Directory::load(&store).await.unwrap();
            let mut on_disk: Vec<UserId> = reloaded.contacts(&owner).iter().cloned().collect();
            on_disk.sort();
            assert_eq!(on_disk, in_memory, "memory and disk agree");
        }
    }
}
