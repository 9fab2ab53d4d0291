//! Conversation presence, live (issue 27): the conversations this node's connections
//! subscribed to, each a [`Room`] kept once per node however many of them watch it.
//!
//! A room holds the members who are online for themselves (`present`, in id order, with
//! their last presence) and splits them once: those a non-contact sees online (counted in
//! `public_online`) and the rest (`shy`: contacts-only, invisible, appearing offline). A
//! viewer's count is `public_online` plus the shy members its relation lets it see
//! online: the same rule as [`crate::core::project`], so the counts agree with the pages
//! (the REST page, the snapshot) for every viewer, and a hidden member is never counted.
//!
//! Small rooms (at most `limits.conversation_live_members` members) push each member
//! change at once as a `presence_update` (the hub adds their subscribers to the event's
//! audience) and the viewer's counts when they moved. Large rooms collect the changes and
//! [`Room::flush`] sends, at most once per `presence.conversation_interval`, one
//! `conversation_presence` with the counts and the members whose view changed: encoded
//! once for every viewer with no special relation to a changed or shy member, and per
//! viewer only for the few who have one (themself, their contacts, admins).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::client::Client;
use super::protocol;
use crate::core::{project, Millis, Presence, Privacy, Relation, Status, UserId, Visibility};
use crate::directory::{Directory, Members};
use crate::error::ApiError;

/// Whether `rel` sees `p` with any status but offline (as [`project`] would show it).
pub fn online_for(p: &Presence, privacy: &Privacy, rel: Relation) -> bool {
    p.status != Status::Offline && (rel == Relation::Owner || (privacy.visibility.allows(rel) && !p.appear_offline))
}

/// Whether a contact may see more of a user than a non-contact does.
fn contacts_see_more(privacy: &Privacy) -> bool {
    privacy.visibility == Visibility::Contacts || (privacy.visibility == Visibility::Everyone && privacy.last_seen == Visibility::Contacts)
}

/// How `viewer` relates to `member` (whose contacts are `contacts`): the one rule every
/// WebSocket push and conversation count uses.
pub fn relation_of(viewer: &Client, member: &UserId, contacts: &HashSet<UserId>) -> Relation {
    if viewer.admin || viewer.user == *member {
        Relation::Owner
    } else if contacts.contains(&viewer.user) {
        Relation::Contact
    } else {
        Relation::Other
    }
}

/// One subscriber of a room and what it was last told.
struct Sub {
    conn: Arc<Client>,
    online: usize,
    members: usize,
}

/// A room's subscribers: a vector while they are few (most rooms), a map beyond
/// [`SUBS_INLINE`] (a large room's viewers come and go in any order).
enum Subs {
    Few(Vec<Sub>),
    Many(HashMap<u64, Sub>),
}

/// Subscribers a room keeps in a vector.
const SUBS_INLINE: usize = 32;

impl Default for Subs {
    fn default() -> Subs {
        Subs::Few(Vec::new())
    }
}

impl Subs {
    fn len(&self) -> usize {
        match self {
            Subs::Few(v) => v.len(),
            Subs::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn values(&self) -> Box<dyn Iterator<Item = &Sub> + '_> {
        match self {
            Subs::Few(v) => Box::new(v.iter()),
            Subs::Many(m) => Box::new(m.values()),
        }
    }

    fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.values().map(|s| s.conn.id)
    }

    fn get(&self, id: &u64) -> Option<&Sub> {
        match self {
            Subs::Few(v) => v.iter().find(|s| s.conn.id == *id),
            Subs::Many(m) => m.get(id),
        }
    }

    fn get_mut(&mut self, id: &u64) -> Option<&mut Sub> {
        match self {
            Subs::Few(v) => v.iter_mut().find(|s| s.conn.id == *id),
            Subs::Many(m) => m.get_mut(id),
        }
    }

    fn insert(&mut self, sub: Sub) {
        if let Some(s) = self.get_mut(&sub.conn.id) {
            *s = sub;
            return;
        }
        match self {
            Subs::Few(v) if v.len() < SUBS_INLINE => v.push(sub),
            Subs::Few(v) => {
                let mut m: HashMap<u64, Sub> = v.drain(..).map(|s| (s.conn.id, s)).collect();
                m.insert(sub.conn.id, sub);
                *self = Subs::Many(m);
            }
            Subs::Many(m) => {
                m.insert(sub.conn.id, sub);
            }
        }
    }

    fn remove(&mut self, id: &u64) -> Option<Sub> {
        match self {
            Subs::Few(v) => {
                let i = v.iter().position(|s| s.conn.id == *id)?;
                let sub = v.swap_remove(i);
                if v.capacity() > 8 && v.len() < v.capacity() / 4 {
                    v.shrink_to(v.len() * 2);
                }
                Some(sub)
            }
            Subs::Many(m) => {
                let sub = m.remove(id);
                if m.len() < SUBS_INLINE / 2 {
                    *self = Subs::Few(m.drain().map(|(_, s)| s).collect());
                }
                sub
            }
        }
    }
}

/// A member's state at the last flush, for a large room's next one.
struct Pending {
    before: Arc<Presence>,
    privacy: Privacy,
    contacts: Members,
    /// The member's latest presence, when it is not in `present` (went offline).
    after: Option<Arc<Presence>>,
}

#[derive(Default)]
struct State {
    members: Members,
    /// Members online for themselves, with their presence (one copy per user for every
    /// room of the node: see `Hub::share`) and whether a non-contact sees them online.
    present: BTreeMap<UserId, (Arc<Presence>, bool)>,
    public_online: usize,
    shy: HashSet<UserId>,
    subs: Subs,
    /// Large rooms: what changed since the last flush.
    pending: HashMap<UserId, Pending>,
    removed: Vec<UserId>,
    /// Events that came while the room was being read (applied after it, if newer).
    early: Option<Vec<Arc<Presence>>>,
    /// The read in progress (or last applied): a read applies only if no newer one began.
    load_gen: u64,
    /// Reads of added members in flight ([`Room::set_members`] to [`Room::add_members`]),
    /// and meanwhile, the revision of each event that left a member offline: an offline
    /// member is not in `present`, so this is what tells an older read from a newer event.
    adding: u32,
    gone: HashMap<UserId, u64>,
    /// Dropped from the node ([`Room::close`]): holds nothing, reads and events no longer
    /// apply.
    closed: bool,
}

/// One conversation some connection of this node subscribed to.
pub struct Room {
    pub id: Arc<str>,
    state: Mutex<State>,
    /// Set once the members' presence was read (a failed read is tried again by the next
    /// subscriber).
    pub(super) loaded: tokio::sync::OnceCell<()>,
}

/// A message for one connection.
pub type Outbox = Vec<(Arc<Client>, Utf8Bytes)>;

impl Room {
    pub fn new(id: Arc<str>, members: Members) -> Room {
        Room { id, state: Mutex::new(State { members, early: Some(Vec::new()), ..State::default() }), loaded: tokio::sync::OnceCell::new() }
    }

    pub fn members(&self) -> Members {
        self.state.lock().members.clone()
    }

    pub fn has_member(&self, user: &UserId) -> bool {
        self.state.lock().members.contains(user)
    }

    pub fn is_large(&self, live_members: usize) -> bool {
        self.state.lock().members.len() > live_members
    }

    pub fn subscriber_count(&self) -> usize {
        self.state.lock().subs.len()
    }

    pub fn subscribers(&self) -> Vec<Arc<Client>> {
        self.state.lock().subs.values().map(|s| s.conn.clone()).collect()
    }

    /// Dropped from the node ([`Room::close`]).
    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// The current read's generation (the first read's, for [`Room::load`]).
    pub fn generation(&self) -> u64 {
        self.state.lock().load_gen
    }

    /// Sets the members' presence as read from the store (`found`) by read `gen`, then
    /// applies the events that came meanwhile if they are newer; returns `false` (and
    /// changes nothing) when a newer read began since. What was pending is dropped: the
    /// caller sends every subscriber a snapshot.
    pub fn load(&self, found: Vec<Arc<Presence>>, dir: &Directory, gen: u64) -> bool {
        let mut s = self.state.lock();
        if s.load_gen != gen || s.early.is_none() || s.closed {
            return false;
        }
        let early = s.early.take().unwrap_or_default();
        s.present.clear();
        s.shy.clear();
        s.public_online = 0;
        s.pending.clear();
        s.removed.clear();
        // The read, then what came during it, each kept unless older than what the room
        // has of the member (offline ones included: they are not in `present`).
        let late: HashSet<UserId> = early.iter().map(|p| p.user_id.clone()).collect();
        let mut latest: HashMap<UserId, u64> = HashMap::new();
        for p in found.into_iter().chain(early) {
            if !s.members.contains(&p.user_id) {
                continue;
            }
            if p.revision != 0 && late.contains(&p.user_id) {
                if latest.get(&p.user_id).is_some_and(|r| p.revision < *r) {
                    continue;
                }
                latest.insert(p.user_id.clone(), p.revision);
            }
            let privacy = dir.privacy(&p.user_id);
            s.put(p, &privacy);
        }
        true
    }

    /// Sends every subscriber a fresh snapshot (after [`Room::load`] on a resync).
    pub fn snapshot_all(&self, dir: &Directory, page: usize, now: Millis) -> Outbox {
        let mut s = self.state.lock();
        let ids: Vec<u64> = s.subs.keys().collect();
        ids.into_iter().filter_map(|id| s.snapshot_for(id, dir, page, now, &self.id)).collect()
    }

    /// Adds `conn` and returns its snapshot: counts and the first `page` members it sees
    /// online. Under the room's lock, so no change falls between the two. `forbidden`
    /// when its user is not a member (any more) and not an admin.
    pub fn subscribe(&self, conn: &Arc<Client>, dir: &Directory, page: usize, now: Millis) -> Result<Utf8Bytes, ApiError> {
        let mut s = self.state.lock();
        if !conn.admin && !s.members.contains(&conn.user) {
            return Err(ApiError::Forbidden(format!("only members of conversation {} (or presence:admin) may see its presence", self.id)));
        }
        s.subs.insert(Sub { conn: conn.clone(), online: 0, members: 0 });
        Ok(s.snapshot_for(conn.id, dir, page, now, &self.id).map(|(_, m)| m).unwrap_or_default())
    }

    /// The room is dropped (nobody here subscribes to it): what it holds is let go at
    /// once, so the members' shared presence can be, and a read in flight will not apply.
    pub fn close(&self) {
        let mut s = self.state.lock();
        s.closed = true;
        s.load_gen += 1;
        s.present = BTreeMap::new();
        s.shy = HashSet::new();
        s.public_online = 0;
        s.pending = HashMap::new();
        s.early = None;
    }

    /// Removes connection `id`; returns how many subscribers are left.
    pub fn unsubscribe(&self, id: u64) -> usize {
        let mut s = self.state.lock();
        s.subs.remove(&id);
        s.subs.len()
    }

    /// A member's presence changed (an event). Small rooms: returns a message for each
    /// subscriber who saw the member come online or go offline: the counts and the
    /// member (any other change reaches them as a `presence_update`, with the event's
    /// audience). Large rooms: the change waits for the next flush.
    pub fn apply(&self, p: &Arc<Presence>, dir: &Directory, live_members: usize, now: Millis) -> Outbox {
        let mut s = self.state.lock();
        let large = s.members.len() > live_members;
        if s.closed {
            return Vec::new();
        }
        if let Some(early) = &mut s.early {
            early.push(p.clone());
            return Vec::new();
        }
        if !s.members.contains(&p.user_id) {
            return Vec::new();
        }
        if let Some((q, _)) = s.present.get(&p.user_id) {
            if p.revision != 0 && p.revision < q.revision {
                return Vec::new(); // older than what the room has
            }
        }
        if let Some(r) = s.gone.get(&p.user_id) {
            if p.revision != 0 && p.revision < *r {
                return Vec::new(); // older than the departure the room applied
            }
        }
        if s.adding > 0 && p.status == Status::Offline && p.revision != 0 {
            s.gone.insert(p.user_id.clone(), p.revision);
        }
        let (contacts, privacy) = dir.view(&p.user_id);
        let before = s.put(p.clone(), &privacy);
        if large {
            let after = (p.status == Status::Offline).then(|| p.clone());
            let e = s.pending.entry(p.user_id.clone()).or_insert_with(|| Pending {
                before: before.unwrap_or_else(|| offline(&p.user_id)),
                privacy,
                contacts,
                after: None,
            });
            e.after = after;
            return Vec::new();
        }
        let was = Pending { before: before.unwrap_or_else(|| offline(&p.user_id)), privacy, contacts, after: Some(p.clone()) };
        s.small_change(&was, &p.user_id, dir, now, &self.id)
    }

    /// A member's privacy settings (from `previous`) or contacts (from `old_contacts`)
    /// changed: the member is sorted again, and the counts (small rooms) or the next
    /// flush (large ones) follow.
    pub fn view_changed(
        &self,
        user: &UserId,
        previous: Option<Privacy>,
        old_contacts: Option<Members>,
        dir: &Directory,
        live_members: usize,
        now: Millis,
    ) -> Outbox {
        let mut s = self.state.lock();
        let large = s.members.len() > live_members;
        if s.early.is_some() || s.closed || !s.members.contains(user) {
            return Vec::new();
        }
        let (contacts, privacy) = dir.view(user);
        let current = s.present.get(user).map(|(p, _)| p.clone());
        if let Some(p) = &current {
            s.put(p.clone(), &privacy);
        }
        let was = Pending {
            before: current.unwrap_or_else(|| offline(user)),
            privacy: previous.unwrap_or(privacy),
            contacts: old_contacts.unwrap_or(contacts),
            after: None,
        };
        if large {
            s.pending.entry(user.clone()).or_insert(was);
            return Vec::new();
        }
        s.small_change(&was, user, dir, now, &self.id)
    }

    /// Starts reading the room again (a resync); returns the read's generation. Events
    /// that come from now on wait for [`Room::load`]; a read already running will not
    /// apply (those before it are in the new read: it starts after them).
    pub fn begin_load(&self) -> u64 {
        let mut s = self.state.lock();
        s.load_gen += 1;
        s.early = Some(Vec::new());
        s.load_gen
    }

    /// The conversation's members changed (first step, at once: events of the new
    /// members apply from now on). Those `removed` leave the room; connections whose
    /// user left (admins aside) no longer subscribe and are returned.
    /// `adding`: members were added, and their read goes to [`Room::add_members`] (which
    /// must follow, with nothing read if need be).
    pub fn set_members(&self, members: Members, removed: &[UserId], adding: bool) -> Vec<Arc<Client>> {
        let mut s = self.state.lock();
        s.members = members;
        if adding {
            s.adding += 1;
        }
        let loading = s.early.is_some();
        for r in removed {
            s.take(r);
            s.pending.remove(r);
            if !loading {
                s.removed.push(r.clone());
            }
        }
        let dropped: Vec<u64> = s.subs.values().filter(|x| !x.conn.admin && !s.members.contains(&x.conn.user)).map(|x| x.conn.id).collect();
        dropped.into_iter().filter_map(|id| s.subs.remove(&id)).map(|x| x.conn).collect()
    }

    /// Second step: the presence of the members added, read after the first (kept unless
    /// an event brought a newer one meanwhile). Small rooms tell their subscribers at
    /// once, large ones at the next flush.
    /// `added`: as given to [`Room::set_members`].
    pub fn add_members(
        &self,
        found: Vec<Arc<Presence>>,
        added: bool,
        dir: &Directory,
        live_members: usize,
        page: usize,
        now: Millis,
    ) -> Outbox {
        let mut s = self.state.lock();
        let gone = match s.adding {
            _ if !added => HashMap::new(),
            0 | 1 => std::mem::take(&mut s.gone),
            _ => s.gone.clone(),
        };
        if added {
            s.adding = s.adding.saturating_sub(1);
        }
        if s.closed {
            return Vec::new();
        }
        if let Some(early) = &mut s.early {
            // A read of the room runs: these go with the events it applies after it.
            early.extend(found);
            return Vec::new();
        }
        for p in found {
            let id = p.user_id.clone();
            if !s.members.contains(&id) {
                continue;
            }
            let newer = s.present.get(&id).map(|(q, _)| q.revision).or_else(|| gone.get(&id).copied());
            if newer.is_some_and(|r| p.revision != 0 && p.revision < r) {
                continue; // an event brought a newer state while this was read
            }
            let (contacts, privacy) = dir.view(&id);
            s.put(p.clone(), &privacy);
            if p.status != Status::Offline {
                s.pending.entry(id.clone()).or_insert_with(|| Pending { before: offline(&id), privacy, contacts, after: Some(p) });
            }
        }
        if s.members.len() > live_members {
            return Vec::new();
        }
        s.flush(dir, now, &self.id, page)
    }

    /// Large rooms: one `conversation_presence` per subscriber whose view changed since
    /// the last flush (a fresh snapshot when more than a `page` of members changed).
    pub fn flush(&self, dir: &Directory, page: usize, now: Millis) -> Outbox {
        let mut s = self.state.lock();
        if s.early.is_some() {
            return Vec::new();
        }
        s.flush(dir, now, &self.id, page)
    }

    /// The viewer's counts and the members it sees online, in id order, after `cursor`
    /// (for tests and the REST page of a room held here).
    pub fn page_for(&self, conn: &Client, dir: &Directory, limit: usize) -> (usize, usize, Vec<Presence>, Option<String>) {
        let s = self.state.lock();
        let online = s.online_for(conn, dir);
        let (page, next) = s.page(conn, dir, limit);
        (s.members.len(), online, page, next)
    }
}

impl Room {
    /// The presence the room holds of `user`, if online (tests: what rooms share).
    #[cfg(test)]
    pub(super) fn held(&self, user: &UserId) -> Option<Arc<Presence>> {
        self.state.lock().present.get(user).map(|(p, _)| p.clone())
    }
}

fn offline(user: &UserId) -> Arc<Presence> {
    Arc::new(Presence::unknown(user.clone(), Arc::from("")))
}

impl State {
    /// Records `p` as the member's presence; returns the one it replaces, if the member
    /// was online.
    fn put(&mut self, p: Arc<Presence>, privacy: &Privacy) -> Option<Arc<Presence>> {
        let before = self.take(&p.user_id);
        if p.status != Status::Offline {
            let public = online_for(&p, privacy, Relation::Other);
            if public {
                self.public_online += 1;
            } else {
                self.shy.insert(p.user_id.clone());
            }
            self.present.insert(p.user_id.clone(), (p, public));
        }
        before
    }

    fn take(&mut self, user: &UserId) -> Option<Arc<Presence>> {
        let (p, public) = self.present.remove(user)?;
        if public {
            self.public_online -= 1;
        } else {
            self.shy.remove(user);
        }
        Some(p)
    }

    /// Members `viewer` sees online.
    fn online_for(&self, viewer: &Client, dir: &Directory) -> usize {
        let mut n = self.public_online;
        for m in &self.shy {
            if let Some((p, _)) = self.present.get(m) {
                let (contacts, privacy) = dir.view(m);
                if online_for(p, &privacy, relation_of(viewer, m, &contacts)) {
                    n += 1;
                }
            }
        }
        n
    }

    /// The first `limit` members `viewer` sees online, and where the next page starts.
    fn page(&self, viewer: &Client, dir: &Directory, limit: usize) -> (Vec<Presence>, Option<String>) {
        let mut out: Vec<Presence> = Vec::new();
        for (m, (p, _)) in &self.present {
            let (contacts, privacy) = dir.view(m);
            let rel = relation_of(viewer, m, &contacts);
            if !online_for(p, &privacy, rel) {
                continue;
            }
            if out.len() == limit {
                let next = out.last().map(|p| p.user_id.to_string());
                return (out, next);
            }
            out.push(project(p, &privacy, rel));
        }
        (out, None)
    }

    fn snapshot_for(&mut self, id: u64, dir: &Directory, page: usize, now: Millis, room: &str) -> Option<(Arc<Client>, Utf8Bytes)> {
        let conn = self.subs.get(&id)?.conn.clone();
        let online = self.online_for(&conn, dir);
        let (presences, next) = self.page(&conn, dir, page);
        let members = self.members.len();
        if let Some(sub) = self.subs.get_mut(&id) {
            (sub.online, sub.members) = (online, members);
        }
        let msg = protocol::conversation_presence(&protocol::ConversationView {
            conversation_id: room,
            members,
            online,
            presences: &presences,
            next_cursor: next.as_deref(),
            snapshot: true,
            removed: &[],
            now,
        });
        Some((conn, Utf8Bytes::from(msg)))
    }

    /// Small rooms: `user`'s view changed from `was`. Each subscriber who saw the member
    /// come online or go offline gets the counts and the member as it now sees it, so the
    /// list of members online changes exactly when the count does.
    fn small_change(&mut self, was: &Pending, user: &UserId, dir: &Directory, now: Millis, room: &str) -> Outbox {
        let (contacts, privacy) = dir.view(user);
        let after = match self.present.get(user) {
            Some((q, _)) => q.clone(),
            None => was.after.clone().unwrap_or_else(|| offline(user)),
        };
        let members = self.members.len();
        let mut out = Vec::new();
        let ids: Vec<u64> = self.subs.keys().collect();
        for id in ids {
            let Some(conn) = self.subs.get(&id).map(|x| x.conn.clone()) else { continue };
            let rel = relation_of(&conn, user, &contacts);
            let moved = online_for(&was.before, &was.privacy, relation_of(&conn, user, &was.contacts)) != online_for(&after, &privacy, rel);
            let online = if moved { self.online_for(&conn, dir) } else { 0 };
            let Some(sub) = self.subs.get_mut(&id) else { continue };
            if !moved && sub.members == members {
                continue;
            }
            let online = if moved { online } else { sub.online };
            (sub.online, sub.members) = (online, members);
            let seen = if moved { vec![project(&after, &privacy, rel)] } else { Vec::new() };
            let msg = protocol::conversation_presence(&protocol::ConversationView {
                conversation_id: room,
                members,
                online,
                presences: &seen,
                next_cursor: None,
                snapshot: false,
                removed: &[],
                now,
            });
            out.push((conn, Utf8Bytes::from(msg)));
        }
        out
    }

    /// More changed than a page holds (a join storm): every subscriber gets a fresh
    /// snapshot instead, so no message outgrows a page. One is encoded for every viewer
    /// who sees each listed and shy member as a non-contact does; the others (members
    /// listed or shy themselves, their contacts where that shows more, admins) get
    /// their own.
    fn snapshot_flush(&mut self, dir: &Directory, now: Millis, room: &str, page: usize) -> Outbox {
        self.pending.clear();
        self.removed.clear();
        let mut listed: Vec<Presence> = Vec::new();
        let mut next = None;
        let mut special: HashSet<UserId> = self.shy.iter().cloned().collect();
        let mut audiences: Vec<Members> = Vec::new();
        for (m, (p, public)) in &self.present {
            if !*public {
                continue;
            }
            if listed.len() == page {
                next = listed.last().map(|p| p.user_id.to_string());
                break;
            }
            let (contacts, privacy) = dir.view(m);
            if contacts_see_more(&privacy) {
                audiences.push(contacts);
            }
            special.insert(m.clone());
            listed.push(project(p, &privacy, Relation::Other));
        }
        for m in &self.shy {
            let (contacts, privacy) = dir.view(m);
            if contacts_see_more(&privacy) {
                audiences.push(contacts);
            }
        }
        let (members, public_online) = (self.members.len(), self.public_online);
        let mut shared: Option<Utf8Bytes> = None;
        let mut out = Vec::new();
        let ids: Vec<u64> = self.subs.keys().collect();
        for id in ids {
            let Some(conn) = self.subs.get(&id).map(|x| x.conn.clone()) else { continue };
            if conn.admin || special.contains(&conn.user) || audiences.iter().any(|a| a.contains(&conn.user)) {
                out.extend(self.snapshot_for(id, dir, page, now, room));
                continue;
            }
            if let Some(sub) = self.subs.get_mut(&id) {
                (sub.online, sub.members) = (public_online, members);
            }
            let msg = shared.get_or_insert_with(|| {
                Utf8Bytes::from(protocol::conversation_presence(&protocol::ConversationView {
                    conversation_id: room,
                    members,
                    online: public_online,
                    presences: &listed,
                    next_cursor: next.as_deref(),
                    snapshot: true,
                    removed: &[],
                    now,
                }))
            });
            out.push((conn, msg.clone()));
        }
        out
    }

    /// What changed since the last flush, for each subscriber whose view of it changed:
    /// one message shared by every viewer with no special relation to a changed or shy
    /// member, one of its own for each of the others.
    fn flush(&mut self, dir: &Directory, now: Millis, room: &str, page: usize) -> Outbox {
        if self.pending.len() + self.removed.len() > page {
            return self.snapshot_flush(dir, now, room, page);
        }
        let pending: Vec<(UserId, Pending)> = self.pending.drain().collect();
        let removed = std::mem::take(&mut self.removed);
        if self.subs.is_empty() {
            return Vec::new();
        }
        let members = self.members.len();
        // Each changed member: its views before and now.
        struct Changed {
            id: UserId,
            before: Arc<Presence>,
            before_privacy: Privacy,
            before_contacts: Members,
            after: Arc<Presence>,
            privacy: Privacy,
            contacts: Members,
        }
        let changed: Vec<Changed> = pending
            .into_iter()
            .map(|(id, p)| {
                let (contacts, privacy) = dir.view(&id);
                let after = match self.present.get(&id) {
                    Some((q, _)) => q.clone(),
                    None => p.after.unwrap_or_else(|| offline(&id)),
                };
                Changed { id, before: p.before, before_privacy: p.privacy, before_contacts: p.contacts, after, privacy, contacts }
            })
            .collect();
        // Viewers who may see more of a changed or shy member than a non-contact does.
        let special_users: HashSet<&UserId> = changed.iter().map(|c| &c.id).chain(self.shy.iter()).collect();
        let mut audiences: Vec<Members> = Vec::new();
        for c in &changed {
            if contacts_see_more(&c.privacy) || contacts_see_more(&c.before_privacy) {
                audiences.push(c.contacts.clone());
                audiences.push(c.before_contacts.clone());
            }
        }
        for m in &self.shy {
            let (contacts, privacy) = dir.view(m);
            if contacts_see_more(&privacy) {
                audiences.push(contacts);
            }
        }
        let is_special = |c: &Client| c.admin || special_users.contains(&c.user) || audiences.iter().any(|a| a.contains(&c.user));
        let view_for = |rel_before: Relation, rel: Relation, c: &Changed| -> Option<Presence> {
            let before = project(&c.before, &c.before_privacy, rel_before);
            let after = project(&c.after, &c.privacy, rel);
            (!before.same_view(&after)).then_some(after)
        };
        let mut shared: Option<Utf8Bytes> = None;
        let public_changes: Vec<Presence> = changed.iter().filter_map(|c| view_for(Relation::Other, Relation::Other, c)).collect();
        let public_online = self.public_online;
        let mut out = Vec::new();
        let ids: Vec<u64> = self.subs.keys().collect();
        for id in ids {
            let Some(conn) = self.subs.get(&id).map(|x| x.conn.clone()) else { continue };
            let (online, own): (usize, Option<Vec<Presence>>) = if is_special(&conn) {
                let online = self.online_for(&conn, dir);
                let views = changed
                    .iter()
                    .filter_map(|c| view_for(relation_of(&conn, &c.id, &c.before_contacts), relation_of(&conn, &c.id, &c.contacts), c))
                    .collect();
                (online, Some(views))
            } else {
                (public_online, None)
            };
            let Some(sub) = self.subs.get_mut(&id) else { continue };
            let presences = own.as_deref().unwrap_or(&public_changes);
            if presences.is_empty() && removed.is_empty() && (sub.online, sub.members) == (online, members) {
                continue;
            }
            (sub.online, sub.members) = (online, members);
            let encode = || {
                Utf8Bytes::from(protocol::conversation_presence(&protocol::ConversationView {
                    conversation_id: room,
                    members,
                    online,
                    presences,
                    next_cursor: None,
                    snapshot: false,
                    removed: &removed,
                    now,
                }))
            };
            let msg = match &own {
                Some(_) => encode(),
                None => shared.get_or_insert_with(encode).clone(),
            };
            out.push((conn, msg));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> UserId {
        UserId::parse(s, 64).unwrap()
    }

    fn seen(user: &str, status: Status, revision: u64) -> Arc<Presence> {
        Arc::new(Presence { status, revision, ..Presence::unknown(id(user), Arc::from("n")) })
    }

    fn online(room: &Room, user: &str) -> bool {
        room.state.lock().present.contains_key(&id(user))
    }

    fn members(ids: &[&str]) -> Members {
        Arc::new(ids.iter().map(|s| id(s)).collect())
    }

    /// A departure that comes while the room is read is not undone by the read's older
    /// state of the member.
    #[test]
    fn a_read_older_than_an_event_of_the_load_does_not_win() {
        let dir = Directory::default();
        let room = Room::new(Arc::from("c"), members(&["a", "b"]));
        let gen = room.begin_load();
        room.apply(&seen("a", Status::Online, 4), &dir, 1000, 0);
        room.apply(&seen("a", Status::Offline, 6), &dir, 1000, 0);
        assert!(room.load(vec![seen("a", Status::Online, 5), seen("b", Status::Online, 2)], &dir, gen));
        assert!(!online(&room, "a"), "the event (revision 6) is newer than the read (5)");
        assert!(online(&room, "b"));
        // A read newer than the events of the load: an offline member (not kept among
        // those online, so only the read's revision tells) stays offline.
        let gen = room.begin_load();
        room.apply(&seen("a", Status::Online, 5), &dir, 1000, 0);
        room.apply(&seen("b", Status::Offline, 1), &dir, 1000, 0);
        assert!(room.load(vec![seen("a", Status::Offline, 6), seen("b", Status::Online, 2)], &dir, gen));
        assert!(!online(&room, "a"), "the read (revision 6) is newer than the event (5)");
        assert!(online(&room, "b"), "the read (revision 2) is newer than the event (1)");
    }

    /// A member added goes offline (an event) before the read of the members added
    /// answers with their older state: they stay offline, whatever the room's size.
    #[test]
    fn a_member_added_stays_offline_after_a_departure_newer_than_their_read() {
        for live in [1000, 1] {
            let dir = Directory::default();
            let room = Room::new(Arc::from("c"), members(&["a"]));
            assert!(room.load(vec![seen("a", Status::Online, 1)], &dir, room.begin_load()));
            room.set_members(members(&["a", "n"]), &[], true);
            room.apply(&seen("n", Status::Offline, 9), &dir, live, 0);
            room.add_members(vec![seen("n", Status::Online, 8)], true, &dir, live, 100, 0);
            assert!(!online(&room, "n"), "live_members {live}");
            assert!(room.state.lock().gone.is_empty(), "nothing kept once the reads are in");
            // A read newer than every event is taken.
            room.set_members(members(&["a", "n", "m"]), &[], true);
            room.add_members(vec![seen("m", Status::Online, 3)], true, &dir, live, 100, 0);
            assert!(online(&room, "m"));
        }
    }
}
