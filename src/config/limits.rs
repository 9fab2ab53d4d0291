//! The `limits` section: every bound a client can reach, with its rules.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{rule, ByteSize, ConfigError, Dur};

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
    /// Conversations with at most this many members push each member change to their
    /// WebSocket subscribers at once; larger ones send the changes together, at most once
    /// per `presence.conversation_interval`.
    pub conversation_live_members: usize,
    /// Members a WebSocket `conversation_presence` snapshot lists (the rest: REST pages);
    /// a large conversation with more changes than this in one interval sends a fresh
    /// snapshot instead of the changes, so no message outgrows it.
    pub conversation_page: usize,
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
            conversation_live_members: 1000,
            conversation_page: 100,
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

impl LimitsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1000).contains(&self.conversation_page) {
            return rule("limits.conversation_page", "must be between 1 and 1000");
        }
        if self.max_sessions_per_call == 0 {
            return rule("limits.max_sessions_per_call", "must be at least 1");
        }
        if self.max_batch_ids == 0 {
            return rule("limits.max_batch_ids", "must be at least 1");
        }
        if self.max_user_id_len == 0 {
            return rule("limits.max_user_id_len", "must be at least 1");
        }
        if !(self.write_rate_per_sec.is_finite() && self.write_rate_per_sec > 0.0) {
            return rule("limits.write_rate_per_sec", "must be a number above 0");
        }
        if self.write_burst == 0 {
            return rule("limits.write_burst", "must be at least 1");
        }
        if self.max_body_bytes.0 < 64 {
            return rule("limits.max_body_bytes", "must be at least 64 bytes");
        }
        if !(self.ws_messages_per_sec.is_finite() && self.ws_messages_per_sec > 0.0) || self.ws_message_burst == 0 {
            return rule("limits.ws_messages_per_sec", "ws_messages_per_sec must be above 0 and ws_message_burst at least 1");
        }
        if self.ws_read_buffer_bytes.0 < 256 {
            return rule("limits.ws_read_buffer_bytes", "must be at least 256 bytes");
        }
        if self.ws_max_message_bytes.0 < 128 {
            return rule("limits.ws_max_message_bytes", "must be at least 128 bytes");
        }
        if self.max_devices_per_user == 0 || self.ws_outbound_queue == 0 || self.max_subscriptions_per_connection == 0 {
            return rule("limits", "max_devices_per_user, ws_outbound_queue and max_subscriptions_per_connection must be at least 1");
        }
        if self.request_timeout.0.is_zero() {
            return rule("limits.request_timeout", "must be above 0");
        }
        if !(self.connections_per_ip_per_sec.is_finite() && self.connections_per_ip_per_sec >= 0.0) {
            return rule("limits.connections_per_ip_per_sec", "must be 0 (off) or a number above 0");
        }
        if self.header_read_timeout.0 < Duration::from_millis(100) || self.idle_timeout.0 < Duration::from_millis(100) {
            return rule("limits.header_read_timeout", "header_read_timeout and idle_timeout must be at least 100ms");
        }
        if self.grpc_max_concurrent_streams == 0
            || self.grpc_max_watch_streams == 0
            || self.grpc_max_watched_ids == 0
            || self.grpc_watch_buffer == 0
        {
            return rule(
                "limits.grpc_max_watch_streams",
                "grpc_max_concurrent_streams, grpc_max_watch_streams, grpc_max_watched_ids and grpc_watch_buffer must be at least 1",
            );
        }
        Ok(())
    }
}
