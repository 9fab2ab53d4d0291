//! One WebSocket connection as the hub sees it: who it is, what it watches, and its
//! [`PushQueue`], with the wake-up of the task that writes it (`ws/conn.rs`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::push_queue::{CloseRequest, PushKey, PushQueue};
use crate::core::{DeviceId, Platform, UserId};

pub struct Client {
    pub id: u64,
    pub user: UserId,
    pub device: DeviceId,
    /// A backend connection (`presence:admin`): sees everyone as their owner would.
    pub admin: bool,
    pub platform: Option<Platform>,
    /// Tag of this connection's session registration (see [`crate::core::Session::sid`]).
    pub(super) sid: AtomicU64,
    /// Revision of the newest own presence queued: an older or equal one is not news.
    own_rev: AtomicU64,
    queue: Mutex<PushQueue>,
    wake: Notify,
    /// The users it subscribed to.
    pub(super) subs: Mutex<HashSet<UserId>>,
    /// The queue's bound (`limits.ws_outbound_queue`).
    limit: usize,
}

impl Client {
    pub(super) fn new(id: u64, user: UserId, device: DeviceId, admin: bool, platform: Option<Platform>, limit: usize) -> Client {
        Client {
            id,
            user,
            device,
            admin,
            platform,
            sid: AtomicU64::new(0),
            own_rev: AtomicU64::new(0),
            queue: Mutex::new(PushQueue::default()),
            wake: Notify::new(),
            subs: Mutex::new(HashSet::new()),
            limit: limit.max(1),
        }
    }

    /// Queues a coalescable push: a pending push with the same key is replaced.
    pub(super) fn push_keyed(&self, key: PushKey, payload: Utf8Bytes) {
        self.push_keyed_inner(key, payload, true)
    }

    /// `checked: false` for snapshots the client asked for: bounded by its subscription
    /// limit, they are not backlog and do not count against the queue's bound.
    pub(super) fn push_keyed_inner(&self, key: PushKey, payload: Utf8Bytes, checked: bool) {
        let news = self.queue.lock().push_keyed(key, payload, checked, self.limit);
        if news {
            self.wake.notify_one();
        }
    }

    /// A snapshot of this connection is about to be read: events pushed from now until
    /// [`Client::end_snapshot`] win over it.
    pub(super) fn begin_snapshot(&self) {
        self.queue.lock().begin_snapshot();
    }

    pub(super) fn end_snapshot(&self) {
        self.queue.lock().end_snapshot();
    }

    /// Queues a message that is delivered as is, in order (acks, errors).
    pub fn push(&self, payload: impl Into<Utf8Bytes>) {
        let news = self.queue.lock().push(payload.into(), self.limit);
        if news {
            self.wake.notify_one();
        }
    }

    /// Asks the connection's task to close with `code`.
    pub fn close(&self, code: u16, reason: &'static str) {
        self.queue.lock().close(code, reason);
        self.wake.notify_one();
    }

    /// Moves everything pending into `out`; returns the close request, if any.
    pub fn drain(&self, out: &mut Vec<Utf8Bytes>) -> Option<CloseRequest> {
        self.queue.lock().drain(out)
    }

    /// Whether a push of the connection's own presence at `revision` is news (newer than
    /// any queued before); records it. Revision `0` (unknown) always is.
    pub(super) fn admit_own(&self, revision: u64) -> bool {
        revision == 0 || self.own_rev.fetch_max(revision, Ordering::AcqRel) < revision
    }

    /// Resolves when something was queued (or a close was requested) since the last drain.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    pub fn subscription_count(&self) -> usize {
        self.subs.lock().len()
    }
}
