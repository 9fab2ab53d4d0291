//! The directory bucket (`<bucket>_directory`): contacts, privacy settings and
//! conversation members, one key per row (`<table>.<encoded key>`), followed by every node
//! (re-watched from the last revision if the watch ends). Rows this node wrote, and rows
//! older than one it applied, are not applied again ([`Revisions`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv as jkv;
use futures_util::StreamExt;

use super::{unavailable, wrote, NatsStore};
use crate::natsio::kv::{decode_id, encode_id, KvError};
use crate::store::{DirRow, DirTable, StoreError};

pub(super) fn dir_key(table: DirTable, key: &str) -> String {
    let t = match table {
        DirTable::Contacts => "contacts",
        DirTable::Privacy => "privacy",
        DirTable::Conversations => "conversations",
    };
    format!("{t}.{}", encode_id(key))
}

pub(super) fn parse_dir_key(k: &str) -> Option<(DirTable, String)> {
    let (t, enc) = k.split_once('.')?;
    let table = match t {
        "contacts" => DirTable::Contacts,
        "privacy" => DirTable::Privacy,
        "conversations" => DirTable::Conversations,
        _ => return None,
    };
    Some((table, decode_id(enc)?))
}

/// The newest revision of each directory key applied on this node (its own writes
/// included): a watch echo of this node's write, or a row older than one applied, is not
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

impl NatsStore {
    pub(super) async fn put_row(&self, table: DirTable, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        let k = dir_key(table, key);
        let dir = &self.inner.kv.dir;
        // A deleted row is an empty value (a put, so it has a revision like any other).
        let bytes = bytes::Bytes::from(value.unwrap_or_default());
        let rev = self.guarded(async { dir.put(&k, bytes).await.map_err(|e| KvError::Backend(e.to_string())) }).await?;
        wrote(&self.inner, "directory");
        // Our own write's echo (or an older one arriving late) must not be applied again.
        self.inner.dir_revisions.lock().admit(&k, rev);
        Ok(())
    }

    pub(super) async fn load_rows(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError> {
        let mut keys = self.inner.kv.dir.keys().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(unavailable)?;
            let Some((table, id)) = parse_dir_key(&k) else { continue };
            let Some(v) = self.inner.kv.dir.get(&k).await.map_err(unavailable)? else { continue };
            if !v.is_empty() {
                out.push((table, id, v.to_vec()));
            }
        }
        Ok(out)
    }

    pub(super) async fn watch_rows(&self) -> Option<tokio::sync::mpsc::Receiver<DirRow>> {
        let first = match self.inner.kv.dir.watch_all().await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the directory bucket: changes made on other nodes will not be seen");
                return None;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let weak = Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            // The watch ends when the connection to the stream is lost; it is opened again
            // from the revision after the last one seen, so no change falls in between.
            let mut watch = Some(first);
            let mut last: u64 = 0;
            loop {
                if let Some(mut w) = watch.take() {
                    while let Some(entry) = w.next().await {
                        let entry = match entry {
                            Ok(e) => e,
                            Err(e) => {
                                tracing::warn!(error = %e, "directory watch error");
                                continue;
                            }
                        };
                        last = last.max(entry.revision);
                        let Some((table, id)) = parse_dir_key(&entry.key) else { continue };
                        {
                            let Some(inner) = weak.upgrade() else { return };
                            if !inner.dir_revisions.lock().admit(&entry.key, entry.revision) {
                                continue; // this node's own write, or older than what it applied
                            }
                        }
                        let value = (entry.operation == jkv::Operation::Put && !entry.value.is_empty()).then(|| entry.value.to_vec());
                        if tx.send((table, id, value)).await.is_err() {
                            return;
                        }
                    }
                    tracing::warn!(last_revision = last, "the directory watch ended; watching again");
                    metrics::counter!("nats_directory_rewatch_total").increment(1);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(inner) = weak.upgrade() else { return };
                let again = if last > 0 {
                    inner.kv.dir.watch_all_from_revision(last + 1).await
                } else {
                    inner.kv.dir.watch_with_history(">").await
                };
                match again {
                    Ok(w) => watch = Some(w),
                    Err(e) => tracing::debug!(error = %e, "cannot watch the directory bucket yet"),
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
    fn directory_keys_round_trip() {
        for (t, k) in [(DirTable::Contacts, "alice"), (DirTable::Privacy, "tenant:bob@x.io"), (DirTable::Conversations, "conv.1")] {
            let key = dir_key(t, k);
            assert_eq!(parse_dir_key(&key), Some((t, k.to_string())), "{key}");
        }
        assert_eq!(parse_dir_key("other.x"), None);
        assert_eq!(parse_dir_key("contacts"), None);
    }

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
