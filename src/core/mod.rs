//! The domain core: presence model, aggregation, session liveness, events and rate
//! buckets. No I/O, no clocks, no tasks: every rule takes `now` and is unit-tested alone.

pub mod event;
pub mod model;
pub mod privacy;
pub mod ratelimit;
pub mod state;

pub use event::{Event, EventKind};
pub use model::{empty_message, validate_id, DeviceId, IdError, Millis, Presence, Session, Status, UserId};
pub use privacy::{project, Privacy, Relation, Visibility};
pub use state::{Change, Explicit, Registered, UserState, HELD};
