//! The webhook sink: each delivery is one HTTP POST of a batch of events,
//! `{"events": [<event>, ...]}` (the documented event schema, oldest first), signed as
//! Stripe and Pusher sign theirs:
//!
//! `X-Presence-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//!
//! A receiver recomputes the HMAC over the timestamp, a dot and the raw body, compares in
//! constant time, and refuses old timestamps (replays). `X-Presence-Delivery` names the
//! batch (`<node>:<sink>:<first>-<last>` outbox sequence numbers); a redelivered batch
//! keeps its name, and each event's `user_id` + `revision` identify it for consumers that
//! deduplicate (delivery is at-least-once). Any answer but 2xx, or none within the sink's
//! `timeout`, fails the delivery: it is retried, with backoff, until it succeeds.

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::outbox::Queued;
use super::EventSink;
use crate::config::SinkConfig;

pub struct Webhook {
    url: String,
    secret: Vec<u8>,
    client: reqwest::Client,
    /// `<node>:<sink>`, the prefix of `X-Presence-Delivery`.
    delivery_prefix: String,
}

impl Webhook {
    pub fn new(cfg: &SinkConfig, node_id: &str) -> Result<Webhook, String> {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout.0)
            .connect_timeout(cfg.timeout.0)
            .user_agent(concat!("presenced/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("webhook {}: {e}", cfg.name))?;
        Ok(Webhook {
            url: cfg.url.clone(),
            secret: cfg.secret.clone().into_bytes(),
            client,
            delivery_prefix: format!("{node_id}:{}", cfg.name),
        })
    }
}

/// `t=<unix seconds>,v1=<hex>`: the signature header of `body` sent at `t`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length: this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("t={t},v1={hex}")
}

#[async_trait]
impl EventSink for Webhook {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    async fn deliver(&self, batch: &[Queued]) -> Result<(), String> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else { return Ok(()) };
        let mut body = Vec::with_capacity(16 + batch.iter().map(|q| q.record.body.len() + 1).sum::<usize>());
        body.extend_from_slice(b"{\"events\":[");
        for (i, q) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&q.record.body);
        }
        body.extend_from_slice(b"]}");
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let r = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-presence-signature", signature(&self.secret, t, &body))
            .header("x-presence-delivery", format!("{}:{}-{}", self.delivery_prefix, first.seq, last.seq))
            .body(body)
            .send()
            .await
            .map_err(|e| format!("POST {}: {e}", self.url))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("POST {}: answered {}", self.url, r.status()))
        }
    }

    /// Reachability only: any HTTP answer to a `HEAD` (a receiver that takes only POSTs
    /// answers 405, which is fine); a refused connection, a TLS failure or no answer is not.
    async fn check(&self) -> Result<(), String> {
        self.client.head(&self.url).send().await.map(|_| ()).map_err(|e| format!("HEAD {}: {e}", self.url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        let sig = signature(b"Jefe", 7, b"{}");
        assert!(sig.starts_with("t=7,v1="));
        assert_eq!(sig.len(), "t=7,v1=".len() + 64);
        // The same input signs the same; another body or key does not.
        assert_eq!(sig, signature(b"Jefe", 7, b"{}"));
        assert_ne!(sig, signature(b"Jefe", 7, b"{ }"));
        assert_ne!(sig, signature(b"jefe", 7, b"{}"));
        assert_ne!(sig, signature(b"Jefe", 8, b"{}"));
        // A known vector: HMAC-SHA256(key "key", "The quick brown fox jumps over the lazy dog").
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"The quick brown fox jumps over the lazy dog");
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8");
    }
}
