//! presenced: a real-time presence service.
//!
//! # Layout
//! Floors, from the bottom; a module depends only on the floors below it. A presence
//! update from `/ws` goes down once (ws → service → store → core) and comes back up once
//! (the store publishes the event on the bus; the hub delivers it).
//!
//! 1. The domain, no I/O: [`core`] (statuses, users, device sessions, the aggregation rule
//!    and every transition, privacy projection, events, the timer wheel, token buckets;
//!    every rule takes `now` and is unit-tested). [`error`]: every failure a client can
//!    see and the one table of how each transport says it. [`shards`]: the sharded map.
//! 2. State: [`store`]: the [`store::PresenceStore`] and [`store::DirectoryStore`] traits
//!    and their backends, [`store::memory`] (the embedded default: sharded state, timer
//!    wheel, redb persistence) and [`store::cluster`] (cluster mode, written once over a
//!    [`store::cluster::Backplane`], in rooms: users, sessions, degraded, directory,
//!    lease, relay), whose backplanes are [`store::nats`] (NATS JetStream) and
//!    [`store::redis`] (a single Redis, a Redis Cluster, Sentinel). [`natsio`]: the NATS
//!    connection, JetStream KV plumbing and the embedded nats-server. [`bus`]: the
//!    in-process bus (events, typing, directory changes, interest). [`directory`]:
//!    contacts, privacy settings and conversation members in memory.
//! 3. [`service`]: the application layer every transport shares: validation,
//!    permissions, rate limits, reads and writes, [`service::sessions`] (device sessions),
//!    [`service::instances`] (gateway instance leases), [`service::typing`] (typing
//!    indicators), [`service::limiter`].
//! 4. Transports, thin adapters over the service: [`http`] (REST API v2, contacts,
//!    privacy, conversations, legacy endpoints, health, metrics, the live page), [`json`]
//!    (the presence as JSON, shared by HTTP and WebSocket), [`ws`] (`GET /ws`: the hub,
//!    the connection loop, the protocol), [`grpc`] (`realchat.presence.v1.PresenceApi`),
//!    [`listener`] (accepting connections: timeouts, the per-IP rate, the HTTP accept
//!    loop), and the outbound one, [`sinks`] (every transition of this node to webhooks,
//!    Kafka, RabbitMQ, through an on-disk outbox).
//! 5. [`server`]: wiring and graceful shutdown. Beside it: [`auth`] (JWT), [`config`]
//!    (YAML + environment), [`telemetry`] (logs and metrics).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::todo, clippy::unimplemented))]

pub mod auth;
pub mod bus;
pub mod clock;
pub mod config;
pub mod core;
pub mod directory;
pub mod error;
pub mod grpc;
pub mod http;
pub mod listener;
pub mod server;
pub mod service;
pub mod shards;
pub mod sinks;
pub mod store;
pub mod telemetry;
pub mod wire;
pub mod ws;
