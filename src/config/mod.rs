//! Configuration: defaults ← YAML file (with `${VAR}` / `${VAR:-default}` interpolation)
//! ← environment overrides `PRESENCE_<SECTION>__<KEY>` (e.g. `PRESENCE_SERVICE__PORT=8081`).
//!
//! The environment is passed in (the process environment in `main`, a map in tests); this
//! module never reads or writes the process environment itself. Every key is checked:
//! an unknown key or a bad value is an error that names the key and the expected form.
//!
//! One file a job: this one holds [`Config`], its node-wide sections and [`Config::load`];
//! `source` reads the file and the environment into one tree; `limits`, `events` (sinks)
//! and `cluster` (NATS, Redis, cache) hold their sections. Each section's rules stand
//! beside its fields, in its own `validate`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod cluster;
mod events;
mod limits;
mod source;
mod units;

pub use cluster::{
    CacheConfig, EventsConfig, JetStreamConfig, KvConfig, NatsConfig, NatsTlsConfig, RedisConfig, RedisEventsConfig, RedisTlsConfig,
};
pub use events::{secret_property, EventSinksConfig, OutboxConfig, SinkConfig, SinkFormat, SinkType, Unroutable};
pub use limits::LimitsConfig;
pub use source::is_override;
pub use units::{ByteSize, Dur};

use serde::{Deserialize, Serialize};
use source::de_string;

/// The most worker threads `service.worker_threads` accepts.
const MAX_WORKER_THREADS: usize = 1024;

/// Shortest HS256 secret accepted (RFC 7518 §3.2: a key at least as long as the hash).
pub const MIN_SECRET_BYTES: usize = 32;

/// A rule a setting breaks: the error every section's `validate` answers with.
fn rule(key: impl Into<String>, why: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Rule { key: key.into(), reason: why.into() })
}

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
    /// TLS on the node's own ports: HTTPS/WSS on `port`, gRPC over TLS on `grpc_port`.
    pub tls: TlsConfig,
}

/// `service.tls`: with a certificate and its key, both ports speak TLS only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain (PEM), leaf first.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CAs (PEM) whose client certificates the gRPC port requires (mTLS for gateways).
    /// The HTTP port never asks browsers for one.
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are read again; a changed certificate, key or CA is used for
    /// the next handshakes (rotation without a restart). A pair that does not load is
    /// logged and the previous one kept.
    pub reload_interval: Dur,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { cert_file: None, key_file: None, client_ca_file: None, reload_interval: Dur::secs(10) }
    }
}

impl TlsConfig {
    /// Whether the ports speak TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return rule("service.tls.key_file", "is required with service.tls.cert_file"),
            (None, Some(_)) => return rule("service.tls.cert_file", "is required with service.tls.key_file"),
            _ => {}
        }
        if self.client_ca_file.is_some() && self.cert_file.is_none() {
            return rule("service.tls.client_ca_file", "needs service.tls.cert_file and key_file (mTLS is TLS first)");
        }
        if self.reload_interval.0 < Duration::from_millis(100) {
            return rule("service.tls.reload_interval", "must be at least 100ms");
        }
        Ok(())
    }
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
            tls: TlsConfig::default(),
        }
    }
}

impl ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_threads > MAX_WORKER_THREADS {
            return rule("service.worker_threads", "must be at most 1024 (0: one per CPU core)");
        }
        if self.node_id.is_empty() || crate::core::validate_id("node id", &self.node_id, 128).is_err() {
            return rule("service.node_id", "must be 1-128 characters of letters, digits and . _ @ : + -");
        }
        self.tls.validate()
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
    /// Encrypts what the node writes under `service.data_dir` (`presence.redb`,
    /// `sinks.redb`) with this key: a file of 32 random bytes, or of 64 hex digits
    /// (`openssl rand -hex 32`). A plain database is encrypted at the first start with it.
    pub encryption_key_file: Option<PathBuf>,
    /// ...or the key itself, 64 hex digits (from the environment:
    /// `PRESENCE_STORE__ENCRYPTION_KEY`). Never printed.
    #[serde(deserialize_with = "de_string")]
    pub encryption_key: String,
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
            encryption_key_file: None,
            encryption_key: String::new(),
        }
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.tick.0.is_zero() {
            return rule("store.tick", "must be above 0");
        }
        if self.encryption_key_file.is_some() && !self.encryption_key.is_empty() {
            return rule("store.encryption_key", "give the key in one place: store.encryption_key_file or store.encryption_key");
        }
        Ok(())
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
    /// With no explicit status in force, a user whose every live device has been idle
    /// (its client said so: `activity` on `/ws`, gRPC, the legacy heartbeat) for this
    /// long reads `away`, until a device is active again. `0s`: never.
    pub auto_away_after: Dur,
    /// A large conversation (more than `limits.conversation_live_members` members) tells
    /// its WebSocket subscribers what changed at most this often, in one message.
    pub conversation_interval: Dur,
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
            auto_away_after: Dur::secs(600),
            conversation_interval: Dur::secs(1),
        }
    }
}

impl PresenceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.session_ttl.0 < Duration::from_secs(1) {
            return rule("presence.session_ttl", "must be at least 1s");
        }
        if self.node_lease_ttl.0 < Duration::from_secs(1) {
            return rule("presence.node_lease_ttl", "must be at least 1s");
        }
        if self.heartbeat_interval.0.is_zero() || self.heartbeat_interval.0 >= self.session_ttl.0 {
            return rule("presence.heartbeat_interval", "must be above 0 and below presence.session_ttl");
        }
        if self.conversation_interval.0 < Duration::from_millis(10) {
            return rule("presence.conversation_interval", "must be at least 10ms");
        }
        if self.typing_ttl.0.is_zero() {
            return rule("presence.typing_ttl", "must be above 0");
        }
        Ok(())
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

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let secret = self.jwt_secret.trim();
        if secret.starts_with('<') && secret.ends_with('>') {
            return rule(
                "auth.jwt_secret",
                "is a placeholder that `presenced config` prints (<redacted>, <generated: ...>), not a secret: put the real one, or leave it unset to use the generated one",
            );
        }
        if !self.jwt_secret.is_empty() && secret.len() < MIN_SECRET_BYTES {
            return rule(
                "auth.jwt_secret",
                format!(
                    "must be at least {MIN_SECRET_BYTES} bytes (a short HMAC key can be guessed; `openssl rand -hex 32` makes a good one)"
                ),
            );
        }
        if !self.public_key.is_empty() && self.public_key_file.is_some() {
            return rule("auth.public_key", "set either auth.public_key or auth.public_key_file, not both");
        }
        Ok(())
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
    /// The audit log: one JSON line per change of someone's presence data (who, whose,
    /// what, from where), appended to this file; reopened on SIGHUP. Off by default.
    pub audit_file: Option<PathBuf>,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { level: "info".into(), format: LogFormat::Text, access_log: false, audit_file: None }
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
            s.url = events::redact_url(&s.url);
            sinks.push(&mut s.secret);
            sinks.extend(s.properties.iter_mut().filter(|(k, _)| secret_property(k)).map(|(_, v)| v));
        }
        for s in [
            &mut c.auth.jwt_secret,
            &mut c.store.encryption_key,
            &mut c.nats.password,
            &mut c.nats.token,
            &mut c.nats.nkey_seed,
            &mut c.redis.password,
        ]
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

impl Config {
    /// Loads defaults, then `file` (if any), then overrides from `env`, then validates.
    pub fn load<I, K, V>(file: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let tree = source::tree(file, env.into_iter().map(|(k, v)| (k.into(), v.into())).collect())?;
        let mut config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let (key, reason) = (source::display_path(&e.path().to_string()), e.inner().to_string());
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

    /// Every section's rules, then the rules between sections (none today).
    fn validate(&self) -> Result<(), ConfigError> {
        self.service.validate()?;
        self.presence.validate()?;
        self.events.validate()?;
        self.limits.validate()?;
        self.store.validate()?;
        self.auth.validate()?;
        self.nats.validate()?;
        self.redis.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
