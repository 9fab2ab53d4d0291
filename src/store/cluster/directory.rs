//! Directory rows (contacts, privacy settings, conversation members) in the backend,
//! followed by every node. Rows this node wrote, and rows older than one it applied, are
//! not applied again ([`Revisions`]).

use std::collections::HashMap;
use std::sync::Arc;

use super::{unavailable, wrote, ClusterStore};
use crate::store::{DirRow, DirTable, StoreError};

/// The newest revision of each directory key applied on this node (its own writes
/// included): an echo of this node's write, or a row older than one applied, is not
/// applied again.
#[derive(Debug, Default)]
pub struct Revisions {
    seen: HashMap<String, u64>,
}

impl Revisions {
    /// Records `revision` of `key`; whether it is newer than everything seen for it.
    pub fn admit(&mut self, key: &str, revision: u64) -> bool {
        let seen = self.seen.entry(key.to_string()).or_insert(0);
        if revision <= *seen {
            return false;
        }
        *seen = revision;
        true
    }
}

fn row_key(table: DirTable, key: &str) -> String {
    format!("{}.{key}", table.name())
}

impl ClusterStore {
    pub(super) async fn put_row(&self, table: DirTable, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        // A deleted row is an empty value (a write, so it has a revision like any other).
        let bytes = bytes::Bytes::from(value.unwrap_or_default());
        let rev = self.guarded(self.inner.bp.put_row(table, key, bytes)).await?;
        wrote(&self.inner, "directory");
        // Our own write's echo (or an older one arriving late) must not be applied again.
        self.inner.dir_revisions.lock().admit(&row_key(table, key), rev);
        Ok(())
    }

    pub(super) async fn load_rows(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError> {
        let rows = self.inner.bp.rows().await.map_err(unavailable)?;
        Ok(rows.into_iter().map(|(t, k, v)| (t, k, v.to_vec())).collect())
    }

    pub(super) async fn watch_rows(&self) -> Option<tokio::sync::mpsc::Receiver<DirRow>> {
        let mut changes = match self.inner.bp.watch_rows().await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow the directory: changes made on other nodes will not be seen");
                return None;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let weak = Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            while let Some(c) = changes.recv().await {
                {
                    let Some(inner) = weak.upgrade() else { return };
                    if !inner.dir_revisions.lock().admit(&row_key(c.table, &c.key), c.revision) {
                        continue; // this node's own write, or older than what it applied
                    }
                }
                let value = c.value.filter(|v| !v.is_empty()).map(|v| v.to_vec());
                if tx.send((c.table, c.key, value)).await.is_err() {
                    return;
                }
            }
        });
        self.inner.tasks.lock().push(h);
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_newer_revisions_are_admitted() {
        let mut r = Revisions::default();
        assert!(r.admit("contacts.a", 5));
        assert!(!r.admit("contacts.a", 5), "an echo of what was applied");
        assert!(!r.admit("contacts.a", 3), "older");
        assert!(r.admit("contacts.b", 1), "per key");
        assert!(r.admit("contacts.a", 9));
    }
}
