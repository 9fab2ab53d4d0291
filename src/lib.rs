//! presenced: a real-time presence service.
//!
//! # Layout
//! - [`core`]: the domain, with no I/O: statuses, users, device sessions, the aggregation
//!   rule, TTL expiry, events, token buckets. Every rule takes `now` and is unit-tested.
//! - [`store`]: the [`store::Store`] trait and its backends: [`store::memory`] (the embedded
//!   default: sharded state, timer wheel, redb persistence). Cluster backends implement the
//!   same trait over the same core transitions.
//! - [`bus`]: the in-process event bus every transport and backend subscribes to.
//! - [`service`]: the application layer shared by all transports: validation, permissions,
//!   rate limits, and the one error type with its wire mapping.
//! - [`directory`]: contacts (who shares presence with whom), privacy settings and
//!   conversation members, in memory for the fan-out path and persisted by the store.
//! - [`http`]: the REST API v2, contacts/privacy/conversations, the seed 004 legacy
//!   endpoints, health, metrics and the live page (thin adapters over [`service`]).
//! - [`ws`]: `GET /ws`, the hub (indexes, coalescing outboxes, typing) and the protocol.
//! - [`grpc`]: `realchat.presence.v1.PresenceApi` (seed 001), health and reflection.
//! - [`natsio`]: cluster mode's NATS connection and JetStream KV (bucket set-up, key
//!   encoding, compare-and-swap updates).
//! - [`listener`]: accepting connections: header-read and idle timeouts, the per-IP
//!   connection rate on the gRPC port, the HTTP accept loop.
//! - [`auth`]: JWT verification and minting. [`config`]: YAML + env configuration.
//!   [`telemetry`]: logs and metrics. [`server`]: wiring and graceful shutdown.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::todo, clippy::unimplemented))]

pub mod auth;
pub mod bus;
pub mod config;
pub mod core;
pub mod directory;
pub mod error;
pub mod grpc;
pub mod http;
pub mod json;
pub mod listener;
pub mod natsio;
pub mod server;
pub mod service;
pub mod shards;
pub mod store;
pub mod telemetry;
pub mod ws;
