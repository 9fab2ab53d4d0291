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
