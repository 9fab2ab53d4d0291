//! JetStream KV for presence: bucket set-up that works on nats-server 2.9.10 and newer,
//! and the user-id → key encoding. (Compare-and-swap writes are the cluster layer's:
//! [`crate::store::cluster`].)

use async_nats::jetstream::{self, kv, stream};

use crate::core::UserId;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("nats kv: {0}")]
    Backend(String),
}

/// Bucket settings.
#[derive(Debug, Clone)]
pub struct BucketConfig {
    pub name: String,
    pub replicas: usize,
    /// Keep values on disk (`true`) or in memory.
    pub file_storage: bool,
}

/// Opens the bucket, creating its backing stream first when missing.
///
/// `async_nats`'s `create_key_value` cannot talk to Debian's nats-server 2.9.10 (its
/// account-info decoding expects newer fields), so the `KV_<bucket>` stream is created
/// explicitly with the settings a KV bucket has, then opened with `get_key_value`.
pub async fn open_bucket(js: &jetstream::Context, cfg: &BucketConfig) -> Result<kv::Store, KvError> {
    if let Ok(store) = js.get_key_value(&cfg.name).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{}", cfg.name),
        subjects: vec![format!("$KV.{}.>", cfg.name)],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: cfg.replicas.max(1),
        storage: if cfg.file_storage { stream::StorageType::File } else { stream::StorageType::Memory },
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| KvError::Backend(format!("cannot create stream KV_{}: {e}", cfg.name)))?;
    js.get_key_value(&cfg.name).await.map_err(|e| KvError::Backend(format!("cannot open bucket {}: {e}", cfg.name)))
}

/// A KV key (and subject token) for a user id.
///
/// KV keys allow `[-/_=.a-zA-Z0-9]`, and `.` separates subject tokens (so `a..b` would be
/// an invalid subject). User ids may hold `. @ : +`: those are written `=XX` (hex), and
/// since `=` is not a user-id character, every id maps to one key and back.
pub fn encode_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len() + 8);
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_id`]; `None` for a key that no user id encodes to.
pub fn decode_id(key: &str) -> Option<String> {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = key.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Messages asked for per fetch while listing keys.
const LIST_BATCH: usize = 1024;

/// The live keys of `store` that start with `key_prefix` (written and neither deleted nor
/// purged), without the prefix.
///
/// `kv::Store::keys` ends when a delivered entry reports nothing pending, a count taken
/// when its consumer was created; against nats-server 2.9.10 that entry sometimes never
/// comes and the listing waits forever (a janitor's scan hung that way, so a dead node's
/// users were never taken offline). This lists with an ephemeral pull consumer instead,
/// filtered to the prefix on the server, fetching without waiting until a batch comes
/// back short: the server's "no more messages" ends it, not a count. Each fetch is bounded
/// by `timeout`; a key rewritten meanwhile may be delivered twice, and its last operation
/// decides.
pub async fn live_keys(store: &kv::Store, key_prefix: &str, timeout: std::time::Duration) -> Result<Vec<String>, KvError> {
    use async_nats::jetstream::consumer::{self, pull, AckPolicy, DeliverPolicy};
    use futures_util::StreamExt;
    let backend = |what: &str, e: &dyn std::fmt::Display| KvError::Backend(format!("listing keys of {}: {what}: {e}", store.name));
    let subject_prefix = format!("{}{key_prefix}", store.prefix);
    let consumer: consumer::Consumer<pull::Config> = store
        .stream
        .create_consumer(pull::Config {
            filter_subject: format!("{subject_prefix}>"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            headers_only: true,
            inactive_threshold: timeout.max(std::time::Duration::from_secs(5)) * 2,
            ..Default::default()
        })
        .await
        .map_err(|e| backend("consumer", &e))?;
    let listed = async {
        let mut live = std::collections::HashMap::new();
        loop {
            let mut batch = consumer.fetch().max_messages(LIST_BATCH).messages().await.map_err(|e| backend("fetch", &e))?;
            let mut n = 0;
            while let Some(m) = tokio::time::timeout(timeout, batch.next()).await.map_err(|e| backend("fetch", &e))? {
                let m = m.map_err(|e| backend("fetch", &e))?;
                n += 1;
                let Some(key) = m.subject.strip_prefix(subject_prefix.as_str()) else { continue };
                let removed =
                    m.headers.as_ref().and_then(|h| h.get("KV-Operation")).is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
                live.insert(key.to_string(), !removed);
            }
            if n < LIST_BATCH {
                return Ok::<_, KvError>(live.into_iter().filter_map(|(k, live)| live.then_some(k)).collect());
            }
        }
    }
    .await;
    // Best effort: an ephemeral consumer left behind goes after its inactive threshold.
    let _ = store.stream.delete_consumer(&consumer.cached_info().name).await;
    listed
}

/// The key of a user's presence record.
pub fn user_key(id: &UserId) -> String {
    format!("user.{}", encode_id(id.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid_key(k: &str) -> bool {
        !k.is_empty()
            && !k.starts_with('.')
            && !k.ends_with('.')
            && !k.contains("..")
            && k.chars().all(|c| c.is_ascii_alphanumeric() || "-/_=.".contains(c))
    }

    #[test]
    fn tricky_ids_encode_to_valid_keys() {
        for id in ["alice", "a.b", "..", ".x.", "tenant:bob@example.com", "a+b", "550e8400-e29b-41d4-a716-446655440000", "under_score"] {
            let key = user_key(&UserId::parse(id, 128).unwrap());
            assert!(valid_key(&key), "{id} -> {key}");
            assert_eq!(decode_id(key.strip_prefix("user.").unwrap()).as_deref(), Some(id));
        }
        assert_eq!(encode_id("tenant:bob@x.io"), "tenant=3Abob=40x=2Eio");
        assert_eq!(decode_id("=zz"), None);
        assert_eq!(decode_id("=4"), None);
    }

    proptest! {
        #[test]
        fn every_accepted_id_round_trips(id in "[A-Za-z0-9._@:+-]{1,128}") {
            let key = user_key(&UserId::parse(&id, 128).unwrap());
            prop_assert!(valid_key(&key), "{} -> {}", id, key);
            prop_assert_eq!(decode_id(key.strip_prefix("user.").unwrap()), Some(id));
        }
    }
}
