//! The domain core: presence model, aggregation, session liveness, events and rate
//! buckets. No I/O, no clocks, no tasks: every rule takes `now` and is unit-tested alone.

pub mod event;
pub mod model;
pub mod ratelimit;
pub mod state;

pub use event::{Event, EventKind};
pub use model::{validate_id, DeviceId, IdError, Millis, Presence, Session, Status, UserId};
pub use state::{Change, Explicit, Registered, UserState};
