//! Configuration: defaults ← YAML file (with `${VAR}` / `${VAR:-default}` interpolation)
//! ← environment overrides `PRESENCE_<SECTION>__<KEY>` (e.g. `PRESENCE_SERVICE__PORT=8081`).
//!
//! The environment is passed in (the process environment in `main`, a map in tests); this
//! module never reads or writes the process environment itself. Every key is checked:
//! an unknown key or a bad value is an error that names the key and the expected form.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod units;
pub use units::{ByteSize, Dur};

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

const ENV_PREFIX: &str = "PRESENCE_";
/// The most worker threads `service.worker_threads` accepts.
const MAX_WORKER_THREADS: usize = 1024;

/// Why a configuration was refused (exit code 64): each names the key or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    /// A key that is not a setting.
    #[error("config: {key}: {reason}")]
    UnknownKey { key: String, reason: String },
    /// A value of the wrong form, or out of its range.
    #[error("config: {key}: {reason}")]
    BadValue { key: String, reason: String },
    /// A rule between settings, or one the service needs (e.g. a long enough secret).
    #[error("config: {key}: {reason}")]
    Rule { key: String, reason: String },
    /// `${VAR}` in the file with no such variable and no default, or bad syntax.
    #[error("config: {key}: {reason}")]
    Variable { key: String, reason: String },
    /// An environment variable not written `PRESENCE_<SECTION>__<KEY>`.
    #[error("config: {var}: {reason}")]
    Override { var: String, reason: String },
}

/// The whole configuration; see the README's config reference.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub service: ServiceConfig,
    pub store: StoreConfig,
    pub presence: PresenceConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub logging: LoggingConfig,
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub cache: CacheConfig,
    /// Event sinks: every transition delivered to webhooks (and brokers) through an
    /// on-disk outbox.
    pub events: EventSinksConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(deserialize_with = "de_string")]
    pub name: String,
    #[serde(deserialize_with = "de_string")]
    pub version: String,
    /// Address the HTTP and gRPC listeners bind to.
    #[serde(deserialize_with = "de_string")]
    pub host: String,
    pub port: u16,
    pub grpc_port: u16,
    pub node_type: NodeType,
    /// Defaults to the host name.
    #[serde(deserialize_with = "de_string")]
    pub node_id: String,
    pub data_dir: PathBuf,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Dur,
    /// Threads running the node's tasks; 0: one per CPU core. Many nodes on few cores
    /// (one per 20,000 open files) run best with 1 each: no thread wakes another.
    pub worker_threads: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            name: "presenced".into(),
            version: "v2".into(),
            host: "0.0.0.0".into(),
            port: 8080,
            grpc_port: 9090,
            node_type: NodeType::Center,
            node_id: String::new(),
            data_dir: PathBuf::from("./data"),
            shutdown_grace: Dur::secs(10),
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeType {
    Center,
    Leaf,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Memory,
    Nats,
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: Backend,
    /// Persist explicit statuses under `service.data_dir` (memory backend).
    pub persist: bool,
    /// Lock shards of the memory backend.
    pub shards: usize,
    /// Expiry timer resolution.
    pub tick: Dur,
    /// Start with an empty store when the database file is empty or damaged beyond
    /// repair (it is moved aside first). Off: such a file stops the start (exit 64).
    pub start_fresh: bool,
    /// Cluster mode: above this many watched users (1,000) a node takes every user's events
    /// through one wildcard subscription instead of one subscription per watched user
    /// (back to per-user below half of it); `0` keeps per-user subscriptions always.
    pub interest_all_above: usize,
    /// Cluster mode: exit at once (64) when NATS or Redis cannot be reached at start. Off
    /// (the default): start anyway, answer `/health` 503 and retry with backoff (0.5 s
    /// doubling to 30 s), and serve by itself once the store answers.
    pub fail_fast: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Memory,
            persist: true,
            shards: 64,
            tick: Dur::millis(100),
            start_fresh: false,
            interest_all_above: 1_000,
            fail_fast: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// A device session not refreshed within this time expires.
    pub session_ttl: Dur,
    /// Interval clients are told to heartbeat at; must be below `session_ttl`.
    pub heartbeat_interval: Dur,
    pub typing_ttl: Dur,
    /// TTL of an explicit status written without `ttl`; `0s` = until changed.
    pub default_status_ttl: Dur,
    /// Cluster mode: a node whose lease was not renewed for this long is dead; a
    /// surviving node ends its sessions. Renewed every third of it.
    pub node_lease_ttl: Dur,
    /// Cluster mode: heartbeats stay in the owning node's memory; a connected user's
    /// `last_seen` is also written to the store at most this often. `0s` (default):
    /// only on disconnect (or, after a node loss, the dead node's last lease renewal).
    pub last_seen_interval: Dur,
    /// Forget a user who has had no session and no status for this long (their
    /// `last_seen` goes too), so churning ids do not grow the store; `0s`: never.
    pub forget_after: Dur,
    /// A device that goes away without signing out (a lost or closed socket, a
    /// gateway's plain `UnregisterSession`, a drained or lost node) is held this long
    /// from the moment it was last heard of, still shown; registering again within it
    /// continues the session with no event. `0s`: ends at once. A grace longer than
    /// `session_ttl` is cut to it (see [`PresenceConfig::grace_ms`]).
    pub offline_grace: Dur,
}

impl PresenceConfig {
    /// The offline grace in force: `offline_grace`, at most `session_ttl` (a device last
    /// heard longer ago than its TTL is gone, however it left).
    pub fn grace_ms(&self) -> i64 {
        self.offline_grace.as_millis_i64().min(self.session_ttl.as_millis_i64())
    }
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            session_ttl: Dur::secs(60),
            heartbeat_interval: Dur::secs(25),
            typing_ttl: Dur::secs(5),
            default_status_ttl: Dur::secs(3600),
            node_lease_ttl: Dur::secs(15),
            last_seen_interval: Dur::secs(0),
            forget_after: Dur::secs(30 * 24 * 3600),
            offline_grace: Dur::secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Jwt,
    Gateway,
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// HS256 secret; when empty a random one is created in `data_dir/jwt.secret`.
    #[serde(deserialize_with = "de_string")]
    pub jwt_secret: String,
    #[serde(deserialize_with = "de_string")]
    pub jwt_issuer: String,
    /// Lifetime of tokens minted by `presenced token`.
    pub jwt_ttl: Dur,
    /// PEM public key (RSA or EC P-256) enabling RS256 / ES256 tokens, inline...
    #[serde(deserialize_with = "de_string")]
    pub public_key: String,
    /// ...or from a file.
    pub public_key_file: Option<PathBuf>,
    /// Allowed clock skew when checking `exp`/`nbf`.
    pub leeway: Dur,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Jwt,
            jwt_secret: String::new(),
            jwt_issuer: "presence-service".into(),
            jwt_ttl: Dur::secs(24 * 3600),
            public_key: String::new(),
            public_key_file: None,
            leeway: Dur::secs(30),
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field("jwt_secret", &if self.jwt_secret.is_empty() { "" } else { "<redacted>" })
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_ttl", &self.jwt_ttl)
            .field("public_key_file", &self.public_key_file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most ids in one batch / multi read.
    pub max_batch_ids: usize,
    pub max_user_id_len: usize,
    /// Longest custom status message, in characters.
    pub max_message_len: usize,
    /// Largest request body.
    pub max_body_bytes: ByteSize,
    /// Longest TTL an explicit status may have.
    pub max_status_ttl: Dur,
    /// Per-user token bucket on writes.
    pub write_rate_per_sec: f64,
    pub write_burst: u32,
    /// Events buffered for a slow bus subscriber before it must resync.
    pub event_bus_capacity: usize,
    /// Requests taking longer are answered 503.
    pub request_timeout: Dur,
    /// Live device sessions one user may have.
    pub max_devices_per_user: usize,
    /// Users one WebSocket connection may subscribe to.
    pub max_subscriptions_per_connection: usize,
    /// Messages a WebSocket client may send per second (token bucket with `ws_message_burst`).
    pub ws_messages_per_sec: f64,
    pub ws_message_burst: u32,
    /// Largest WebSocket frame/message a client may send; larger closes with 1009.
    pub ws_max_message_bytes: ByteSize,
    /// Pending outbound messages per connection (after coalescing) before it is closed with 1013.
    pub ws_outbound_queue: usize,
    /// Read buffer of each WebSocket connection: client messages are small, and larger
    /// ones (up to `ws_max_message_bytes`) are still read, in several steps.
    pub ws_read_buffer_bytes: ByteSize,
    /// Contacts per user.
    pub max_contacts: usize,
    /// Members per conversation.
    pub max_conversation_members: usize,
    /// New connections per client IP per second, on `/ws` and on the gRPC port (token
    /// bucket with `connection_burst_per_ip`); `0` turns the limit off.
    pub connections_per_ip_per_sec: f64,
    pub connection_burst_per_ip: u32,
    /// HTTP and gRPC: a client must send a whole request head (HTTP/2: open its first
    /// stream) within this time of starting one, or of connecting.
    pub header_read_timeout: Dur,
    /// HTTP keep-alive and gRPC: a connection with no request in flight for this long is
    /// closed (WebSockets are not affected: they have their own heartbeat).
    pub idle_timeout: Dur,
    /// gRPC: concurrent streams (calls) per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub grpc_max_concurrent_streams: u32,
    /// gRPC: `WatchPresence` streams open at once in this process.
    pub grpc_max_watch_streams: usize,
    /// gRPC: user ids watched by all `WatchPresence` streams together.
    pub grpc_max_watched_ids: usize,
    /// gRPC: events one `WatchPresence` stream may hold for a slow reader (after
    /// coalescing per user) before it is ended with `RESOURCE_EXHAUSTED`.
    pub grpc_watch_buffer: usize,
    /// Sessions in one batch call (gRPC `RegisterSessions` / `UnregisterSessions`, REST
    /// `POST /api/v2/sessions` and `/api/v2/sessions/unregister`).
    pub max_sessions_per_call: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_batch_ids: 1000,
            max_user_id_len: 128,
            max_message_len: 256,
            max_body_bytes: ByteSize(64 * 1024),
            max_status_ttl: Dur::secs(30 * 24 * 3600),
            write_rate_per_sec: 10.0,
            write_burst: 20,
            event_bus_capacity: 65536,
            request_timeout: Dur::secs(10),
            max_devices_per_user: 10,
            max_subscriptions_per_connection: 1000,
            ws_messages_per_sec: 20.0,
            ws_message_burst: 40,
            ws_max_message_bytes: ByteSize(16 * 1024),
            ws_outbound_queue: 1024,
            ws_read_buffer_bytes: ByteSize(512),
            max_contacts: 5000,
            max_conversation_members: 10_000,
            connections_per_ip_per_sec: 20.0,
            connection_burst_per_ip: 100,
            header_read_timeout: Dur::secs(10),
            idle_timeout: Dur::secs(120),
            grpc_max_concurrent_streams: 100,
            grpc_max_watch_streams: 4096,
            grpc_max_watched_ids: 1_000_000,
            grpc_watch_buffer: 10_000,
            max_sessions_per_call: 5000,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// A level (`info`) or a tracing filter (`info,presenced=debug`).
    #[serde(deserialize_with = "de_string")]
    pub level: String,
    pub format: LogFormat,
    /// One line per HTTP request (target `presenced::access`, level info): method, route
    /// template, status, latency, peer. Never a query string, header or body, so never a
    /// token. Off by default.
    pub access_log: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { level: "info".into(), format: LogFormat::Text, access_log: false }
    }
}

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

impl Config {
    /// What `presenced config` prints: [`Config::redacted`], a generated JWT secret said
    /// to be one (and where it is kept), and each sink with only its type's keys.
    pub fn printable(&self) -> Result<serde_yaml::Value, serde_yaml::Error> {
        let mut c = self.redacted();
        if self.auth.jwt_secret.is_empty() {
            c.auth.jwt_secret = format!("<generated: {}>", self.service.data_dir.join("jwt.secret").display());
        }
        let mut v = serde_yaml::to_value(&c)?;
        let sinks = v.get_mut("events").and_then(|e| e.get_mut("sinks")).and_then(|s| s.as_sequence_mut());
        for (sink, cfg) in sinks.into_iter().flatten().zip(&self.events.sinks) {
            if let Some(m) = sink.as_mapping_mut() {
                m.retain(|k, _| k.as_str().is_some_and(|k| cfg.kind.keys().contains(&k)));
            }
        }
        Ok(v)
    }

    /// A copy safe to print: secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        let mut sinks: Vec<&mut String> = Vec::new();
        for s in c.events.sinks.iter_mut() {
            // An AMQP URL may carry a password.
            s.url = redact_url(&s.url);
            sinks.push(&mut s.secret);
            sinks.extend(s.properties.iter_mut().filter(|(k, _)| secret_property(k)).map(|(_, v)| v));
        }
        for s in [&mut c.auth.jwt_secret, &mut c.nats.password, &mut c.nats.token, &mut c.nats.nkey_seed, &mut c.redis.password]
            .into_iter()
            .chain(sinks)
        {
            if !s.is_empty() {
                *s = "<redacted>".into();
            }
        }
        c
    }
}

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
fn redact_url(url: &str) -> String {
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

impl Config {
    /// Loads defaults, then `file` (if any), then overrides from `env`, then validates.
    pub fn load<I, K, V>(file: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let env: HashMap<String, String> = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let mut tree = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
                let mut v: Value =
                    serde_yaml::from_str(&text).map_err(|e| ConfigError::Yaml { path: path.into(), message: e.to_string() })?;
                if v.is_null() {
                    v = Value::Mapping(Default::default());
                }
                interpolate(&mut v, &env, "")?;
                v
            }
            None => Value::Mapping(Default::default()),
        };
        apply_env_overrides(&mut tree, &env)?;
        let mut config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let (key, reason) = (display_path(&e.path().to_string()), e.inner().to_string());
            if reason.starts_with("unknown field") {
                ConfigError::UnknownKey { key, reason }
            } else {
                ConfigError::BadValue { key, reason }
            }
        })?;
        if config.service.node_id.is_empty() {
            config.service.node_id = default_node_id();
        }
        config.validate()?;
        Ok(config)
    }

    fn validate_sinks(&self) -> Result<(), ConfigError> {
        let bad = |key: String, why: &str| Err(ConfigError::Rule { key, reason: why.to_string() });
        let e = &self.events;
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

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError::Rule { key: key.to_string(), reason: why.to_string() });
        if self.service.worker_threads > MAX_WORKER_THREADS {
            return bad("service.worker_threads", "must be at most 1024 (0: one per CPU core)");
        }
        let p = &self.presence;
        if p.session_ttl.0 < Duration::from_secs(1) {
            return bad("presence.session_ttl", "must be at least 1s");
        }
        if p.node_lease_ttl.0 < Duration::from_secs(1) {
            return bad("presence.node_lease_ttl", "must be at least 1s");
        }
        if p.heartbeat_interval.0.is_zero() || p.heartbeat_interval.0 >= p.session_ttl.0 {
            return bad("presence.heartbeat_interval", "must be above 0 and below presence.session_ttl");
        }
        if p.typing_ttl.0.is_zero() {
            return bad("presence.typing_ttl", "must be above 0");
        }

        self.validate_sinks()?;
        let l = &self.limits;
        if l.max_sessions_per_call == 0 {
            return bad("limits.max_sessions_per_call", "must be at least 1");
        }
        if l.max_batch_ids == 0 {
            return bad("limits.max_batch_ids", "must be at least 1");
        }
        if l.max_user_id_len == 0 {
            return bad("limits.max_user_id_len", "must be at least 1");
        }
        if !(l.write_rate_per_sec.is_finite() && l.write_rate_per_sec > 0.0) {
            return bad("limits.write_rate_per_sec", "must be a number above 0");
        }
        if l.write_burst == 0 {
            return bad("limits.write_burst", "must be at least 1");
        }
        if l.max_body_bytes.0 < 64 {
            return bad("limits.max_body_bytes", "must be at least 64 bytes");
        }
        if !(l.ws_messages_per_sec.is_finite() && l.ws_messages_per_sec > 0.0) || l.ws_message_burst == 0 {
            return bad("limits.ws_messages_per_sec", "ws_messages_per_sec must be above 0 and ws_message_burst at least 1");
        }
        if l.ws_read_buffer_bytes.0 < 256 {
            return bad("limits.ws_read_buffer_bytes", "must be at least 256 bytes");
        }
        if l.ws_max_message_bytes.0 < 128 {
            return bad("limits.ws_max_message_bytes", "must be at least 128 bytes");
        }
        if l.max_devices_per_user == 0 || l.ws_outbound_queue == 0 || l.max_subscriptions_per_connection == 0 {
            return bad("limits", "max_devices_per_user, ws_outbound_queue and max_subscriptions_per_connection must be at least 1");
        }
        if l.request_timeout.0.is_zero() {
            return bad("limits.request_timeout", "must be above 0");
        }
        if self.store.tick.0.is_zero() {
            return bad("store.tick", "must be above 0");
        }
        if !(l.connections_per_ip_per_sec.is_finite() && l.connections_per_ip_per_sec >= 0.0) {
            return bad("limits.connections_per_ip_per_sec", "must be 0 (off) or a number above 0");
        }
        if l.header_read_timeout.0 < Duration::from_millis(100) || l.idle_timeout.0 < Duration::from_millis(100) {
            return bad("limits.header_read_timeout", "header_read_timeout and idle_timeout must be at least 100ms");
        }
        if l.grpc_max_concurrent_streams == 0 || l.grpc_max_watch_streams == 0 || l.grpc_max_watched_ids == 0 || l.grpc_watch_buffer == 0 {
            return bad(
                "limits.grpc_max_watch_streams",
                "grpc_max_concurrent_streams, grpc_max_watch_streams, grpc_max_watched_ids and grpc_watch_buffer must be at least 1",
            );
        }
        let secret = self.auth.jwt_secret.trim();
        if secret.starts_with('<') && secret.ends_with('>') {
            return bad(
                "auth.jwt_secret",
                "is a placeholder that `presenced config` prints (<redacted>, <generated: ...>), not a secret: put the real one, or leave it unset to use the generated one",
            );
        }
        if !self.auth.jwt_secret.is_empty() && self.auth.jwt_secret.trim().len() < crate::auth::MIN_SECRET_BYTES {
            return bad(
                "auth.jwt_secret",
                &format!(
                    "must be at least {} bytes (a short HMAC key can be guessed; `openssl rand -hex 32` makes a good one)",
                    crate::auth::MIN_SECRET_BYTES
                ),
            );
        }
        if self.service.node_id.is_empty() || crate::core::validate_id("node id", &self.service.node_id, 128).is_err() {
            return bad("service.node_id", "must be 1-128 characters of letters, digits and . _ @ : + -");
        }
        let n = &self.nats;
        let methods =
            [!n.user.is_empty() || !n.password.is_empty(), !n.token.is_empty(), !n.nkey_seed.is_empty(), n.credentials_file.is_some()];
        if methods.iter().filter(|m| **m).count() > 1 {
            return bad("nats", "set only one of user/password, token, nkey_seed or credentials_file");
        }
        if n.tls.cert_file.is_some() != n.tls.key_file.is_some() {
            return bad("nats.tls", "cert_file and key_file go together");
        }
        if n.urls.is_empty() {
            return bad("nats.urls", "needs at least one server URL, e.g. nats://127.0.0.1:4222");
        }
        let r = &self.redis;
        if r.urls.is_empty() {
            return bad("redis.urls", "needs at least one server URL, e.g. redis://127.0.0.1:6379");
        }
        if r.cluster && !r.sentinel_master.is_empty() {
            return bad("redis.cluster", "a Redis Cluster has no Sentinel: set either redis.cluster or redis.sentinel_master");
        }
        if r.key_prefix.contains(['{', '}']) {
            return bad(
                "redis.key_prefix",
                "must not contain { or } (they mark the hash tags that keep a user's keys in one cluster slot)",
            );
        }
        if r.pool_size == 0 || r.pool_size > 64 {
            return bad("redis.pool_size", "must be 1 to 64");
        }
        if r.tls.cert_file.is_some() != r.tls.key_file.is_some() {
            return bad("redis.tls", "cert_file and key_file go together");
        }
        if r.events.max_len < 1000 {
            return bad("redis.events.max_len", "must be at least 1000");
        }
        if !self.auth.public_key.is_empty() && self.auth.public_key_file.is_some() {
            return bad("auth.public_key", "set either auth.public_key or auth.public_key_file, not both");
        }
        Ok(())
    }
}

fn display_path(p: &str) -> String {
    if p == "." || p.is_empty() {
        "(top level)".into()
    } else {
        p.to_string()
    }
}

fn default_node_id() -> String {
    let raw =
        std::fs::read_to_string("/proc/sys/kernel/hostname").or_else(|_| std::fs::read_to_string("/etc/hostname")).unwrap_or_default();
    let cleaned: String = raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')).take(64).collect();
    if cleaned.is_empty() {
        "presenced-1".into()
    } else {
        cleaned
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string of the tree. A scalar that is
/// exactly one reference is re-read as YAML, so `port: ${PORT}` yields a number.
fn interpolate(v: &mut Value, env: &HashMap<String, String>, path: &str) -> Result<(), ConfigError> {
    match v {
        Value::String(s) if s.contains("${") => {
            let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            let replaced = substitute(s, env).map_err(|reason| ConfigError::Variable { key: display_path(path), reason })?;
            *v = if whole { scalar(&replaced) } else { Value::String(replaced) };
        }
        Value::Mapping(m) => {
            for (k, child) in m.iter_mut() {
                let key = k.as_str().unwrap_or("?");
                let p = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
                interpolate(child, env, &p)?;
            }
        }
        Value::Sequence(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                interpolate(child, env, &format!("{path}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn substitute(s: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid variable name {name:?} in ${{...}}"));
        }
        match (env.get(name), default) {
            (Some(v), _) => out.push_str(v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set (write ${{{name}:-default}} for a fallback)")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads an environment/interpolated value as a YAML scalar (number, bool, string).
fn scalar(s: &str) -> Value {
    match serde_yaml::from_str::<Value>(s) {
        Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::String(_))) => v,
        Ok(Value::Sequence(seq)) if s.trim_start().starts_with('[') => Value::Sequence(seq),
        _ => Value::String(s.to_string()),
    }
}

/// Whether an environment variable is one of ours: `PRESENCE_<SECTION>__<KEY>`. Other
/// `PRESENCE_*` names are not overrides and do not stop the start: `PRESENCE_CONFIG` (the
/// file), and what Kubernetes injects for a Service named `presence` (`PRESENCE_PORT`,
/// `PRESENCE_SERVICE_HOST`, `PRESENCE_PORT_8080_TCP_ADDR`, ...).
pub fn is_override(name: &str) -> bool {
    // `PRESENCE__PORT` (an empty section) is a mistake of ours to report, not theirs.
    name.strip_prefix(ENV_PREFIX).is_some_and(|rest| rest.contains("__") || rest.starts_with('_'))
}

fn apply_env_overrides(tree: &mut Value, env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let mut keys: Vec<&String> = env.keys().filter(|k| is_override(k)).collect();
    keys.sort();
    for key in keys {
        let path: Vec<String> = key[ENV_PREFIX.len()..].split("__").map(|p| p.to_ascii_lowercase()).collect();
        if path.len() < 2 || path.iter().any(|p| p.is_empty() || p.starts_with('_')) {
            return Err(ConfigError::Override {
                var: key.clone(),
                reason: "environment overrides are written PRESENCE_<SECTION>__<KEY> (each part non-empty)".into(),
            });
        }
        let mut node = &mut *tree;
        for (i, part) in path.iter().enumerate() {
            if !node.is_mapping() {
                *node = Value::Mapping(Default::default());
            }
            let Value::Mapping(map) = node else {
                return Err(ConfigError::Override { var: key.clone(), reason: "cannot set a key below a scalar".into() });
            };
            let k = Value::String(part.clone());
            if i + 1 == path.len() {
                map.insert(k, scalar(&env[key]));
                break;
            }
            node = map.entry(k).or_insert_with(|| Value::Mapping(Default::default()));
        }
    }
    Ok(())
}

/// A list of strings: a YAML sequence, or one string of comma-separated items (how a list
/// is written in an environment variable).
fn de_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Sequence(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(de::Error::custom("expected a list of strings")),
            })
            .collect(),
        Value::String(s) => Ok(s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()),
        Value::Null => Ok(Vec::new()),
        _ => Err(de::Error::custom("expected a list of strings, or one string of comma-separated items")),
    }
}

/// Accepts a string, or a number/bool written where a string is expected
/// (`jwt_secret: 12345`, `PRESENCE_SERVICE__NODE_ID=7`).
fn de_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        _ => Err(de::Error::custom("expected a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.service.port, 8080);
        assert_eq!(c.service.grpc_port, 9090);
        assert_eq!(c.store.backend, Backend::Memory);
        assert_eq!(c.presence.session_ttl, Dur::secs(60));
        assert_eq!(c.limits.max_batch_ids, 1000);
        assert!(!c.service.node_id.is_empty());
    }

    #[test]
    fn seed_config_file_loads_with_interpolation() {
        let f = file(
            "service:\n  name: presence-service\n  version: v2\n  port: 8080\n  node_type: leaf\n  node_id: center-node-1\n\
             nats:\n  embedded: true\n  data_dir: ./nats-data\n  jetstream:\n    max_memory: 1GB\n    max_file: 10GB\n  kv:\n    bucket: presence\n    ttl: 3600s\n\
             cache:\n  type: ristretto\n  max_cost: 1000000\n  num_counters: 100000\n  buffer_items: 64\n  metrics: true\n\
             auth:\n  jwt_secret: ${JWT_SECRET}\n  jwt_issuer: presence-service\n  jwt_ttl: 24h\n\
             logging:\n  level: info\n  format: json\n",
        );
        let c = Config::load(Some(f.path()), env(&[("JWT_SECRET", "s3cret-s3cret-s3cret-s3cret-s3cret")])).unwrap();
        assert_eq!(c.auth.jwt_secret, "s3cret-s3cret-s3cret-s3cret-s3cret");
        assert_eq!(c.auth.jwt_ttl, Dur::secs(86_400));
        assert_eq!(c.service.node_type, NodeType::Leaf);
        assert_eq!(c.nats.jetstream.max_file, ByteSize(10_000_000_000));
        assert_eq!(c.logging.format, LogFormat::Json);
        let err = Config::load(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("auth.jwt_secret") && err.contains("JWT_SECRET"), "{err}");
    }

    #[test]
    fn interpolation_defaults_and_typed_values() {
        let f = file("service:\n  port: ${PORT:-9000}\n  name: \"svc-${ENV_NAME:-dev}\"\n");
        let c = Config::load(Some(f.path()), env(&[])).unwrap();
        assert_eq!((c.service.port, c.service.name.as_str()), (9000, "svc-dev"));
        let c = Config::load(Some(f.path()), env(&[("PORT", "8181"), ("ENV_NAME", "prod")])).unwrap();
        assert_eq!((c.service.port, c.service.name.as_str()), (8181, "svc-prod"));
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let f = file("service:\n  port: 8080\nlimits:\n  write_burst: 5\n");
        let c = Config::load(
            Some(f.path()),
            env(&[
                ("PRESENCE_SERVICE__PORT", "8081"),
                ("PRESENCE_PRESENCE__SESSION_TTL", "90s"),
                ("PRESENCE_AUTH__JWT_SECRET", "12345678901234567890123456789012345"),
                ("PRESENCE_NATS__KV__BUCKET", "other"),
                ("PRESENCE_LIMITS__MAX_BODY_BYTES", "1MiB"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.service.port, 8081);
        assert_eq!(c.presence.session_ttl, Dur::secs(90));
        assert_eq!(c.auth.jwt_secret, "12345678901234567890123456789012345");
        assert_eq!(c.nats.kv.bucket, "other");
        assert_eq!(c.limits.write_burst, 5);
        assert_eq!(c.limits.max_body_bytes, ByteSize(1 << 20));
    }

    #[test]
    fn presence_names_that_are_not_overrides_do_not_stop_the_start() {
        // What Kubernetes injects for a Service named `presence`, and the file's variable.
        let k8s = [
            ("PRESENCE_PORT", "tcp://10.0.0.7:8080"),
            ("PRESENCE_PORT_8080_TCP", "tcp://10.0.0.7:8080"),
            ("PRESENCE_PORT_8080_TCP_ADDR", "10.0.0.7"),
            ("PRESENCE_PORT_8080_TCP_PORT", "8080"),
            ("PRESENCE_PORT_8080_TCP_PROTO", "tcp"),
            ("PRESENCE_SERVICE_HOST", "10.0.0.7"),
            ("PRESENCE_SERVICE_PORT", "8080"),
            ("PRESENCE_SERVICE_PORT_HTTP", "8080"),
            ("PRESENCE_CONFIG", "/etc/presenced/config.yaml"),
            ("PRESENCE_SERVICE__PORT", "8081"),
        ];
        let c = Config::load(None, env(&k8s)).unwrap();
        assert_eq!(c.service.port, 8081, "the real override still applies");
        assert!(!is_override("PRESENCE_SERVICE_PORT") && is_override("PRESENCE_SERVICE__PORT"));
    }

    #[test]
    fn list_keys_take_comma_separated_strings() {
        let c = Config::load(
            None,
            env(&[("PRESENCE_NATS__URLS", "nats://a:4222, nats://b:4222"), ("PRESENCE_REDIS__URLS", "redis://r1:6379")]),
        )
        .unwrap();
        assert_eq!(c.nats.urls, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(c.redis.urls, ["redis://r1:6379"]);
        let c = Config::load(None, env(&[("PRESENCE_NATS__URLS", "[nats://a:4222, nats://c:4222]")])).unwrap();
        assert_eq!(c.nats.urls, ["nats://a:4222", "nats://c:4222"], "a YAML list in the variable still works");
        let f = file("redis:\n  urls: redis://x:1,redis://y:2\n");
        assert_eq!(Config::load(Some(f.path()), env(&[])).unwrap().redis.urls, ["redis://x:1", "redis://y:2"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            ("service:\n  prot: 1\n", &[], &["service", "prot"]),
            ("bogus: 1\n", &[], &["bogus"]),
            ("", &[("PRESENCE_SERVICE__NOPE", "1")], &["service", "nope"]),
            ("presence:\n  session_ttl: 10 minutes\n", &[], &["presence.session_ttl", "500ms"]),
            ("service:\n  port: 70000\n", &[], &["service.port"]),
            ("store:\n  backend: mongo\n", &[], &["store.backend", "memory"]),
            ("limits:\n  max_body_bytes: lots\n", &[], &["limits.max_body_bytes", "64KiB"]),
            ("presence:\n  heartbeat_interval: 90s\n", &[], &["presence.heartbeat_interval"]),
            ("limits:\n  write_rate_per_sec: 0\n", &[], &["limits.write_rate_per_sec"]),
            ("", &[("PRESENCE_SERVICE__", "1")], &["PRESENCE_SERVICE__", "PRESENCE_<SECTION>__<KEY>"]),
            ("", &[("PRESENCE_SERVCE__PORT", "1")], &["servce"]),
            ("nats:\n  urls: {a: 1}\n", &[], &["nats.urls", "comma-separated"]),
            ("auth:\n  jwt_secret: short\n", &[], &["auth.jwt_secret", "32 bytes"]),
            ("", &[("PRESENCE_AUTH__JWT_SECRET", "                                      ")], &["auth.jwt_secret"]),
            ("limits:\n  header_read_timeout: 0s\n", &[], &["limits.header_read_timeout"]),
            ("", &[("PRESENCE_SERVICE__WORKER_THREADS", "5000")], &["service.worker_threads"]),
        ];
        for (text, vars, needles) in cases {
            let f = file(text);
            let err = Config::load(Some(f.path()), env(vars)).unwrap_err().to_string();
            for n in *needles {
                assert!(err.contains(n), "error for {text:?} {vars:?} should mention {n:?}: {err}");
            }
        }
    }

    #[test]
    fn errors_say_which_kind_of_mistake() {
        let load = |text: &str, vars: &[(&str, &str)]| Config::load(Some(file(text).path()), env(vars)).unwrap_err();
        let e = load("service:\n  prot: 1\n", &[]);
        assert!(matches!(&e, ConfigError::UnknownKey { .. }), "{e:?}");
        assert!(matches!(load("service:\n  port: 70000\n", &[]), ConfigError::BadValue { key, .. } if key == "service.port"));
        assert!(matches!(load("presence:\n  heartbeat_interval: 90s\n", &[]), ConfigError::Rule { .. }));
        assert!(matches!(load("auth:\n  jwt_secret: ${NOPE}\n", &[]), ConfigError::Variable { key, .. } if key == "auth.jwt_secret"));
        assert!(matches!(load("", &[("PRESENCE__PORT", "1")]), ConfigError::Override { var, .. } if var == "PRESENCE__PORT"));
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = Config::load(
            None,
            env(&[
                ("PRESENCE_AUTH__JWT_SECRET", "topsecret-topsecret-topsecret-topsecret"),
                ("PRESENCE_NATS__PASSWORD", "natspass"),
                ("PRESENCE_NATS__USER", "svc"),
            ]),
        )
        .unwrap();
        assert_eq!(c.nats.password, "natspass");
        let printed = format!("{c:?}\n{}", serde_yaml::to_string(&c.redacted()).unwrap());
        assert!(!printed.contains("topsecret") && !printed.contains("natspass"), "{printed}");
        assert!(printed.contains("svc"));
        let err = Config::load(None, env(&[("PRESENCE_NATS__TOKEN", "t"), ("PRESENCE_NATS__PASSWORD", "p")])).unwrap_err().to_string();
        assert!(err.contains("nats") && err.contains("only one"), "{err}");
    }
}
