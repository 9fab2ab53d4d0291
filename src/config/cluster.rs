//! The cluster backends' sections: `nats`, `redis` and the read-through `cache`.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::source::{de_list, de_string};
use super::{rule, ByteSize, ConfigError, Dur};

/// Seed 003 §9.1 `nats` section; read by the NATS backend (`store.backend: nats`).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Start and supervise a local `nats-server` (JetStream in `data_dir`), listening on
    /// `embedded_listen`; the node connects to it.
    pub embedded: bool,
    /// The `nats-server` executable for `embedded` (looked up on PATH, then /usr/sbin).
    pub server_binary: PathBuf,
    /// Where the embedded server listens (loopback by default).
    #[serde(deserialize_with = "de_string")]
    pub embedded_listen: String,
    /// Servers to connect to; several = a cluster (the client fails over between them).
    /// A list, or one string with commas (`PRESENCE_NATS__URLS=nats://a:4222,nats://b:4222`).
    #[serde(deserialize_with = "de_list")]
    pub urls: Vec<String>,
    pub data_dir: PathBuf,
    pub jetstream: JetStreamConfig,
    pub kv: KvConfig,
    pub events: EventsConfig,
    /// Credentials (seed 002: from the environment, e.g. `password: ${NATS_PASSWORD}` or
    /// `PRESENCE_NATS__PASSWORD`). At most one of user/password, token, nkey_seed,
    /// credentials_file.
    #[serde(deserialize_with = "de_string")]
    pub user: String,
    #[serde(deserialize_with = "de_string")]
    pub password: String,
    #[serde(deserialize_with = "de_string")]
    pub token: String,
    #[serde(deserialize_with = "de_string")]
    pub nkey_seed: String,
    pub credentials_file: Option<PathBuf>,
    pub tls: NatsTlsConfig,
    /// Connection attempts time out after this.
    pub connect_timeout: Dur,
    /// Longest wait between reconnection attempts (backoff with jitter up to this).
    pub max_reconnect_delay: Dur,
    /// Timeout of one JetStream/KV request; three failures in a row put the node in
    /// degraded mode (circuit breaker) until a probe succeeds.
    pub request_timeout: Dur,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            embedded: false,
            server_binary: PathBuf::from("nats-server"),
            embedded_listen: "127.0.0.1:4222".into(),
            urls: vec!["nats://127.0.0.1:4222".into()],
            data_dir: PathBuf::from("./nats-data"),
            jetstream: JetStreamConfig::default(),
            kv: KvConfig::default(),
            events: EventsConfig::default(),
            user: String::new(),
            password: String::new(),
            token: String::new(),
            nkey_seed: String::new(),
            credentials_file: None,
            tls: NatsTlsConfig::default(),
            connect_timeout: Dur::secs(5),
            max_reconnect_delay: Dur::secs(5),
            request_timeout: Dur::secs(2),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("NatsConfig")
            .field("embedded", &self.embedded)
            .field("embedded_listen", &self.embedded_listen)
            .field("urls", &self.urls)
            .field("data_dir", &self.data_dir)
            .field("jetstream", &self.jetstream)
            .field("kv", &self.kv)
            .field("events", &self.events)
            .field("user", &self.user)
            .field("password", &redact(&self.password))
            .field("token", &redact(&self.token))
            .field("nkey_seed", &redact(&self.nkey_seed))
            .field("credentials_file", &self.credentials_file)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl NatsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let methods = [
            !self.user.is_empty() || !self.password.is_empty(),
            !self.token.is_empty(),
            !self.nkey_seed.is_empty(),
            self.credentials_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return rule("nats", "set only one of user/password, token, nkey_seed or credentials_file");
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return rule("nats.tls", "cert_file and key_file go together");
        }
        if self.urls.is_empty() {
            return rule("nats.urls", "needs at least one server URL, e.g. nats://127.0.0.1:4222");
        }
        Ok(())
    }
}

/// The `PRESENCE_EVENTS` stream that captures `presence.*` events for durable consumers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// How long events are kept for consumers to replay.
    pub max_age: Dur,
    /// Upper bound of the stream's size.
    pub max_bytes: ByteSize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig { max_age: Dur::secs(24 * 3600), max_bytes: ByteSize(1 << 30) }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTlsConfig {
    /// Require TLS even when the server does not ask for it.
    pub required: bool,
    /// CA bundle (PEM) to trust for the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamConfig {
    pub max_memory: ByteSize,
    pub max_file: ByteSize,
    #[serde(deserialize_with = "de_string")]
    pub domain: String,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig { max_memory: ByteSize(1 << 30), max_file: ByteSize(10 << 30), domain: String::new() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KvConfig {
    #[serde(deserialize_with = "de_string")]
    pub bucket: String,
    pub ttl: Dur,
    pub replicas: usize,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig { bucket: "presence".into(), ttl: Dur::secs(3600), replicas: 1 }
    }
}

/// The `redis` section; read by the Redis backend (`store.backend: redis`).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// One server (`redis://host:port/db`, `rediss://` for TLS); with `cluster`, seed
    /// nodes of a Redis Cluster; with `sentinel_master`, the Sentinels to ask. A list, or
    /// one string with commas.
    #[serde(deserialize_with = "de_list")]
    pub urls: Vec<String>,
    /// The servers form a Redis Cluster (sharded pub/sub on Redis 7).
    pub cluster: bool,
    /// Name of the master that the Sentinels at `urls` watch (empty: no Sentinel).
    #[serde(deserialize_with = "de_string")]
    pub sentinel_master: String,
    /// Prefix of every key and channel, so several deployments share one Redis.
    #[serde(deserialize_with = "de_string")]
    pub key_prefix: String,
    /// ACL credentials (e.g. `password: ${REDIS_PASSWORD}` or `PRESENCE_REDIS__PASSWORD`);
    /// override those in the URL.
    #[serde(deserialize_with = "de_string")]
    pub username: String,
    #[serde(deserialize_with = "de_string")]
    pub password: String,
    pub tls: RedisTlsConfig,
    /// Multiplexed connections for commands (each pipelines many requests).
    pub pool_size: usize,
    pub connect_timeout: Dur,
    /// Timeout of one command; three failures in a row put the node in degraded mode
    /// (circuit breaker) until a probe succeeds.
    pub request_timeout: Dur,
    /// Longest wait between reconnection attempts (exponential backoff up to this).
    pub max_reconnect_delay: Dur,
    pub events: RedisEventsConfig,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            urls: vec!["redis://127.0.0.1:6379".into()],
            cluster: false,
            sentinel_master: String::new(),
            key_prefix: "presence:".into(),
            username: String::new(),
            password: String::new(),
            tls: RedisTlsConfig::default(),
            pool_size: 4,
            connect_timeout: Dur::secs(5),
            request_timeout: Dur::secs(2),
            max_reconnect_delay: Dur::secs(5),
            events: RedisEventsConfig::default(),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("urls", &self.urls)
            .field("cluster", &self.cluster)
            .field("sentinel_master", &self.sentinel_master)
            .field("key_prefix", &self.key_prefix)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "<redacted>" })
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisTlsConfig {
    /// CA bundle (PEM) to trust for the server's certificate (`rediss://` URLs).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The Redis Stream every event is also appended to (`<prefix>events`), for consumers
/// that replay (`XRANGE`, `XREAD`), as `PRESENCE_EVENTS` on NATS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisEventsConfig {
    /// Approximate length the stream is trimmed to (`XADD MAXLEN ~`).
    pub max_len: u64,
}

impl Default for RedisEventsConfig {
    fn default() -> Self {
        RedisEventsConfig { max_len: 100_000 }
    }
}

/// Seed 003 §9.1 `cache` section; read-through cache of cluster backends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(rename = "type", deserialize_with = "de_string")]
    pub kind: String,
    pub max_cost: u64,
    pub num_counters: u64,
    pub buffer_items: u64,
    pub metrics: bool,
    /// Follow every write of the users bucket to keep the cache coherent (NATS). Off:
    /// reads go to the store (the cache is then only the degraded mode's last copy), and
    /// the node no longer receives every user's writes.
    pub watch_writes: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            kind: "tinylfu".into(),
            max_cost: 64 << 20,
            num_counters: 100_000,
            buffer_items: 64,
            metrics: true,
            watch_writes: true,
        }
    }
}

impl RedisConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return rule("redis.urls", "needs at least one server URL, e.g. redis://127.0.0.1:6379");
        }
        if self.cluster && !self.sentinel_master.is_empty() {
            return rule("redis.cluster", "a Redis Cluster has no Sentinel: set either redis.cluster or redis.sentinel_master");
        }
        if self.key_prefix.contains(['{', '}']) {
            return rule(
                "redis.key_prefix",
                "must not contain { or } (they mark the hash tags that keep a user's keys in one cluster slot)",
            );
        }
        if self.pool_size == 0 || self.pool_size > 64 {
            return rule("redis.pool_size", "must be 1 to 64");
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return rule("redis.tls", "cert_file and key_file go together");
        }
        if self.events.max_len < 1000 {
            return rule("redis.events.max_len", "must be at least 1000");
        }
        Ok(())
    }
}
