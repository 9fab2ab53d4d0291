//! The hub: this node's WebSocket connections, who watches whom, and delivery.
//!
//! Two indexes, each sharded: `owners` (user → that user's connections, a handful) and
//! `watchers` (watched user → subscribed connections, any number). A presence event for
//! user U reaches, without scanning anything else: U's subscribers, the connections of
//! U's contacts (U's audience), and U's own other devices. Each target gets the
//! projection its relation to U allows (owner / contact / other), encoded once per
//! relation per event, and only if that projection changed: a viewer who may not see U
//! is not told the *moment* U changed either (privacy hides timing, not just content).
//!
//! Every connection ([`Client`]) has a [`super::push_queue::PushQueue`]: bounded, in
//! which presence pushes for the same watched user (and typing pushes for the same
//! conversation and typist) replace each other, so a slow reader holds at most one
//! pending presence per watched user. A connection whose queue still overflows is closed
//! with 1013.
//!
//! A connection starts with `connected` (queued before the connection is indexed, so
//! nothing can come first), then its own presence exactly once: pushes of the user's
//! own presence carry the state's revision, and one not newer than what the connection
//! already got is dropped (the registration's own event and the snapshot are the same
//! state). If the hub falls behind the event bus, every connection gets a fresh snapshot
//! of everything it watches.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::client::Client;
use super::protocol;
use super::push_queue::PushKey;
use super::rooms::{relation_of, Outbox, Room};
use crate::bus::{DirectoryChanged, Typing};
use crate::core::{project, visible_change, DeviceId, Event, Millis, Platform, Presence, Privacy, Relation, UserId};
use crate::directory::Members;
use crate::error::{close, ApiError};
use crate::service::sessions::Leave;
use crate::service::Service;
use crate::shards::{FastMap, Sharded};

/// The connections of this node watching one user. With contacts spread over many
/// nodes, most watched users have one watcher per node: that one is kept inline (a
/// map for each would cost an allocation of ~100 B per watched user); a map beyond.
enum Watchers {
    One(Arc<Client>),
    Many(HashMap<u64, Arc<Client>>),
}

impl Watchers {
    fn insert(&mut self, conn: &Arc<Client>) {
        match self {
            Watchers::One(c) if c.id == conn.id => *c = conn.clone(),
            Watchers::One(c) => {
                let map = HashMap::from([(c.id, c.clone()), (conn.id, conn.clone())]);
                *self = Watchers::Many(map);
            }
            Watchers::Many(m) => {
                m.insert(conn.id, conn.clone());
            }
        }
    }

    /// Removes connection `id`; returns whether none is left.
    fn remove(&mut self, id: u64) -> bool {
        match self {
            Watchers::One(c) => c.id == id,
            Watchers::Many(m) => {
                m.remove(&id);
                match m.len() {
                    0 => true,
                    1 => {
                        if let Some(last) = m.values().next().cloned() {
                            *self = Watchers::One(last);
                        }
                        false
                    }
                    _ => false,
                }
            }
        }
    }

    fn each(&self, mut f: impl FnMut(&Arc<Client>)) {
        match self {
            Watchers::One(c) => f(c),
            Watchers::Many(m) => m.values().for_each(f),
        }
    }
}

/// What the hub enforces.
#[derive(Debug, Clone)]
pub struct HubLimits {
    /// Pushes a connection's queue holds before it is closed (`limits.ws_outbound_queue`).
    pub push_queue: usize,
    /// Users and conversations one connection may subscribe to, together.
    pub subscriptions_per_connection: usize,
    /// Conversations with at most this many members push each member change at once
    /// (`limits.conversation_live_members`); larger ones every `conversation_interval`.
    pub conversation_live_members: usize,
    pub conversation_interval: std::time::Duration,
    /// Members a `conversation_presence` snapshot lists (the rest: the REST pages).
    pub conversation_page: usize,
}

impl HubLimits {
    pub fn of(l: &crate::config::LimitsConfig, p: &crate::config::PresenceConfig) -> HubLimits {
        HubLimits {
            push_queue: l.ws_outbound_queue,
            subscriptions_per_connection: l.max_subscriptions_per_connection,
            conversation_live_members: l.conversation_live_members,
            conversation_interval: p.conversation_interval.0,
            conversation_page: l.conversation_page,
        }
    }
}

/// The conversations this node's connections subscribed to (see [`super::rooms`]).
#[derive(Default)]
struct Rooms {
    by_id: HashMap<Arc<str>, Arc<Room>>,
    /// Member → the small rooms they are in, to apply an event without a scan.
    by_member: FastMap<UserId, RoomList>,
    /// Large rooms (few on a node): an event's user is looked up in each one's members,
    /// so a 100,000-member room costs no index beside its membership.
    large: Vec<Arc<Room>>,
    /// Connection → the conversations it subscribed to.
    by_conn: HashMap<u64, Vec<Arc<str>>>,
}

/// The small rooms a member is in: mostly one, kept inline.
enum RoomList {
    One(Arc<Room>),
    Many(Vec<Arc<Room>>),
}

impl Rooms {
    /// Indexes a new room, small or large (`live`: `limits.conversation_live_members`).
    fn add(&mut self, room: &Arc<Room>, members: &Members, live: usize) {
        if members.len() > live {
            self.large.push(room.clone());
        } else {
            self.index(room, members.iter());
        }
    }

    fn remove(&mut self, room: &Arc<Room>, members: &Members) {
        self.large.retain(|r| !Arc::ptr_eq(r, room));
        self.unindex(room, members.iter());
    }

    /// The room's members changed from `old` to `new`: its index follows (a room that
    /// grows past `live` becomes large, and the other way).
    fn reindex(&mut self, room: &Arc<Room>, old: &Members, new: &Members, added: &[UserId], removed: &[UserId], live: usize) {
        let was_large = self.large.iter().any(|r| Arc::ptr_eq(r, room));
        match (was_large, new.len() > live) {
            (false, false) => {
                self.index(room, added.iter());
                self.unindex(room, removed.iter());
            }
            (false, true) => {
                self.unindex(room, old.iter());
                self.large.push(room.clone());
            }
            (true, false) => {
                self.large.retain(|r| !Arc::ptr_eq(r, room));
                self.index(room, new.iter());
            }
            (true, true) => {}
        }
    }

    fn index<'a>(&mut self, room: &Arc<Room>, members: impl IntoIterator<Item = &'a UserId>) {
        for m in members {
            match self.by_member.get_mut(m) {
                None => {
                    self.by_member.insert(m.clone(), RoomList::One(room.clone()));
                }
                Some(RoomList::One(r)) if Arc::ptr_eq(r, room) => {}
                Some(list @ RoomList::One(_)) => {
                    if let RoomList::One(r) = std::mem::replace(list, RoomList::Many(Vec::new())) {
                        *list = RoomList::Many(vec![r, room.clone()]);
                    }
                }
                Some(RoomList::Many(v)) => {
                    if !v.iter().any(|r| Arc::ptr_eq(r, room)) {
                        v.push(room.clone());
                    }
                }
            }
        }
    }

    fn unindex<'a>(&mut self, room: &Arc<Room>, members: impl IntoIterator<Item = &'a UserId>) {
        for m in members {
            let empty = match self.by_member.get_mut(m) {
                None => false,
                Some(RoomList::One(r)) => Arc::ptr_eq(r, room),
                Some(RoomList::Many(v)) => {
                    v.retain(|r| !Arc::ptr_eq(r, room));
                    if v.len() == 1 {
                        let last = v.pop();
                        if let Some(last) = last {
                            self.by_member.insert(m.clone(), RoomList::One(last));
                        }
                    }
                    false
                }
            };
            if empty {
                self.by_member.remove(m);
            }
        }
    }

    /// The rooms `user` is a member of.
    fn of(&self, user: &UserId) -> Vec<Arc<Room>> {
        let mut out = match self.by_member.get(user) {
            None => Vec::new(),
            Some(RoomList::One(r)) => vec![r.clone()],
            Some(RoomList::Many(v)) => v.clone(),
        };
        out.extend(self.large.iter().filter(|r| r.has_member(user)).cloned());
        out
    }
}

/// Who a delivery goes to.
#[derive(Clone, Copy)]
enum Audience<'a> {
    /// Everyone watching the user: subscribers, contacts' connections, own devices, and
    /// the subscribers of the small rooms given (the user's).
    Watchers(&'a [Arc<Room>]),
    /// The connections of exactly these users.
    Users(&'a [UserId]),
}

/// The hub reads presence, sessions, the directory and the bus through the service
/// (transports → service → store): it holds no rule of its own but who is told what.
pub struct Hub {
    svc: Arc<Service>,
    limits: HubLimits,
    next_id: AtomicU64,
    owners: Sharded<FastMap<UserId, Vec<Arc<Client>>>>,
    watchers: Sharded<FastMap<UserId, Watchers>>,
    connections: AtomicI64,
    subscriptions: AtomicI64,
    /// Connected user → the users whose contacts include them (their changes reach the
    /// user's connections), as added to the bus's interest.
    contact_interest: Mutex<HashMap<UserId, HashSet<UserId>>>,
    rooms: Mutex<Rooms>,
    /// The presence of room members online, one copy per user however many rooms hold it
    /// (see [`Hub::share`]).
    shared: Sharded<FastMap<UserId, Arc<Presence>>>,
    /// The shard of `shared` the next sweep looks at.
    sweep_at: std::sync::atomic::AtomicUsize,
    /// Whether any room exists (an event's hot path skips the rooms' lock otherwise).
    any_room: AtomicBool,
    /// A resynchronisation after bus lag is running / was asked for again meanwhile.
    resyncing: AtomicBool,
    resync_again: AtomicBool,
}

/// Members read from the store at once when a room is loaded.
const LOAD_BATCH: usize = 1000;

/// Queues each message for its connection.
fn send(out: Outbox) {
    if !out.is_empty() {
        metrics::counter!("ws_conversation_pushes_total").increment(out.len() as u64);
    }
    for (c, m) in out {
        c.push(m);
    }
}

/// Least time between two "fell behind the event bus" warnings.
const LAG_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Hub {
    pub fn new(svc: Arc<Service>, limits: HubLimits) -> Hub {
        Hub {
            svc,
            limits,
            next_id: AtomicU64::new(1),
            owners: Sharded::new(64),
            watchers: Sharded::new(64),
            connections: AtomicI64::new(0),
            subscriptions: AtomicI64::new(0),
            contact_interest: Mutex::new(HashMap::new()),
            rooms: Mutex::new(Rooms::default()),
            shared: Sharded::new(64),
            sweep_at: std::sync::atomic::AtomicUsize::new(0),
            any_room: AtomicBool::new(false),
            resyncing: AtomicBool::new(false),
            resync_again: AtomicBool::new(false),
        }
    }

    /// Starts delivering from the bus: presence events, typing indicators (this node's
    /// and other nodes'), and directory changes.
    pub fn start(self: &Arc<Self>) {
        let bus = &self.svc.bus;
        let mut typing = bus.subscribe_typing();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                match typing.recv().await {
                    Ok(t) => match weak.upgrade() {
                        Some(hub) => hub.deliver_typing(&t),
                        None => return,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let weak = Arc::downgrade(self);
        let every = self.limits.conversation_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(hub) = weak.upgrade() else { return };
                hub.flush_rooms();
            }
        });
        let mut directory = bus.subscribe_directory();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let change = match directory.recv().await {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "hub fell behind the directory changes; some pushes were skipped");
                        // Rooms keep membership and privacy: they are set right again.
                        if let Some(hub) = weak.upgrade() {
                            hub.reconcile_rooms().await;
                        }
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(hub) = weak.upgrade() else { return };
                let r = match &change {
                    DirectoryChanged::Privacy { user, previous } => hub.privacy_changed(user, *previous).await,
                    DirectoryChanged::Contacts { user, changed } => hub.contacts_changed(user, changed).await,
                    DirectoryChanged::Members { conversation, .. } => hub.members_changed(conversation).await,
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "could not push a directory change to local watchers");
                }
            }
        });
        let mut rx = bus.subscribe();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            // A burst (a gateway registering a million sessions) can lag many times in a
            // row: one warning per LAG_WARN_EVERY, with what was missed since the last.
            let (mut missed, mut warned): (u64, Option<std::time::Instant>) = (0, None);
            loop {
                match rx.recv().await {
                    Ok(ev) => match weak.upgrade() {
                        Some(hub) => hub.deliver(&ev),
                        None => return,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        metrics::counter!("ws_dropped_total", "reason" => "bus_lag").increment(n);
                        let Some(hub) = weak.upgrade() else { return };
                        missed += n;
                        if hub.connection_count() > 0 && warned.is_none_or(|t| t.elapsed() >= LAG_WARN_EVERY) {
                            tracing::warn!(missed, "hub fell behind the event bus; sending every connection a fresh snapshot");
                            (missed, warned) = (0, Some(std::time::Instant::now()));
                        }
                        hub.resync();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    pub fn connection_count(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn subscription_total(&self) -> i64 {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Registers a connection and its device session (the store enforces the device
    /// limit atomically: [`ApiError::LimitExceeded`] beyond it). `hello` is queued first,
    /// before anything else can be. A previous connection of the same device on this
    /// node is closed with 4001.
    pub async fn connect(
        &self,
        user: UserId,
        device: DeviceId,
        platform: Option<Platform>,
        admin: bool,
        hello: String,
    ) -> Result<Arc<Client>, ApiError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Client::new(id, user.clone(), device.clone(), admin, platform, self.limits.push_queue));
        conn.push(hello);
        let (replaced, first) = {
            let mut shard = self.owners.of(&user).lock();
            let conns = shard.entry(user.clone()).or_default();
            let first = conns.is_empty();
            let old = conns.iter().position(|c| c.device == device).map(|i| conns.swap_remove(i));
            conns.push(conn.clone());
            (old, first)
        };
        let interest = self.svc.bus.interest();
        if first && interest.is_followed() {
            // The user's own changes (other devices) and those of whoever has them as a contact.
            let audience: HashSet<UserId> = self.svc.directory.audience_of(&user).into_iter().collect();
            interest.add(std::iter::once(&user).chain(audience.iter()));
            self.contact_interest.lock().insert(user.clone(), audience);
        }
        if let Some(old) = replaced {
            old.close(close::REPLACED, "replaced by a newer connection of this device");
        } else {
            self.connections.fetch_add(1, Ordering::Relaxed);
        }
        match self.svc.sessions.open(&user, &device, &self.svc.node_id, None, platform).await {
            Ok(reg) => conn.sid.store(reg.sid, Ordering::Release),
            Err(e) => {
                self.detach(&conn);
                return Err(e);
            }
        }
        metrics::gauge!("ws_connections").set(self.connection_count() as f64);
        Ok(conn)
    }

    /// Removes the connection from the indexes; returns whether it still owned its device.
    fn detach(&self, conn: &Arc<Client>) -> bool {
        let mut last = false;
        let owned = {
            let mut shard = self.owners.of(&conn.user).lock();
            let mut owned = false;
            if let Some(conns) = shard.get_mut(&conn.user) {
                if let Some(i) = conns.iter().position(|c| c.id == conn.id) {
                    conns.swap_remove(i);
                    owned = true;
                }
                if conns.is_empty() {
                    shard.remove(&conn.user);
                    last = true;
                }
            }
            owned
        };
        if last && self.svc.bus.interest().is_followed() {
            let audience = self.contact_interest.lock().remove(&conn.user).unwrap_or_default();
            self.svc.bus.interest().remove(std::iter::once(&conn.user).chain(audience.iter()));
        }
        if owned {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
        let subs: Vec<UserId> = conn.subs.lock().drain().collect();
        self.drop_watches(conn.id, subs);
        self.leave_rooms(conn.id, None);
        metrics::gauge!("ws_connections").set(self.connection_count() as f64);
        owned
    }

    /// Removes connection `id` from the watcher index of `users` (which it watched).
    fn drop_watches(&self, id: u64, users: Vec<UserId>) {
        self.subscriptions.fetch_sub(users.len() as i64, Ordering::Relaxed);
        let mut unwatched = Vec::new();
        for u in users {
            let mut shard = self.watchers.of(&u).lock();
            if let Some(w) = shard.get_mut(&u) {
                if w.remove(id) {
                    shard.remove(&u);
                    unwatched.push(u.clone());
                }
            }
        }
        self.svc.bus.interest().remove(&unwatched);
        metrics::gauge!("ws_subscriptions").set(self.subscription_total() as f64);
    }

    /// Unregisters the connection; its device session ends as `leave` says (at once after
    /// a `bye`, else held for the offline grace) unless a newer connection took it (here,
    /// or by registering the device again anywhere since: the session's tag).
    pub async fn disconnect(&self, conn: &Arc<Client>, leave: Leave) {
        if self.detach(conn) {
            let sid = conn.sid.load(Ordering::Acquire);
            if let Err(e) = self.svc.sessions.close(&conn.user, &conn.device, Some(sid), leave).await {
                tracing::warn!(user = %conn.user, error = %e, "could not end the device session; it will expire");
            }
        }
    }

    /// Whether `conn` is still one of this hub's connections.
    fn is_attached(&self, conn: &Arc<Client>) -> bool {
        self.owners.of(&conn.user).lock().get(&conn.user).is_some_and(|cs| cs.iter().any(|c| Arc::ptr_eq(c, conn)))
    }

    /// Keeps the connection's device session alive.
    pub async fn refresh(&self, conn: &Client) -> Result<(), ApiError> {
        // Lapsed (e.g. the store was repaired): registered again rather than drop the user.
        let (_, opened) = self.svc.sessions.heartbeat_or_open(&conn.user, &conn.device, &self.svc.node_id, conn.platform, None).await?;
        if let Some(reg) = opened {
            conn.sid.store(reg.sid, Ordering::Release);
        }
        Ok(())
    }

    /// The connection's user is (not) active on its device: a lapsed session (the store
    /// was repaired) is registered again first, as a heartbeat would.
    pub async fn set_activity(&self, conn: &Client, active: bool, idle_since: Option<Millis>) -> Result<(), ApiError> {
        self.svc.check_write_rate(&conn.user)?;
        let sid = conn.sid.load(Ordering::Acquire);
        let said = (active, idle_since);
        match self.svc.sessions.set_activity(&conn.user, &conn.device, Some(sid), said, false).await {
            Err(ApiError::NotFound(_)) => {
                self.refresh(conn).await?;
                self.svc.sessions.set_activity(&conn.user, &conn.device, Some(conn.sid.load(Ordering::Acquire)), said, false).await
            }
            r => r,
        }
    }

    /// Adds subscriptions (limit per connection) and returns the ids newly watched.
    pub fn subscribe(&self, conn: &Arc<Client>, ids: &[UserId]) -> Result<(), ApiError> {
        let conversations = self.conversation_count(conn.id);
        let added: Vec<UserId> = {
            let mut subs = conn.subs.lock();
            let new: Vec<&UserId> = ids.iter().filter(|id| !subs.contains(*id)).collect();
            if conversations + subs.len() + new.len() > self.limits.subscriptions_per_connection {
                return Err(ApiError::LimitExceeded(format!(
                    "at most {} subscriptions (users and conversations) per connection",
                    self.limits.subscriptions_per_connection
                )));
            }
            new.into_iter().filter(|id| subs.insert((*id).clone())).cloned().collect()
        };
        self.subscriptions.fetch_add(added.len() as i64, Ordering::Relaxed);
        let mut watched = Vec::new();
        for u in added {
            let mut shard = self.watchers.of(&u).lock();
            match shard.get_mut(&u) {
                Some(w) => w.insert(conn),
                None => {
                    shard.insert(u.clone(), Watchers::One(conn.clone()));
                    watched.push(u);
                }
            }
        }
        self.svc.bus.interest().add(&watched);
        metrics::gauge!("ws_subscriptions").set(self.subscription_total() as f64);
        Ok(())
    }

    pub fn unsubscribe(&self, conn: &Arc<Client>, ids: &[UserId]) {
        let removed: Vec<UserId> = {
            let mut subs = conn.subs.lock();
            ids.iter().filter(|id| subs.remove(*id)).cloned().collect()
        };
        self.drop_watches(conn.id, removed);
    }

    /// Sends `conn` the current presence of `ids` as its relation to each allows; the
    /// connection's own presence only if it is newer than what it already got (on connect
    /// and resync; see [`Hub::snapshot_asked`] for a snapshot the client asked for).
    pub async fn snapshot(&self, conn: &Arc<Client>, ids: &[UserId]) -> Result<(), ApiError> {
        self.snapshot_with(conn, ids, true).await
    }

    /// A snapshot the client asked for (`subscribe`): every id, its own included.
    pub async fn snapshot_asked(&self, conn: &Arc<Client>, ids: &[UserId]) -> Result<(), ApiError> {
        self.snapshot_with(conn, ids, false).await
    }

    async fn snapshot_with(&self, conn: &Arc<Client>, ids: &[UserId], only_newer_own: bool) -> Result<(), ApiError> {
        if ids.is_empty() {
            return Ok(());
        }
        // From before the read until every entry is queued, an event pushed for one of
        // these users wins over the snapshot's (older) state of it.
        struct Snapshotting<'a>(&'a Client);
        impl Drop for Snapshotting<'_> {
            fn drop(&mut self) {
                self.0.end_snapshot();
            }
        }
        conn.begin_snapshot();
        let _guard = Snapshotting(conn);
        let found = self.svc.get_many_fresh(ids).await?;
        let now = self.svc.clock.now();
        for (id, p) in ids.iter().zip(found) {
            if *id == conn.user && !conn.admit_own(p.revision) && only_newer_own {
                continue; // the connection already has this state of its own presence
            }
            let (audience, privacy) = self.svc.directory.view(id);
            let seen = project(&p, &privacy, relation_of(conn, id, &audience));
            conn.push_keyed_inner(PushKey::Presence(id.clone()), Utf8Bytes::from(protocol::presence_update(&seen, now)), false);
        }
        Ok(())
    }

    /// Pushes an event's presence to everyone who watches its user (subscribers, the
    /// connections of the user's contacts, the user's own connections) whose view of the
    /// user changed with it.
    pub fn deliver(&self, ev: &Event) {
        if ev.kind == crate::core::EventKind::UserErased {
            // The user's own sockets here end with the account's data.
            let conns = self.owners.of(&ev.presence.user_id).lock().get(&ev.presence.user_id).cloned().unwrap_or_default();
            for c in conns {
                c.close(crate::error::close::ERASED, "this user's data was erased");
            }
        }
        let (audience, privacy) = self.svc.directory.view(&ev.presence.user_id);
        let changed = |rel: Relation| visible_change(&ev.before, &ev.presence, &privacy, rel);
        let include = [true, changed(Relation::Contact), changed(Relation::Other)];
        let rooms = self.rooms_of(&ev.presence.user_id);
        self.deliver_to(&ev.presence, (&audience, &privacy), Audience::Watchers(&rooms), include);
        if rooms.is_empty() {
            return;
        }
        let (live, now) = (self.limits.conversation_live_members, self.svc.clock.now());
        let p = self.share(ev.presence.clone());
        for r in &rooms {
            send(r.apply(&p, &self.svc.directory, live, now));
        }
    }

    /// Queues `p` for the targets `sel` picks, as each one's relation allows, for the
    /// relations `include` lets through (indexed by [`Relation::index`]). `view` is the
    /// user's contacts and privacy ([`crate::directory::Directory::view`]), read once by
    /// the caller.
    fn deliver_to(&self, p: &Presence, view: (&Members, &Privacy), sel: Audience<'_>, include: [bool; 3]) {
        if !include.iter().any(|i| *i) {
            return;
        }
        let start = Instant::now();
        let owner = &p.user_id;
        let (audience, privacy) = view;
        let now = self.svc.clock.now();
        let mut targets: Vec<Arc<Client>> = Vec::new();
        let users: Vec<&UserId> = match sel {
            Audience::Watchers(rooms) => {
                if let Some(w) = self.watchers.of(owner).lock().get(owner) {
                    w.each(|c| targets.push(c.clone()));
                }
                for r in rooms.iter().filter(|r| !r.is_large(self.limits.conversation_live_members)) {
                    let subs = r.subscribers();
                    if !subs.is_empty() {
                        let mut seen: HashSet<u64> = targets.iter().map(|c| c.id).collect();
                        targets.extend(subs.into_iter().filter(|c| seen.insert(c.id)));
                    }
                }
                audience.iter().chain(std::iter::once(owner)).collect()
            }
            Audience::Users(users) => users.iter().collect(),
        };
        for u in users {
            if let Some(conns) = self.owners.of(u).lock().get(u) {
                targets.extend(conns.iter().cloned());
            }
        }
        let mut encoded: [Option<Utf8Bytes>; 3] = [None, None, None];
        let mut sent = 0u64;
        for conn in &targets {
            let rel = relation_of(conn, owner, audience);
            if !include[rel.index()] || (conn.user == *owner && !conn.admit_own(p.revision)) {
                continue;
            }
            let payload = encoded[rel.index()]
                .get_or_insert_with(|| Utf8Bytes::from(protocol::presence_update(&project(p, privacy, rel), now)))
                .clone();
            conn.push_keyed(PushKey::Presence(owner.clone()), payload);
            sent += 1;
        }
        if sent > 0 {
            metrics::histogram!("ws_fanout_seconds").record(start.elapsed().as_secs_f64());
            metrics::counter!("ws_fanout_targets_total").increment(sent);
        }
    }

    async fn current(&self, user: &UserId) -> Result<Presence, ApiError> {
        Ok(self
            .svc
            .get_many(std::slice::from_ref(user))
            .await?
            .pop()
            .unwrap_or_else(|| Presence::unknown(user.clone(), self.svc.node_id.clone())))
    }

    /// After `user`'s privacy settings changed from `previous`: pushes the user's presence
    /// to the watchers whose view of it changed.
    pub async fn privacy_changed(&self, user: &UserId, previous: Privacy) -> Result<(), ApiError> {
        let p = self.current(user).await?;
        let (audience, privacy) = self.svc.directory.view(user);
        let changed = |rel: Relation| !project(&p, &previous, rel).same_view(&project(&p, &privacy, rel));
        let include = [false, changed(Relation::Contact), changed(Relation::Other)];
        let rooms = self.rooms_of(user);
        self.deliver_to(&p, (&audience, &privacy), Audience::Watchers(&rooms), include);
        let (live, now) = (self.limits.conversation_live_members, self.svc.clock.now());
        for r in &rooms {
            send(r.view_changed(user, Some(previous), None, &self.svc.directory, live, now));
        }
        Ok(())
    }

    /// After `user`'s contacts changed: the connections of the users who were added or
    /// dropped get the user's presence as they may now see it, if that differs from what
    /// they saw.
    pub async fn contacts_changed(&self, user: &UserId, changed: &[UserId]) -> Result<(), ApiError> {
        if changed.is_empty() {
            return Ok(());
        }
        // Connected viewers who were added now follow `user`'s changes; dropped ones stop.
        let contacts = self.svc.directory.contacts(user);
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        {
            let mut ci = self.contact_interest.lock();
            for v in changed {
                let Some(set) = ci.get_mut(v) else { continue };
                if contacts.contains(v) {
                    if set.insert(user.clone()) {
                        add.push(user.clone());
                    }
                } else if set.remove(user) {
                    remove.push(user.clone());
                }
            }
        }
        self.svc.bus.interest().add(&add);
        self.svc.bus.interest().remove(&remove);
        let p = self.current(user).await?;
        let (audience, privacy) = self.svc.directory.view(user);
        // Added viewers went from "other" to "contact", dropped ones the other way.
        let differs = !project(&p, &privacy, Relation::Contact).same_view(&project(&p, &privacy, Relation::Other));
        self.deliver_to(&p, (&audience, &privacy), Audience::Users(changed), [false, differs, differs]);
        let rooms = self.rooms_of(user);
        if !rooms.is_empty() {
            // The contacts before: those now, with the changed ones toggled.
            let mut old: HashSet<UserId> = (*contacts).clone();
            for c in changed {
                if !old.remove(c) {
                    old.insert(c.clone());
                }
            }
            let old = Arc::new(old);
            let (live, now) = (self.limits.conversation_live_members, self.svc.clock.now());
            for r in &rooms {
                send(r.view_changed(user, None, Some(old.clone()), &self.svc.directory, live, now));
            }
        }
        Ok(())
    }

    /// After the hub missed events (it fell behind the bus): every connection gets a fresh
    /// snapshot of everything it watches. Runs in the background; a request made while
    /// one runs makes it run once more.
    pub fn resync(self: &Arc<Self>) {
        if self.resyncing.swap(true, Ordering::AcqRel) {
            self.resync_again.store(true, Ordering::Release);
            return;
        }
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                hub.resync_again.store(false, Ordering::Release);
                let mut conns: Vec<Arc<Client>> =
                    hub.owners.iter().flat_map(|s| s.lock().values().flatten().cloned().collect::<Vec<_>>()).collect();
                // A connection whose read failed (the store is not back yet) is read again
                // a while later (1 s, 2 s, …; ten times at most) while it stays.
                let mut attempt = 0u32;
                while !conns.is_empty() && attempt < 10 {
                    let mut failed = Vec::new();
                    for conn in conns {
                        let mut ids = vec![conn.user.clone()];
                        ids.extend(hub.svc.directory.audience_of(&conn.user));
                        ids.extend(conn.subs.lock().iter().cloned());
                        ids.sort();
                        ids.dedup();
                        if let Err(e) = hub.snapshot(&conn, &ids).await {
                            tracing::warn!(error = %e, attempt, "could not resynchronise a connection; retrying");
                            failed.push(conn);
                        }
                    }
                    if failed.is_empty() {
                        break;
                    }
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt.min(10)))).await;
                    failed.retain(|c| hub.is_attached(c));
                    conns = failed;
                }
                let rooms: Vec<Arc<Room>> = hub.rooms.lock().by_id.values().cloned().collect();
                for room in rooms {
                    // Events wait in the room while it is read again: it must be read, so
                    // a store that is not back yet is asked again (a while: 1 s, 2 s, …).
                    let mut attempt = 0u32;
                    loop {
                        let gen = room.begin_load();
                        match hub.load_room(&room, gen).await {
                            Ok(true) => {
                                send(room.snapshot_all(&hub.svc.directory, hub.limits.conversation_page, hub.svc.clock.now()));
                                break;
                            }
                            Ok(false) => break, // a newer read took over

                            Err(e) => {
                                attempt += 1;
                                tracing::warn!(conversation = %room.id, error = %e, attempt, "could not resynchronise a conversation; retrying");
                                tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt.min(10)))).await;
                            }
                        }
                        if room.subscriber_count() == 0 {
                            break;
                        }
                    }
                }
                metrics::counter!("ws_resyncs_total").increment(1);
                if hub.resync_again.load(Ordering::Acquire) {
                    continue;
                }
                hub.resyncing.store(false, Ordering::Release);
                // A request that arrived between the check and the store above found the
                // flag still set and only asked again: take it up unless another task did.
                if hub.resync_again.load(Ordering::Acquire) && !hub.resyncing.swap(true, Ordering::AcqRel) {
                    continue;
                }
                return;
            }
        });
    }

    /// Tells the connections of a conversation's members about a typist (this node's or
    /// another's, from the bus): those whose relation to the typist lets them see the
    /// typist's presence.
    fn deliver_typing(&self, t: &Typing) {
        let Some(members) = self.svc.directory.members(&t.conversation) else { return };
        let (conv, user) = (&t.conversation, &t.user_id);
        let payload = Utf8Bytes::from(protocol::typing_indicator(conv, user.as_str(), t.is_typing));
        let visibility = self.svc.directory.privacy(user).visibility;
        let audience = self.svc.directory.contacts(user);
        for m in members.iter().filter(|m| *m != user) {
            if let Some(conns) = self.owners.of(m).lock().get(m) {
                for c in conns {
                    if visibility.allows(relation_of(c, user, &audience)) {
                        c.push_keyed(PushKey::Typing(conv.clone(), user.clone()), payload.clone());
                    }
                }
            }
        }
    }

    /// Conversations connection `id` subscribed to.
    fn conversation_count(&self, id: u64) -> usize {
        if !self.any_room.load(Ordering::Acquire) {
            return 0;
        }
        self.rooms.lock().by_conn.get(&id).map_or(0, Vec::len)
    }

    /// `p` as rooms hold it: the copy already held if it is the same, so a member online
    /// in many rooms costs one presence, not one per room. An offline member is held by
    /// no room: its copy is let go. (Copies no room holds any more are let go when a room
    /// is dropped or loses members: [`Hub::unshare`].)
    fn share(&self, p: Presence) -> Arc<Presence> {
        let mut shard = self.shared.of(&p.user_id).lock();
        if p.status == crate::core::Status::Offline {
            shard.remove(&p.user_id);
            return Arc::new(p);
        }
        match shard.get(&p.user_id) {
            Some(q) if **q == p => q.clone(),
            // An older read than the copy held (an event was faster): not kept.
            Some(q) if p.revision != 0 && p.revision < q.revision => Arc::new(p),
            _ => {
                let p = Arc::new(p);
                shard.insert(p.user_id.clone(), p.clone());
                p
            }
        }
    }

    /// Lets go of the shared copies no room holds in one shard of [`Hub::shared`] (the
    /// next one at each call): copies a room let go of in a race (closed while it was read,
    /// say) are not kept for good.
    fn sweep_shared(&self) {
        let i = self.sweep_at.fetch_add(1, Ordering::Relaxed) % self.shared.len();
        if let Some(shard) = self.shared.iter().nth(i) {
            shard.lock().retain(|_, p| Arc::strong_count(p) > 1);
        }
    }

    /// Lets go of the shared copies of `users` that no room holds.
    fn unshare<'a>(&self, users: impl IntoIterator<Item = &'a UserId>) {
        for u in users {
            let mut shard = self.shared.of(u).lock();
            if shard.get(u).is_some_and(|p| Arc::strong_count(p) == 1) {
                shard.remove(u);
            }
        }
    }

    /// The rooms `user` is a member of (on this node).
    fn rooms_of(&self, user: &UserId) -> Vec<Arc<Room>> {
        if !self.any_room.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.rooms.lock().of(user)
    }

    /// Checks that `conn` may subscribe to conversations `raw` (a member, or an admin;
    /// `forbidden` otherwise, `not_found` for an admin asking for a conversation with no
    /// members) and within its limit, and records them; returns those new to it, for
    /// [`Hub::join_conversations`] once the request is acknowledged.
    pub fn subscribe_conversations(&self, conn: &Arc<Client>, raw: &[String]) -> Result<Vec<Arc<str>>, ApiError> {
        let mut ids: Vec<Arc<str>> = Vec::new();
        for c in raw {
            self.svc.check_id("conversation id", c)?;
            let members = self.svc.directory.members(c);
            let member = members.as_ref().is_some_and(|m| m.contains(conn.user.as_str()));
            if !member && !conn.admin {
                return Err(ApiError::Forbidden(format!("only members of conversation {c} (or presence:admin) may see its presence")));
            }
            if members.is_none() {
                return Err(ApiError::NotFound(format!("conversation {c} has no members")));
            }
            if !ids.iter().any(|i| **i == **c) {
                ids.push(Arc::from(c.as_str()));
            }
        }
        let users = conn.subscription_count();
        let mut rooms = self.rooms.lock();
        // One copy of each id on the node: the room's, when it has one.
        for c in ids.iter_mut() {
            if let Some((id, _)) = rooms.by_id.get_key_value(c) {
                *c = id.clone();
            }
        }
        let mine = rooms.by_conn.entry(conn.id).or_default();
        ids.retain(|c| !mine.contains(c));
        if users + mine.len() + ids.len() > self.limits.subscriptions_per_connection {
            if mine.is_empty() {
                rooms.by_conn.remove(&conn.id);
            }
            return Err(ApiError::LimitExceeded(format!(
                "at most {} subscriptions (users and conversations) per connection",
                self.limits.subscriptions_per_connection
            )));
        }
        mine.extend(ids.iter().cloned());
        self.any_room.store(true, Ordering::Release);
        Ok(ids)
    }

    /// Joins the rooms [`Hub::subscribe_conversations`] recorded: each one's snapshot is
    /// queued (read from the store for the first subscriber on this node). On an error,
    /// that conversation and those not joined yet are not followed (the client may ask
    /// again).
    pub async fn join_conversations(&self, conn: &Arc<Client>, ids: &[Arc<str>]) -> Result<(), ApiError> {
        for (i, id) in ids.iter().enumerate() {
            if let Err(e) = self.join_one(conn, id).await {
                self.leave_rooms(conn.id, Some(&ids[i..]));
                return Err(e);
            }
        }
        Ok(())
    }

    async fn join_one(&self, conn: &Arc<Client>, id: &Arc<str>) -> Result<(), ApiError> {
        loop {
            let room = {
                let mut rooms = self.rooms.lock();
                if !rooms.by_conn.get(&conn.id).is_some_and(|v| v.contains(id)) {
                    return Ok(()); // unsubscribed (or gone) meanwhile
                }
                match rooms.by_id.get(id) {
                    Some(r) => r.clone(),
                    None => {
                        let members = self.svc.directory.members(id).unwrap_or_default();
                        let room = Arc::new(Room::new(id.clone(), members.clone()));
                        rooms.by_id.insert(id.clone(), room.clone());
                        rooms.add(&room, &members, self.limits.conversation_live_members);
                        self.svc.bus.interest().add(members.iter());
                        metrics::gauge!("ws_conversation_rooms").set(rooms.by_id.len() as f64);
                        room
                    }
                }
            };
            room.loaded.get_or_try_init(|| async { self.load_room(&room, room.generation()).await.map(|_| ()) }).await?;
            // Refused when the user left the conversation meanwhile.
            let snapshot = room.subscribe(conn, &self.svc.directory, self.limits.conversation_page, self.svc.clock.now())?;
            // Still this conversation's room, and still asked for? (The last holder of a
            // room may have left while this connection waited for it to load.)
            let current = {
                let mut rooms = self.rooms.lock();
                let wanted = rooms.by_conn.get(&conn.id).is_some_and(|v| v.contains(id));
                let live = rooms.by_id.get(id).is_some_and(|r| Arc::ptr_eq(r, &room));
                if !wanted || !live {
                    // Not kept in a room nobody asked for, nor in an orphaned one.
                    let left = room.unsubscribe(conn.id);
                    if live && left == 0 {
                        self.drop_room(&mut rooms, &room);
                    }
                }
                match (wanted, live) {
                    (false, _) => return Ok(()),
                    (true, live) => live,
                }
            };
            if current {
                conn.push(snapshot);
                return Ok(());
            }
        }
    }

    /// Reads the presence of a room's members from the store (in batches), as read `gen`
    /// (a newer read started meanwhile wins: see [`Room::load`]).
    async fn load_room(&self, room: &Room, gen: u64) -> Result<bool, ApiError> {
        let ids: Vec<UserId> = room.members().iter().cloned().collect();
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(LOAD_BATCH) {
            if room.is_closed() {
                break; // dropped meanwhile: the read will not apply
            }
            found.extend(self.svc.get_many_fresh(chunk).await?.into_iter().map(|p| self.share(p)));
        }
        let applied = room.load(found, &self.svc.directory, gen);
        if !applied {
            self.unshare(&ids);
        }
        Ok(applied)
    }

    pub fn unsubscribe_conversations<S: AsRef<str>>(&self, conn: &Arc<Client>, raw: &[S]) {
        if raw.is_empty() {
            return;
        }
        let ids: Vec<Arc<str>> = raw.iter().map(|c| Arc::from(c.as_ref())).collect();
        self.leave_rooms(conn.id, Some(&ids));
    }

    /// Connection `conn` leaves the rooms `ids` (`None`: all of its rooms); a room with no
    /// subscriber left is dropped, and with it the interest in its members.
    fn leave_rooms(&self, conn: u64, ids: Option<&[Arc<str>]>) {
        if !self.any_room.load(Ordering::Acquire) {
            return;
        }
        let mut rooms = self.rooms.lock();
        let gone: Vec<Arc<str>> = match ids {
            None => rooms.by_conn.remove(&conn).unwrap_or_default(),
            Some(ids) => {
                let Some(mine) = rooms.by_conn.get_mut(&conn) else { return };
                let gone = mine.iter().filter(|c| ids.contains(c)).cloned().collect();
                mine.retain(|c| !ids.contains(c));
                if mine.is_empty() {
                    rooms.by_conn.remove(&conn);
                }
                gone
            }
        };
        for c in gone {
            let Some(room) = rooms.by_id.get(&c).cloned() else { continue };
            if room.unsubscribe(conn) == 0 {
                self.drop_room(&mut rooms, &room);
            }
        }
        metrics::gauge!("ws_conversation_rooms").set(rooms.by_id.len() as f64);
        let any = !rooms.by_id.is_empty() || !rooms.by_conn.is_empty();
        self.any_room.store(any, Ordering::Release);
    }

    /// Forgets a room nobody here subscribes to any more, and the interest in its members.
    fn drop_room(&self, rooms: &mut Rooms, room: &Arc<Room>) {
        rooms.by_id.remove(&room.id);
        let members = room.members();
        rooms.remove(room, &members);
        self.svc.bus.interest().remove(members.iter());
        room.close();
        self.unshare(members.iter());
    }

    /// A conversation's members changed (here or on another node): its room here, if
    /// any, follows the directory (what changed is worked out against the room's own
    /// members, so a change seen twice, or missed, comes out right); subscribers who are
    /// no longer members are told and dropped.
    pub async fn members_changed(&self, conversation: &Arc<str>) -> Result<(), ApiError> {
        let live = self.limits.conversation_live_members;
        let (room, dropped, added) = {
            let mut rooms = self.rooms.lock();
            let Some(room) = rooms.by_id.get(conversation).cloned() else { return Ok(()) };
            let members = self.svc.directory.members(conversation).unwrap_or_default();
            let old = room.members();
            let added: Vec<UserId> = members.iter().filter(|u| !old.contains(*u)).cloned().collect();
            let removed: Vec<UserId> = old.iter().filter(|u| !members.contains(*u)).cloned().collect();
            if added.is_empty() && removed.is_empty() {
                return Ok(());
            }
            rooms.reindex(&room, &old, &members, &added, &removed, live);
            self.svc.bus.interest().add(&added);
            self.svc.bus.interest().remove(&removed);
            let dropped = room.set_members(members, &removed, !added.is_empty());
            self.unshare(&removed);
            for c in &dropped {
                if let Some(mine) = rooms.by_conn.get_mut(&c.id) {
                    mine.retain(|x| x != conversation);
                }
            }
            if room.subscriber_count() == 0 && room.loaded.initialized() {
                self.drop_room(&mut rooms, &room);
            }
            (room, dropped, added)
        };
        for c in &dropped {
            c.push(protocol::removed_from(conversation));
        }
        let mut found = Vec::new();
        if !added.is_empty() && room.subscriber_count() > 0 {
            let mut attempt = 0;
            loop {
                match self.svc.get_many_fresh(&added).await {
                    Ok(f) => {
                        found = f.into_iter().map(|p| self.share(p)).collect();
                        break;
                    }
                    Err(e) if attempt < 3 => {
                        attempt += 1;
                        tracing::warn!(conversation = %conversation, error = %e, "could not read the members added; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        // They count as offline until their next change.
                        tracing::warn!(conversation = %conversation, error = %e, "could not read the members added");
                        break;
                    }
                }
            }
        }
        let page = self.limits.conversation_page;
        send(room.add_members(found, !added.is_empty(), &self.svc.directory, live, page, self.svc.clock.now()));
        // Those the room did not keep (it closed meanwhile, or they went offline).
        self.unshare(&added);
        Ok(())
    }

    /// After the hub missed directory changes: every room follows the directory again and
    /// is read again (members sorted by their privacy now).
    async fn reconcile_rooms(self: &Arc<Self>) {
        let ids: Vec<Arc<str>> = self.rooms.lock().by_id.keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.members_changed(&id).await {
                tracing::warn!(conversation = %id, error = %e, "could not follow a conversation's members");
            }
        }
        self.resync();
    }

    /// Large rooms: what changed since the last tick (see [`Room::flush`]).
    fn flush_rooms(&self) {
        self.sweep_shared();
        if !self.any_room.load(Ordering::Acquire) {
            return;
        }
        let rooms: Vec<Arc<Room>> = self.rooms.lock().by_id.values().cloned().collect();
        let now = self.svc.clock.now();
        for r in rooms.iter().filter(|r| r.is_large(self.limits.conversation_live_members)) {
            send(r.flush(&self.svc.directory, self.limits.conversation_page, now));
        }
    }

    /// The service's clock.
    pub fn now(&self) -> crate::core::Millis {
        self.svc.clock.now()
    }

    /// Asks every connection to close with 1012 (the node drains: SIGTERM). Each device's
    /// session is held for the offline grace, so a client that reconnects to another node
    /// at once continues it and nobody sees it flap.
    pub fn close_all(&self) {
        for shard in self.owners.iter() {
            for conns in shard.lock().values() {
                for c in conns {
                    c.close(close::SERVICE_RESTART, "node draining: reconnect now, to any node; the session continues");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: u64) -> Client {
        Client::new(id, UserId::parse("v", 8).unwrap(), Arc::from("d"), false, None, 1)
    }

    /// A member online in two rooms of the node is held once, by both (and again after
    /// a change); the copy is let go when no room holds it.
    #[tokio::test]
    async fn rooms_share_one_copy_of_a_members_presence() {
        use crate::auth::{Identity, ADMIN_SCOPE};
        use crate::store::memory::{MemoryConfig, MemoryStore};
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![
            ("PRESENCE_AUTH__JWT_SECRET".to_string(), "x".repeat(32)),
            ("PRESENCE_SERVICE__DATA_DIR".to_string(), dir.path().display().to_string()),
        ];
        let config = crate::config::Config::load(None, vars).unwrap();
        let bus = crate::bus::EventBus::new(1024);
        let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
        let store = MemoryStore::open(MemoryConfig::new("n1"), clock.clone(), bus.clone()).unwrap();
        store.start();
        let app = crate::server::App::with_store(config, Arc::new(store), bus, clock).await.unwrap();
        let (svc, hub) = (app.svc.clone(), app.hub.clone());
        let admin = Identity { scopes: vec![ADMIN_SCOPE.to_string()], ..Identity::user("backend") };
        for (c, members) in [("c1", ["a", "m"]), ("c2", ["b", "m"])] {
            svc.set_members(&admin, c, &members.map(String::from)).await.unwrap();
        }
        let id = |u: &str| UserId::parse(u, 64).unwrap();
        let m = hub.connect(id("m"), Arc::from("d"), None, false, String::new()).await.unwrap();
        let mut viewers = Vec::new();
        for (u, c) in [("a", "c1"), ("b", "c2")] {
            let conn = hub.connect(id(u), Arc::from("d"), None, false, String::new()).await.unwrap();
            let ids = hub.subscribe_conversations(&conn, &[c.to_string()]).unwrap();
            hub.join_conversations(&conn, &ids).await.unwrap();
            viewers.push(conn);
        }
        let rooms = |u: &str| hub.rooms_of(&id(u));
        let held = |u: &str| -> Vec<Arc<Presence>> { rooms(u).iter().filter_map(|r| r.held(&id(u))).collect() };
        let both = held("m");
        assert_eq!(both.len(), 2, "m is online in both rooms");
        assert!(Arc::ptr_eq(&both[0], &both[1]), "one copy, read by each room on its own");
        // A change reaches both rooms as the same copy.
        let before = both[0].revision;
        drop(both);
        let who = Identity::user("m");
        let write = crate::service::StatusWrite { status: Some("busy".into()), message: None, ttl_seconds: Some(0) };
        svc.set_status(&who, &id("m"), write).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let both = loop {
            let both = held("m");
            if both.len() == 2 && both.iter().all(|p| p.revision > before) {
                break both;
            }
            assert!(std::time::Instant::now() < deadline, "the change did not reach both rooms");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert!(Arc::ptr_eq(&both[0], &both[1]));
        drop(both);
        assert!(hub.shared.of(&id("m")).lock().contains_key(&id("m")));
        // The rooms go: nothing is kept of m.
        for v in &viewers {
            hub.leave_rooms(v.id, None);
        }
        assert!(rooms("m").is_empty());
        assert!(!hub.shared.of(&id("m")).lock().contains_key(&id("m")), "no room holds m: its copy is let go");
        drop(m);
    }

    #[test]
    fn watchers_keep_one_inline_and_a_map_beyond() {
        let (a, b, c) = (Arc::new(client(1)), Arc::new(client(2)), Arc::new(client(3)));
        let ids = |w: &Watchers| {
            let mut v = Vec::new();
            w.each(|c| v.push(c.id));
            v.sort();
            v
        };
        let mut w = Watchers::One(a.clone());
        w.insert(&a);
        assert!(matches!(w, Watchers::One(_)), "the same connection again stays one");
        w.insert(&b);
        w.insert(&c);
        assert_eq!(ids(&w), [1, 2, 3]);
        assert!(!w.remove(2));
        assert!(!w.remove(9), "an unknown connection changes nothing");
        assert_eq!(ids(&w), [1, 3]);
        assert!(!w.remove(1));
        assert!(matches!(w, Watchers::One(_)), "back to inline at one");
        assert!(!w.remove(1), "only the one left counts");
        assert!(w.remove(3), "the last one leaves it empty");
    }
}
