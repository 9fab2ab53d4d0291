//! The on-disk outbox in front of each sink: a bounded FIFO of encoded events in one redb
//! file (`<data_dir>/sinks.redb`, a table per sink), so a sink that is down, or a
//! presenced restart while it is, loses nothing that fits.
//!
//! Events are appended (committed, fsync'd, before they count as queued), read from the
//! head in order, and removed once the sink acknowledged them: at-least-once. When an
//! append would exceed `max_events`, the oldest are removed in the same transaction and
//! counted as dropped: presence never waits for a sink.
//!
//! With `store.encryption_key_file`, every record is sealed (see [`crate::at_rest`]);
//! a plain outbox is encrypted at the first open with a key.
//!
//! Blocking (redb commits): callers run these from `spawn_blocking`.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};

use crate::at_rest::{Sealer, Sealing};

/// One queued event: its sequence number, the user it is about (the partition key) and
/// its encoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    pub record: StoredEvent,
}

/// An event as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub user: String,
    /// The event type (`user_online`, ...), for sinks that route by it.
    pub kind: String,
    /// Unix milliseconds of the transition (for the lag gauge).
    pub at: i64,
    /// The event in the sink's format.
    pub body: Vec<u8>,
}

impl StoredEvent {
    /// `[u16 user length][user][u8 kind length][kind][i64 at][body]`.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.user.len() + self.kind.len() + 8 + self.body.len());
        out.extend_from_slice(&(self.user.len() as u16).to_le_bytes());
        out.extend_from_slice(self.user.as_bytes());
        out.push(self.kind.len() as u8);
        out.extend_from_slice(self.kind.as_bytes());
        out.extend_from_slice(&self.at.to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(b: &[u8]) -> Option<StoredEvent> {
        let n = u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as usize;
        let user = std::str::from_utf8(b.get(2..2 + n)?).ok()?.to_string();
        let k = *b.get(2 + n)? as usize;
        let kind = std::str::from_utf8(b.get(3 + n..3 + n + k)?).ok()?.to_string();
        let rest = 3 + n + k;
        let at = i64::from_le_bytes(b.get(rest..rest + 8)?.try_into().ok()?);
        Some(StoredEvent { user, kind, at, body: b.get(rest + 8..)?.to_vec() })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("event outbox: {0}")]
pub struct OutboxError(String);

fn err(e: impl std::fmt::Display) -> OutboxError {
    OutboxError(e.to_string())
}

/// The database holding every sink's outbox.
#[derive(Clone)]
pub struct OutboxDb {
    db: Arc<Database>,
    sealer: Option<Arc<Sealer>>,
}

/// A sink's table.
fn sink_table(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}

impl OutboxDb {
    /// Opens (or creates) `dir/sinks.redb`, sealed with `sealer` if given.
    pub fn open(dir: &Path, sealer: Option<Arc<Sealer>>) -> Result<OutboxDb, OutboxError> {
        std::fs::create_dir_all(dir).map_err(|e| OutboxError(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("sinks.redb");
        let create = || {
            Database::create(&path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => OutboxError(format!(
                    "another presenced is using {} (its event outbox is locked): stop it, or give this one its own service.data_dir",
                    dir.display()
                )),
                e => OutboxError(format!("{}: {e}", path.display())),
            })
        };
        let mut db = create()?;
        match crate::at_rest::sealing(&db, sealer.as_deref()).map_err(err)? {
            Sealing::Plain | Sealing::Sealed => {}
            Sealing::KeyMissing => {
                return Err(OutboxError(format!(
                    "{} is encrypted and no key was given: set store.encryption_key_file to the key it was written with",
                    path.display()
                )))
            }
            Sealing::WrongKey => {
                return Err(OutboxError(format!(
                    "the key of store.encryption_key_file (fingerprint {}) does not open {}: it was written with another key",
                    sealer.as_ref().map_or("", |s| s.fingerprint.as_str()),
                    path.display()
                )))
            }
            Sealing::ToSeal => {
                drop(db);
                let records = reseal(&path, None, sealer.as_deref()).map_err(err)?;
                if records > 0 {
                    tracing::warn!(path = %path.display(), records, "event outbox encrypted with store.encryption_key_file (it was plain text)");
                }
                db = create()?;
            }
        }
        if sealer.is_some() {
            let tx = db.begin_write().map_err(err)?;
            crate::at_rest::mark(&tx, sealer.as_deref()).map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(OutboxDb { db: Arc::new(db), sealer })
    }

    /// The outbox of sink `name`, holding at most `max_events`.
    pub fn outbox(&self, name: &str, max_events: u64) -> Result<Outbox, OutboxError> {
        let table = format!("sink.{name}");
        let def = sink_table(&table);
        let tx = self.db.begin_write().map_err(err)?;
        let (head, next, len) = {
            let t = tx.open_table(def).map_err(err)?;
            let head = t.first().map_err(err)?.map(|(k, _)| k.value());
            let last = t.last().map_err(err)?.map(|(k, _)| k.value());
            // Sequence numbers never repeat, even after the outbox emptied and the process
            // restarted (they name deliveries): an empty outbox starts at the clock (µs).
            let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
            let next = last.map_or(now_us, |l| (l + 1).max(now_us));
            (head.unwrap_or(next), next, t.len().map_err(err)?)
        };
        tx.commit().map_err(err)?;
        let state = Arc::new(Mutex::new(State { head, next, len }));
        Ok(Outbox { db: self.db.clone(), sealer: self.sealer.clone(), table, max_events, state })
    }
}

#[derive(Debug)]
struct State {
    /// Sequence of the oldest queued event (when any).
    head: u64,
    /// Sequence the next appended event gets.
    next: u64,
    len: u64,
}

/// One sink's queue. Clones share it.
#[derive(Clone)]
pub struct Outbox {
    db: Arc<Database>,
    sealer: Option<Arc<Sealer>>,
    table: String,
    max_events: u64,
    state: Arc<Mutex<State>>,
}

impl Outbox {
    fn def(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        sink_table(&self.table)
    }

    /// The most events it holds.
    pub fn max_events(&self) -> u64 {
        self.max_events
    }

    /// Events queued.
    pub fn len(&self) -> u64 {
        self.state.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `records` in one durable commit; returns how many old events were dropped
    /// to stay within `max_events`.
    pub fn append(&self, records: &[StoredEvent]) -> Result<u64, OutboxError> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut st = self.state.lock();
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::Immediate).map_err(err)?;
        let mut dropped = 0;
        let (mut head, mut next, mut len) = (st.head, st.next, st.len);
        {
            let mut t = tx.open_table(self.def()).map_err(err)?;
            for r in records {
                let bytes = match &self.sealer {
                    None => r.encode(),
                    Some(s) => s.seal(&self.table, &next.to_be_bytes(), &r.encode()),
                };
                t.insert(next, bytes.as_slice()).map_err(err)?;
                if len == 0 {
                    head = next;
                }
                next += 1;
                len += 1;
            }
            // Sequence numbers may jump (a restart), so the oldest are taken one by one.
            while len > self.max_events {
                if t.pop_first().map_err(err)?.is_none() {
                    break;
                }
                len -= 1;
                dropped += 1;
            }
            if dropped > 0 {
                head = t.first().map_err(err)?.map_or(next, |(k, _)| k.value());
            }
        }
        tx.commit().map_err(err)?;
        (st.head, st.next, st.len) = (head, next, len);
        Ok(dropped)
    }

    /// Up to `n` events from the head, in order (unreadable records are skipped and
    /// removed with the next acknowledgement).
    pub fn peek(&self, n: usize) -> Result<Vec<Queued>, OutboxError> {
        let rtx = self.db.begin_read().map_err(err)?;
        let t = rtx.open_table(self.def()).map_err(err)?;
        let mut out = Vec::new();
        for item in t.range(0u64..).map_err(err)?.take(n) {
            let (k, v) = item.map_err(err)?;
            let opened = match &self.sealer {
                None => StoredEvent::decode(v.value()),
                Some(s) => s.open(&self.table, &k.value().to_be_bytes(), v.value()).and_then(|b| StoredEvent::decode(&b)),
            };
            match opened {
                Some(record) => out.push(Queued { seq: k.value(), record }),
                None => tracing::warn!(table = %self.table, seq = k.value(), "skipping an unreadable outbox record"),
            }
        }
        Ok(out)
    }

    /// Removes every event up to and including `seq` (delivered).
    pub fn ack(&self, seq: u64) -> Result<(), OutboxError> {
        let mut st = self.state.lock();
        if st.len == 0 || seq < st.head {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(err)?;
        // A lost acknowledgement only means a redelivery (at-least-once): no fsync wait.
        tx.set_durability(Durability::None).map_err(err)?;
        let mut removed = 0u64;
        let head = {
            let mut t = tx.open_table(self.def()).map_err(err)?;
            t.retain_in(..=seq, |_, _| {
                removed += 1;
                false
            })
            .map_err(err)?;
            let first = t.first().map_err(err)?.map(|(k, _)| k.value());
            first
        };
        tx.commit().map_err(err)?;
        st.len = st.len.saturating_sub(removed);
        st.head = head.unwrap_or(st.next);
        Ok(())
    }
}

/// Rewrites `sinks.redb` at `path` from key `from` to key `to` (`None`: plain) into a fresh
/// file; returns how many queued events it holds. The node must not have it open.
pub fn reseal(path: &Path, from: Option<&Sealer>, to: Option<&Sealer>) -> Result<usize, String> {
    let mut records = 0;
    crate::at_rest::rewrite(path, |old, new| {
        let rtx = old.begin_read().map_err(|e| e.to_string())?;
        let tx = new.begin_write().map_err(|e| e.to_string())?;
        for handle in rtx.list_tables().map_err(|e| e.to_string())? {
            let name = handle.name().to_string();
            if !name.starts_with("sink.") {
                continue;
            }
            let src = rtx.open_table(sink_table(&name)).map_err(|e| e.to_string())?;
            let mut dst = tx.open_table(sink_table(&name)).map_err(|e| e.to_string())?;
            for item in src.iter().map_err(|e| e.to_string())? {
                let (k, v) = item.map_err(|e| e.to_string())?;
                let seq = k.value().to_be_bytes();
                let plain = match from {
                    None => v.value().to_vec(),
                    Some(s) => {
                        s.open(&name, &seq, v.value()).ok_or_else(|| format!("an event of {name} does not open with the current key"))?
                    }
                };
                let bytes = match to {
                    None => plain,
                    Some(s) => s.seal(&name, &seq, &plain),
                };
                dst.insert(k.value(), bytes.as_slice()).map_err(|e| e.to_string())?;
                records += 1;
            }
        }
        crate::at_rest::mark(&tx, to).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())
    })?;
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(user: &str, i: i64) -> StoredEvent {
        StoredEvent { user: user.into(), kind: "presence_updated".into(), at: i, body: format!("{{\"n\":{i}}}").into_bytes() }
    }

    #[test]
    fn fifo_survives_reopening_and_drops_the_oldest_beyond_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = OutboxDb::open(dir.path(), None).unwrap();
            let o = db.outbox("hook", 5).unwrap();
            assert_eq!(o.append(&[rec("a", 1), rec("b", 2), rec("a", 3)]).unwrap(), 0);
            let head = o.peek(2).unwrap();
            assert_eq!(head.iter().map(|q| q.record.at).collect::<Vec<_>>(), vec![1, 2]);
            o.ack(head[1].seq).unwrap();
            assert_eq!(o.len(), 1);
            // Beyond 5: the oldest go.
            assert_eq!(o.append(&[rec("c", 4), rec("c", 5), rec("c", 6), rec("c", 7), rec("c", 8)]).unwrap(), 1);
            assert_eq!(o.len(), 5);
            assert_eq!(o.peek(10).unwrap().iter().map(|q| q.record.at).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8]);
        }
        // Reopened (a restart): the same events, in order, and new ones after them.
        let db = OutboxDb::open(dir.path(), None).unwrap();
        let o = db.outbox("hook", 5).unwrap();
        assert_eq!(o.len(), 5);
        o.append(&[rec("d", 9)]).unwrap();
        let all = o.peek(10).unwrap();
        assert_eq!(all.iter().map(|q| q.record.at).collect::<Vec<_>>(), vec![5, 6, 7, 8, 9]);
        assert_eq!(all[0].record, rec("c", 5));
        assert_eq!(o.len(), 5);
        // Strictly increasing; after a restart they jump ahead (never reused).
        assert!(all.windows(2).all(|w| w[1].seq > w[0].seq));
        // Beyond the bound across that jump: still the oldest that go.
        assert_eq!(o.append(&[rec("d", 10)]).unwrap(), 1);
        let all = o.peek(10).unwrap();
        assert_eq!(all.iter().map(|q| q.record.at).collect::<Vec<_>>(), vec![6, 7, 8, 9, 10]);
        o.ack(all[4].seq).unwrap();
        assert!(o.is_empty() && o.peek(1).unwrap().is_empty());
        // Another sink's outbox in the same file is separate.
        assert!(db.outbox("other", 5).unwrap().is_empty());
    }
}
