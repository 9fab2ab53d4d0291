//! presenced: a real-time presence service.
//!
//! # Layout
//! Floors, from the ground up, as the imports make them: a module imports only from the
//! floors below it, and no two modules import each other.
//!
//! 1. The domain, no I/O: [`core`] (statuses, users, device sessions and their activity,
//!    the aggregation rule (automatic away included) and every transition, privacy
//!    projection, events, the timer wheel, token buckets; every rule takes `now` and is
//!    unit-tested). [`shards`]: the sharded map.
//! 2. What everything above shares: [`clock`] (the time source and the periodic task
//!    every sweeper runs on), [`bus`] (the in-process bus: events, typing, directory
//!    changes, interest), [`config`] (YAML + environment, each section with its rules),
//!    [`wire`] (how presence leaves the process: JSON for HTTP and WebSocket, the event
//!    schema of backends and sinks, the protobuf messages), [`at_rest`] (encryption of
//!    what the node writes to disk: sealed values, blinded keys, rewriting a database).
//! 3. State: [`store`]: the [`store::PresenceStore`] and [`store::DirectoryStore`] traits
//!    and their backends, [`store::memory`] (the embedded default: sharded state, timer
//!    wheel, redb persistence) and [`store::cluster`] (cluster mode, written once over a
//!    [`store::cluster::Backplane`], in rooms: users, sessions, degraded, directory,
//!    lease, relay), whose backplanes are [`store::nats`] (NATS JetStream: connection, KV
//!    buckets, the embedded nats-server) and [`store::redis`] (a single Redis, a Redis
//!    Cluster, Sentinel). Beside it, [`auth`] (JWT) and the outbound adapter, [`sinks`]
//!    (every transition of this node to webhooks, Kafka, RabbitMQ, through an on-disk
//!    outbox): it reads the bus and encodes with `wire`, nothing above.
//! 4. [`error`]: every failure a client can see and the one table of how each transport
//!    says it; [`directory`]: contacts, privacy settings and conversation members in
//!    memory; [`telemetry`]: logs and metrics; [`audit`]: the audit log (one JSON line
//!    per change of someone's data, written off the request path).
//! 5. [`service`]: the application layer every transport shares: validation,
//!    permissions, rate limits, reads and writes, [`service::sessions`] (device sessions),
//!    [`service::instances`] (gateway instance leases), [`service::typing`] (typing
//!    indicators), [`service::erasure`] (a user's data exported or erased everywhere),
//!    [`service::conversations`] (a conversation's counts and pages of members, as each
//!    viewer may see them), [`service::limiter`].
//! 6. Adapters over the service: [`ws`] (`GET /ws`: the hub, each connection's client
//!    and push queue, the conversations followed on this node (`ws::rooms`), the
//!    upgrade and the socket under it (`ws::upgrade`: long messages in small frames),
//!    the connection loop, the protocol) and [`listener`] (accepting
//!    connections: timeouts, the per-IP rate, the HTTP accept loop, and
//!    [`listener::tls`]: TLS on both ports, certificate reload, mTLS for gRPC).
//! 7. The transports the listener serves: [`grpc`] (`realchat.presence.v1.PresenceApi`)
//!    and [`http`] (REST API v2, contacts, privacy, conversations, legacy endpoints,
//!    health, metrics, the live page, the OpenAPI document, which documents `/ws` too).
//! 8. [`server`]: wiring and graceful shutdown; `main.rs` on top.
//!
//! One update, walked: a `set_status` frame on `/ws` is read by `ws::conn`, which calls
//! `Service::set_status` (validation, permission, rate limit), which calls
//! `PresenceStore::set_status`; the store applies the pure transition of `core::state`
//! under its shard's lock (memory) or in a compare-and-swap loop (cluster), and publishes
//! the event it returns on the `bus`. The hub (`ws::hub`) reads the bus, projects the
//! presence once per relation (owner, contact, other) for the watchers whose view
//! changed, and queues it in each one's `PushQueue`; each connection's task writes it. The
//! gRPC watchers and the sinks read the same bus.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::todo, clippy::unimplemented))]

pub mod at_rest;
pub mod audit;
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
