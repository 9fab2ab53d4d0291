//! How presence leaves the process, in one room: [`json`] (the presence as HTTP and
//! WebSocket clients read it), [`event`] (the JSON schema of the events that backends carry
//! and sinks deliver), and [`proto`] (the protobuf messages of the gRPC API and of
//! protobuf sinks). Each depends on the domain only, so every transport, backend and sink
//! encodes the same way.

pub mod event;
pub mod json;
pub mod proto;
