//! The `events` section: sinks that receive every transition, and their outbox.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::source::de_string;
use super::{rule, ConfigError, Dur};

/// The `events` section: where every presence transition goes besides the in-process
/// bus (and, in cluster mode, the backend's own event log).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EventSinksConfig {
    /// Several at once; each receives every transition of this node.
    pub sinks: Vec<SinkConfig>,
    pub outbox: OutboxConfig,
}

/// The on-disk outbox in front of each sink (`<data_dir>/sinks.redb`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// Events one sink's outbox holds; beyond it the oldest are dropped (and counted).
    pub max_events: u64,
    /// First wait before retrying a failed delivery; doubled up to `max_backoff`.
    pub initial_backoff: Dur,
    pub max_backoff: Dur,
    /// Transitions waiting, in memory, to be written to each sink's outbox (a burst, e.g.
    /// a gateway re-registering its sessions); beyond it they are dropped and counted.
    pub buffer: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig { max_events: 1_000_000, initial_backoff: Dur::millis(200), max_backoff: Dur::secs(30), buffer: 262_144 }
    }
}

/// What kind of sink.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SinkType {
    /// HTTP POST of batches, signed with HMAC-SHA256.
    #[default]
    Webhook,
    /// Apache Kafka (cargo feature `kafka`, on by default).
    Kafka,
    /// RabbitMQ / AMQP 0-9-1.
    Amqp,
}

impl SinkType {
    /// The keys a sink of this type reads (the others must stay unset).
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            SinkType::Webhook => &["name", "type", "batch_max", "timeout", "url", "secret"],
            SinkType::Amqp => &["name", "type", "batch_max", "timeout", "url", "exchange", "unroutable"],
            SinkType::Kafka => &["name", "type", "batch_max", "timeout", "brokers", "topic", "format", "compression", "properties"],
        }
    }
}

/// One sink. Keys that do not apply to its `type` must stay unset.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// Unique; names its outbox, metrics and health entry (`[a-z0-9_-]`, at most 64).
    #[serde(deserialize_with = "de_string")]
    pub name: String,
    #[serde(rename = "type")]
    pub kind: SinkType,
    /// Events per delivery (a webhook POST carries a batch).
    pub batch_max: usize,
    /// One delivery attempt's timeout.
    pub timeout: Dur,
    /// webhook: the URL to POST to (`http://` or `https://`); amqp: the broker
    /// (`amqp://user:password@host:5672/%2f`, `amqps://` for TLS).
    #[serde(deserialize_with = "de_string")]
    pub url: String,
    /// webhook: the HMAC-SHA256 key of the `X-Presence-Signature` header (e.g.
    /// `secret: ${WEBHOOK_SECRET}`); required.
    #[serde(deserialize_with = "de_string")]
    pub secret: String,
    /// amqp: the durable topic exchange events are published to.
    #[serde(deserialize_with = "de_string")]
    pub exchange: String,
    /// amqp: what an event no queue is bound to receive becomes (events are published
    /// `mandatory`, so the broker says so): `keep` (it fails the delivery and waits in the
    /// outbox until a queue is bound) or `drop` (counted in
    /// `sink_events_unroutable_total`; for bindings that take only some event types).
    pub unroutable: Unroutable,
    /// kafka: `host:port,host:port` (librdkafka's `bootstrap.servers`).
    #[serde(deserialize_with = "de_string")]
    pub brokers: String,
    /// kafka: the topic (records keyed by user id).
    #[serde(deserialize_with = "de_string")]
    pub topic: String,
    /// kafka: `json` (the documented event schema) or `protobuf` (`PresenceEvent`).
    pub format: SinkFormat,
    /// kafka: `none`, `gzip`, `snappy` or `lz4`.
    #[serde(deserialize_with = "de_string")]
    pub compression: String,
    /// kafka: more librdkafka settings, passed through (e.g. `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password: ${KAFKA_PASSWORD}`).
    pub properties: std::collections::BTreeMap<String, String>,
}

/// What an AMQP sink does with an event no queue is bound to receive.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Unroutable {
    #[default]
    Keep,
    Drop,
}

/// The encoding of a sink's records.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SinkFormat {
    #[default]
    Json,
    Protobuf,
}

/// Whether a passed-through setting holds a secret (never printed).
pub fn secret_property(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key.ends_with(".key") || key.contains("token")
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            name: String::new(),
            kind: SinkType::Webhook,
            batch_max: 100,
            timeout: Dur::secs(5),
            url: String::new(),
            secret: String::new(),
            exchange: "presence".into(),
            unroutable: Unroutable::Keep,
            brokers: String::new(),
            topic: "presence.events".into(),
            format: SinkFormat::Json,
            compression: "lz4".into(),
            properties: Default::default(),
        }
    }
}

/// A URL with its password (if any) replaced, safe to log.
pub(super) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match url[scheme + 3..at].find(':') {
            Some(colon) => format!("{}<redacted>{}", &url[..scheme + 3 + colon + 1], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

impl fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("batch_max", &self.batch_max)
            .field("timeout", &self.timeout)
            .field("url", &redact_url(&self.url))
            .field("secret", &if self.secret.is_empty() { "" } else { "<redacted>" })
            .field("exchange", &self.exchange)
            .field("unroutable", &self.unroutable)
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("format", &self.format)
            .field("compression", &self.compression)
            .field(
                "properties",
                &self.properties.iter().map(|(k, v)| (k, if secret_property(k) { "<redacted>" } else { v.as_str() })).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl EventSinksConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: String, why: &str| rule(key, why);
        let e = self;
        if e.outbox.buffer == 0 {
            return bad("events.outbox.buffer".into(), "must be at least 1");
        }
        if e.outbox.max_events == 0 {
            return bad("events.outbox.max_events".into(), "must be at least 1");
        }
        if e.outbox.initial_backoff.0.is_zero() || e.outbox.max_backoff.0 < e.outbox.initial_backoff.0 {
            return bad("events.outbox.initial_backoff".into(), "must be above 0 and at most events.outbox.max_backoff");
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in e.sinks.iter().enumerate() {
            let key = |k: &str| format!("events.sinks[{i}].{k}");
            let name_ok = !s.name.is_empty()
                && s.name.len() <= 64
                && s.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !name_ok {
                return bad(key("name"), "required: 1 to 64 of a-z, 0-9, - and _");
            }
            if !names.insert(s.name.as_str()) {
                return bad(key("name"), "two sinks have this name");
            }
            if s.batch_max == 0 || s.batch_max > 10_000 {
                return bad(key("batch_max"), "must be between 1 and 10000");
            }
            if s.timeout.0.is_zero() {
                return bad(key("timeout"), "must be above 0");
            }
            if s.unroutable == Unroutable::Drop && s.kind != SinkType::Amqp {
                return bad(key("unroutable"), "is for amqp sinks");
            }
            if s.format == SinkFormat::Protobuf && s.kind != SinkType::Kafka {
                return bad(key("format"), "protobuf is for kafka sinks; webhook and amqp send JSON");
            }
            match s.kind {
                SinkType::Webhook => {
                    if !(s.url.starts_with("http://") || s.url.starts_with("https://")) {
                        return bad(key("url"), "required for a webhook: an http:// or https:// URL");
                    }
                    if s.secret.len() < 16 {
                        return bad(key("secret"), "required for a webhook: at least 16 bytes (the HMAC-SHA256 key)");
                    }
                }
                SinkType::Amqp => {
                    if !(s.url.starts_with("amqp://") || s.url.starts_with("amqps://")) {
                        return bad(key("url"), "required for an amqp sink: an amqp:// or amqps:// URL");
                    }
                    if s.exchange.is_empty() {
                        return bad(key("exchange"), "must not be empty");
                    }
                }
                SinkType::Kafka => {
                    if !cfg!(feature = "kafka") {
                        return bad(key("type"), "this presenced was built without the kafka feature (cargo build --features kafka)");
                    }
                    if s.brokers.trim().is_empty() {
                        return bad(key("brokers"), "required for a kafka sink: host:port[,host:port...]");
                    }
                    let topic_ok = !s.topic.is_empty()
                        && s.topic.len() <= 249
                        && s.topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                    if !topic_ok {
                        return bad(key("topic"), "1 to 249 of a-z, A-Z, 0-9, '.', '_' and '-'");
                    }
                    if !["none", "gzip", "snappy", "lz4"].contains(&s.compression.as_str()) {
                        return bad(key("compression"), "one of none, gzip, snappy, lz4");
                    }
                }
            }
        }
        Ok(())
    }
}
