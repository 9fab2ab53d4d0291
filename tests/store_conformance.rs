//! The store conformance suite: the behaviour every `Store` backend must have, written once
//! against a small harness (a store, a manual clock, a way to run expiry, the event bus) and
//! instantiated per backend (centrifuge's `map_broker_shared_test.go` idea). The `memory`
//! backend runs it here; cluster backends add their harness beside it.

use std::sync::Arc;

mod common;

use async_trait::async_trait;
use presenced::bus::EventBus;
use presenced::clock::{Clock, ManualClock};
use presenced::core::NewSession;
use presenced::core::{Event, EventKind, Platform, Session, Status, UserId};
use presenced::store::cluster::ClusterOptions;
use presenced::store::memory::{MemoryConfig, MemoryStore};
use presenced::store::{get_one, DirTable, DirectoryStore as _, PresenceStore as _, SetStatus, Store, StoreError};
use tokio::sync::broadcast::Receiver;

const T0: i64 = 1_800_000_000_000;

/// What the suite needs from a backend.
#[async_trait]
trait Harness: Send + Sync {
    fn store(&self) -> Arc<dyn Store>;
    fn clock(&self) -> &ManualClock;
    /// Runs the backend's expiry for the current clock time.
    async fn expire(&self);
    fn events(&self) -> Receiver<Arc<Event>>;
    /// Whether directory rows are stored by the backend (and so come back from `load_directory`).
    fn durable_directory(&self) -> bool {
        true
    }
}

struct Memory {
    store: MemoryStore,
    clock: Arc<ManualClock>,
    bus: EventBus,
}

#[async_trait]
impl Harness for Memory {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
    fn clock(&self) -> &ManualClock {
        &self.clock
    }
    async fn expire(&self) {
        self.store.reap(self.clock.now());
    }
    fn events(&self) -> Receiver<Arc<Event>> {
        self.bus.subscribe()
    }
    fn durable_directory(&self) -> bool {
        // The memory store hands its rows out once, at start-up; written rows live in the
        // directory. What it persists is checked by reopening, below.
        false
    }
}

fn memory() -> Memory {
    let clock = Arc::new(ManualClock::new(T0));
    let bus = EventBus::new(4096);
    let store = MemoryStore::open(MemoryConfig::new("node-a"), clock.clone(), bus.clone()).unwrap();
    Memory { store, clock, bus }
}

fn uid(s: &str) -> UserId {
    UserId::parse(s, 128).unwrap()
}

fn drain(rx: &mut Receiver<Arc<Event>>) -> Vec<(EventKind, String)> {
    let mut v = Vec::new();
    while let Ok(e) = rx.try_recv() {
        v.push((e.kind, e.presence.user_id.to_string()));
    }
    v
}

fn set(status: Status, msg: &str, ttl_ms: Option<i64>) -> SetStatus {
    SetStatus { status, message: Arc::from(msg), ttl_ms }
}

// ---------------------------------------------------------------- the suite

async fn unknown_users_and_ordered_batches(h: &dyn Harness) {
    let s = h.store();
    assert_eq!(get_one(&*s, &uid("nobody")).await.unwrap(), None);
    s.set_status(&uid("b"), set(Status::Busy, "x", None)).await.unwrap();
    let got = s.get_many(&[uid("a"), uid("b"), uid("c")]).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got[0].is_none() && got[2].is_none());
    assert_eq!(got[1].as_ref().unwrap().status, Status::Busy);
}

async fn status_writes_emit_once_and_no_op_is_silent(h: &dyn Harness) {
    let s = h.store();
    let mut rx = h.events();
    let p = s.set_status(&uid("al"), set(Status::Away, "lunch", None)).await.unwrap();
    assert_eq!((p.status, &*p.message), (Status::Away, "lunch"));
    s.set_status(&uid("al"), set(Status::Away, "lunch", None)).await.unwrap();
    assert_eq!(drain(&mut rx), vec![(EventKind::PresenceUpdated, "al".into())]);
    let p = s.clear_status(&uid("al")).await.unwrap();
    assert_eq!(p.status, Status::Offline);
    assert_eq!(drain(&mut rx), vec![(EventKind::PresenceUpdated, "al".into())]);
}

async fn multi_device_online_offline(h: &dyn Harness) {
    let s = h.store();
    let mut rx = h.events();
    let u = uid("md");
    let r = s.register_session(&u, NewSession::new("phone", "gw-1", 60_000)).await.unwrap();
    assert!(r.created);
    assert_eq!(r.expires_at, h.clock().now() + 60_000);
    assert!(!s.register_session(&u, NewSession::new("phone", "gw-1", 60_000)).await.unwrap().created);
    s.register_session(&u, NewSession::new("laptop", "gw-2", 60_000)).await.unwrap();
    let mut devices: Vec<(String, String)> =
        s.devices(&u).await.unwrap().iter().map(|d| (d.device_id.to_string(), d.instance_id.to_string())).collect();
    devices.sort();
    assert_eq!(devices, vec![("laptop".into(), "gw-2".into()), ("phone".into(), "gw-1".into())]);
    let p = get_one(&*s, &u).await.unwrap().unwrap();
    let ids: Vec<&str> = p.devices.iter().map(|d| &*d.device_id).collect();
    assert_eq!(ids, vec!["laptop", "phone"]);
    assert!(s.unregister_session(&u, "phone", None).await.unwrap());
    assert!(!s.unregister_session(&u, "phone", None).await.unwrap());
    assert!(s.unregister_session(&u, "laptop", None).await.unwrap());
    // The second device coming and the first going are changes watchers see.
    assert_eq!(
        drain(&mut rx),
        vec![
            (EventKind::UserOnline, "md".into()),
            (EventKind::PresenceUpdated, "md".into()),
            (EventKind::PresenceUpdated, "md".into()),
            (EventKind::UserOffline, "md".into())
        ]
    );
    let p = get_one(&*s, &u).await.unwrap().unwrap();
    assert_eq!((p.status, p.device_count, p.last_seen), (Status::Offline, 0, Some(h.clock().now())));
    assert_eq!(s.stats().sessions, 0);
}

async fn sessions_expire_unless_refreshed(h: &dyn Harness) {
    let s = h.store();
    let mut rx = h.events();
    let u = uid("ttl");
    s.register_session(&u, NewSession::new("d", "gw", 10_000)).await.unwrap();
    h.clock().advance(6_000);
    assert_eq!(s.refresh_session(&u, "d").await.unwrap(), Some(h.clock().now() + 10_000));
    assert_eq!(s.refresh_session(&u, "other").await.unwrap(), None);
    h.clock().advance(6_000);
    h.expire().await;
    assert_eq!(drain(&mut rx), vec![(EventKind::UserOnline, "ttl".into())], "refreshed: still online");
    h.clock().advance(5_000);
    h.expire().await;
    assert_eq!(drain(&mut rx), vec![(EventKind::UserOffline, "ttl".into())]);
    assert_eq!(s.refresh_session(&u, "d").await.unwrap(), None, "expired sessions must be registered again");
}

async fn explicit_status_ttl_reverts_with_expiry_event(h: &dyn Harness) {
    let s = h.store();
    let mut rx = h.events();
    let u = uid("ex");
    s.register_session(&u, NewSession::new("d", "gw", 600_000)).await.unwrap();
    let p = s.set_status(&u, set(Status::Busy, "focus", Some(3_000))).await.unwrap();
    assert_eq!(p.expires_at, Some(h.clock().now() + 3_000));
    h.clock().advance(3_500);
    // Reads apply the rule at read time, whatever the reaper did.
    assert_eq!(get_one(&*s, &u).await.unwrap().unwrap().status, Status::Online);
    h.expire().await;
    let kinds: Vec<EventKind> = drain(&mut rx).into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, vec![EventKind::UserOnline, EventKind::PresenceUpdated, EventKind::PresenceExpired]);
}

/// A status set while connected is a preference: the last device going makes the user
/// offline (every event says so), and a device coming back shows it again.
async fn last_device_gone_means_offline_and_the_preference_returns(h: &dyn Harness) {
    let s = h.store();
    let u = uid("pref");
    s.register_session(&u, NewSession::new("phone", "gw", 600_000)).await.unwrap();
    s.set_status(&u, set(Status::Away, "lunch", Some(3_600_000))).await.unwrap();
    let mut rx = h.events();
    h.clock().advance(1_000);
    assert!(s.unregister_session(&u, "phone", None).await.unwrap());
    let ev = rx.try_recv().unwrap();
    assert_eq!((ev.kind, ev.presence.status, ev.previous()), (EventKind::UserOffline, Status::Offline, Status::Away));
    let p = get_one(&*s, &u).await.unwrap().unwrap();
    assert_eq!((p.status, &*p.message, p.device_count, p.last_seen), (Status::Offline, "", 0, Some(h.clock().now())));
    s.register_session(&u, NewSession::new("laptop", "gw", 600_000)).await.unwrap();
    let ev = rx.try_recv().unwrap();
    assert_eq!((ev.kind, ev.presence.status, &*ev.presence.message), (EventKind::UserOnline, Status::Away, "lunch"));
    // Session expiry ends it too.
    h.clock().advance(700_000);
    h.expire().await;
    assert_eq!(get_one(&*s, &u).await.unwrap().unwrap().status, Status::Offline);
    // Written with no session at all (a backend's calendar): shown as written.
    let cal = uid("calendar");
    assert_eq!(s.set_status(&cal, set(Status::Busy, "meeting", None)).await.unwrap().status, Status::Busy);
    assert_eq!(get_one(&*s, &cal).await.unwrap().unwrap().status, Status::Busy);
}

/// The device limit is part of the registration: concurrent new devices never pass it,
/// and an old registration's goodbye does not end a newer one of the same device.
async fn device_limit_and_registration_tags(h: &dyn Harness) {
    let s = h.store();
    let u = uid("lim");
    let mut ok = 0;
    let tries = (0..12).map(|i| s.register_session(&u, NewSession::new(&format!("d{i}"), "gw", 600_000).max_devices(5)));
    for r in futures_util::future::join_all(tries).await {
        match r {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e, StoreError::TooManyDevices { max: 5 }),
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(s.devices(&u).await.unwrap().len(), 5);
    let v = uid("tags");
    let old = s.register_session(&v, NewSession::new("phone", "gw", 600_000).sid(1)).await.unwrap();
    let new = s.register_session(&v, NewSession::new("phone", "gw", 600_000).sid(2)).await.unwrap();
    assert_eq!((old.sid, new.sid), (1, 2));
    assert!(!s.unregister_session(&v, "phone", Some(1)).await.unwrap(), "the old connection's goodbye");
    assert_eq!(get_one(&*s, &v).await.unwrap().unwrap().device_count, 1);
    assert!(s.unregister_session(&v, "phone", Some(2)).await.unwrap());
}

/// Revisions grow with every visible change; events carry the state before and after.
async fn revisions_order_each_users_changes(h: &dyn Harness) {
    let s = h.store();
    let u = uid("revs");
    let mut rx = h.events();
    s.register_session(&u, NewSession::new("a", "gw", 600_000).platform(Some(Platform::Mobile))).await.unwrap();
    s.set_status(&u, set(Status::Busy, "", None)).await.unwrap();
    s.register_session(&u, NewSession::new("b", "gw", 600_000)).await.unwrap();
    let events: Vec<Arc<Event>> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert_eq!(events.len(), 3);
    for w in events.windows(2) {
        assert!(w[1].presence.revision > w[0].presence.revision, "{} then {}", w[0].presence.revision, w[1].presence.revision);
        assert_eq!(w[1].before.revision, w[0].presence.revision);
        assert_eq!(w[1].before.status, w[0].presence.status);
    }
    assert_eq!(events[0].presence.devices[0].platform, Some(Platform::Mobile));
    let read = get_one(&*s, &u).await.unwrap().unwrap();
    assert_eq!(read.revision, events[2].presence.revision, "a read carries the revision of the state it shows");
}

/// A gateway instance's sessions held here are found by instance, each with its TTL;
/// other instances' are not. A live one can be rebound to another TTL, by its tag only.
async fn sessions_of_an_instance(h: &dyn Harness) {
    let s = h.store();
    let bound = 315_360_000_000;
    s.register_session(&uid("i1"), NewSession::new("phone", "gw-a", bound).sid(7)).await.unwrap();
    s.register_session(&uid("i1"), NewSession::new("laptop", "gw-a", bound).sid(8)).await.unwrap();
    s.register_session(&uid("i2"), NewSession::new("phone", "gw-a", bound).sid(9)).await.unwrap();
    s.register_session(&uid("i3"), NewSession::new("phone", "gw-a", 600_000).sid(10)).await.unwrap();
    s.register_session(&uid("i4"), NewSession::new("phone", "gw-b", bound).sid(11)).await.unwrap();
    let of = |list: Vec<(UserId, Session)>| {
        let mut v: Vec<(String, String, u64, i64)> =
            list.into_iter().map(|(u, s)| (u.to_string(), s.device_id.to_string(), s.sid, s.ttl_ms)).collect();
        v.sort();
        v
    };
    assert_eq!(
        of(s.sessions_of_instance("gw-a").await.unwrap()),
        vec![
            ("i1".into(), "laptop".into(), 8, bound),
            ("i1".into(), "phone".into(), 7, bound),
            ("i2".into(), "phone".into(), 9, bound),
            ("i3".into(), "phone".into(), 10, 600_000)
        ]
    );
    assert!(!s.rebind_session(&uid("i3"), "phone", 99, bound).await.unwrap(), "another registration's tag");
    assert!(s.rebind_session(&uid("i3"), "phone", 10, bound).await.unwrap());
    let listed = s.devices(&uid("i3")).await.unwrap();
    assert_eq!(listed[0].ttl_ms, bound, "the device list shows the new TTL");
    assert!(listed[0].expires_at > h.clock().now() + bound / 2, "and the deadline it gives");
    assert!(s.unregister_session(&uid("i2"), "phone", Some(9)).await.unwrap());
    assert!(!s.rebind_session(&uid("i2"), "phone", 9, bound).await.unwrap(), "an ended one stays ended");
    let found = of(s.sessions_of_instance("gw-a").await.unwrap());
    assert_eq!(found.len(), 3);
    assert!(found.iter().all(|f| f.3 == bound));
    assert!(s.sessions_of_instance("gw-none").await.unwrap().is_empty());
}

async fn directory_rows_round_trip(h: &dyn Harness) {
    let s = h.store();
    s.put_directory(DirTable::Contacts, "alice", Some(b"[\"bob\"]".to_vec())).await.unwrap();
    s.put_directory(DirTable::Privacy, "alice", Some(b"{\"visibility\":\"nobody\"}".to_vec())).await.unwrap();
    s.put_directory(DirTable::Privacy, "alice", None).await.unwrap();
    s.put_directory(DirTable::Conversations, "conv.1", Some(b"[\"a\"]".to_vec())).await.unwrap();
    let mut rows = s.load_directory().await.unwrap();
    if h.durable_directory() {
        rows.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(
            rows,
            vec![
                (DirTable::Contacts, "alice".into(), b"[\"bob\"]".to_vec()),
                (DirTable::Conversations, "conv.1".into(), b"[\"a\"]".to_vec())
            ]
        );
    }
}

async fn run_suite(make: impl Fn() -> Box<dyn Harness>) {
    unknown_users_and_ordered_batches(&*make()).await;
    status_writes_emit_once_and_no_op_is_silent(&*make()).await;
    multi_device_online_offline(&*make()).await;
    sessions_expire_unless_refreshed(&*make()).await;
    explicit_status_ttl_reverts_with_expiry_event(&*make()).await;
    directory_rows_round_trip(&*make()).await;
    last_device_gone_means_offline_and_the_preference_returns(&*make()).await;
    device_limit_and_registration_tags(&*make()).await;
    revisions_order_each_users_changes(&*make()).await;
    sessions_of_an_instance(&*make()).await;
}

#[tokio::test]
async fn memory_backend_conforms() {
    run_suite(|| Box::new(memory())).await;
}

#[tokio::test]
async fn memory_backend_with_persistence_conforms_and_returns_directory_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run_suite(move || {
        let clock = Arc::new(ManualClock::new(T0));
        let bus = EventBus::new(4096);
        let mut cfg = MemoryConfig::new("node-a");
        // A fresh sub-directory per case: each case starts from an empty store.
        cfg.data_dir = Some(path.join(format!("case-{}", rand_suffix())));
        let store = MemoryStore::open(cfg, clock.clone(), bus.clone()).unwrap();
        store.start();
        Box::new(Memory { store, clock, bus })
    })
    .await;
    // Durable directory rows come back on reopen.
    let mut cfg = MemoryConfig::new("node-a");
    cfg.data_dir = Some(dir.path().join("dir-check"));
    {
        let store = MemoryStore::open(cfg.clone(), Arc::new(ManualClock::new(T0)), EventBus::new(8)).unwrap();
        store.start();
        store.put_directory(DirTable::Contacts, "alice", Some(b"[\"bob\"]".to_vec())).await.unwrap();
        store.shutdown().await;
    }
    let store = MemoryStore::open(cfg, Arc::new(ManualClock::new(T0)), EventBus::new(8)).unwrap();
    assert_eq!(store.load_directory().await.unwrap(), vec![(DirTable::Contacts, "alice".to_string(), b"[\"bob\"]".to_vec())]);
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A cluster node (NATS or Redis backplane) under the suite.
struct Cluster {
    store: presenced::store::cluster::ClusterStore,
    clock: Arc<ManualClock>,
    bus: EventBus,
}

#[async_trait]
impl Harness for Cluster {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
    fn clock(&self) -> &ManualClock {
        &self.clock
    }
    async fn expire(&self) {
        self.store.reap(self.clock.now()).await;
    }
    fn events(&self) -> Receiver<Arc<Event>> {
        self.bus.subscribe()
    }
}

/// Runs the suite on cluster nodes that `open(case)` makes, each on its own keyspace.
async fn run_cluster_suite<F, Fut>(open: F)
where
    F: Fn(usize, Arc<ManualClock>, EventBus) -> Fut,
    Fut: std::future::Future<Output = presenced::store::cluster::ClusterStore>,
{
    let mut cases = Vec::new();
    for n in 0..10 {
        let clock = Arc::new(ManualClock::new(T0));
        let bus = EventBus::new(4096);
        let store = open(n, clock.clone(), bus.clone()).await;
        cases.push(Some(Cluster { store, clock, bus }));
    }
    let cases = std::sync::Mutex::new(cases.into_iter());
    run_suite(|| Box::new(cases.lock().unwrap().next().flatten().expect("a prepared case"))).await;
}

fn options() -> ClusterOptions {
    ClusterOptions::new("node-a", 100)
}

/// Two nodes on one store register devices of one user at once, each write a
/// compare-and-swap racing the other node's: every registration must survive, and a
/// write that changes nothing must write nothing.
async fn two_nodes_hammering_one_user_lose_nothing(a: presenced::store::cluster::ClusterStore, b: presenced::store::cluster::ClusterStore) {
    let u = uid("tenant:hot.user@x");
    let writer = |s: presenced::store::cluster::ClusterStore, me: &'static str| {
        let u = u.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                s.register_session(&u, NewSession::new(&format!("{me}-{i}"), me, 600_000)).await.unwrap();
            }
        })
    };
    let (ta, tb) = (writer(a.clone(), "a"), writer(b.clone(), "b"));
    ta.await.unwrap();
    tb.await.unwrap();
    for s in [&a, &b] {
        let devices = s.devices(&u).await.unwrap();
        assert_eq!(devices.len(), 200, "no registration lost");
        assert_eq!(devices.iter().filter(|d| d.device_id.starts_with("a-")).count(), 100);
    }
    let before = a.writes();
    assert!(!a.unregister_session(&u, "no-such-device", None).await.unwrap());
    assert_eq!(a.writes(), before, "a change that changes nothing writes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_backend_conforms() {
    let server = common::nats::NatsServer::start("");
    run_cluster_suite(|n, clock, bus| {
        let env = vec![
            ("PRESENCE_NATS__URLS".to_string(), format!("[\"{}\"]", server.url())),
            ("PRESENCE_NATS__KV__BUCKET".to_string(), format!("case{n}")),
        ];
        async move {
            let cfg = presenced::config::Config::load(None, env).unwrap().nats;
            presenced::store::nats::open(&cfg, options(), clock, bus).await.unwrap()
        }
    })
    .await;
    let cfg =
        presenced::config::Config::load(None, vec![("PRESENCE_NATS__URLS".to_string(), format!("[\"{}\"]", server.url()))]).unwrap().nats;
    let node = |id: &str| {
        presenced::store::nats::open(&cfg, ClusterOptions::new(id, 100), Arc::new(presenced::clock::SystemClock), EventBus::new(64))
    };
    two_nodes_hammering_one_user_lose_nothing(node("node-a").await.unwrap(), node("node-b").await.unwrap()).await;
}

fn redis_config(urls: &[String], cluster: bool, prefix: &str) -> presenced::config::RedisConfig {
    let env = vec![
        ("PRESENCE_REDIS__URLS".to_string(), serde_json::to_string(urls).unwrap()),
        ("PRESENCE_REDIS__CLUSTER".to_string(), cluster.to_string()),
        ("PRESENCE_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
    ];
    presenced::config::Config::load(None, env).unwrap().redis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_conforms() {
    let server = common::redis::RedisServer::start(&[]);
    let urls = vec![server.url()];
    run_cluster_suite(|n, clock, bus| {
        let cfg = redis_config(&urls, false, &format!("case{n}:"));
        async move { presenced::store::redis::open(&cfg, options(), clock, bus).await.unwrap() }
    })
    .await;
    two_redis_nodes_hammer(&urls, false).await;
}

async fn two_redis_nodes_hammer(urls: &[String], cluster: bool) {
    let cfg = redis_config(urls, cluster, "hammer:");
    let node = |id: &str| {
        presenced::store::redis::open(&cfg, ClusterOptions::new(id, 100), Arc::new(presenced::clock::SystemClock), EventBus::new(64))
    };
    two_nodes_hammering_one_user_lose_nothing(node("node-a").await.unwrap(), node("node-b").await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_backend_conforms() {
    let cluster = common::redis::RedisCluster::start();
    let urls = cluster.urls();
    run_cluster_suite(|n, clock, bus| {
        let cfg = redis_config(&urls, true, &format!("case{n}:"));
        async move { presenced::store::redis::open(&cfg, options(), clock, bus).await.unwrap() }
    })
    .await;
    two_redis_nodes_hammer(&urls, true).await;
}
