//! The domain core: presence model, aggregation, session liveness, events and rate
//! buckets. No I/O, no clocks, no tasks: every rule takes `now` and is unit-tested alone.

pub mod event;
pub mod model;
pub mod privacy;
pub mod ratelimit;
pub mod session;
pub mod state;
pub mod wheel;

pub use event::{Event, EventKind};
pub use model::{
    empty_message, no_devices, validate_id, DeviceId, DeviceSummary, IdError, Millis, Platform, Presence, Session, Status, UserId,
};
pub use privacy::{project, visible_change, Privacy, Relation, Visibility};
pub use session::{Activity, DeviceLimit, Ending, NewSession, Registered};
pub use state::{Change, Explicit, UserState, HELD};
pub use wheel::TimerWheel;
