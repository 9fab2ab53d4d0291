//! Hot paths of the embedded node: `cargo bench --bench hot_paths`.
//!
//! Store level (the engine alone) and router level (HTTP routing, auth, JSON encoding,
//! metrics middleware; no socket). The socket-level throughput figure comes from `wrk`,
//! see the README's benchmark section.

use presenced::store::PresenceStore as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use divan::Bencher;
use presenced::bus::EventBus;
use presenced::clock::SystemClock;
use presenced::core::NewSession;
use presenced::core::{Status, UserId};
use presenced::store::memory::{MemoryConfig, MemoryStore};
use presenced::store::SetStatus;
use tower::ServiceExt;

fn main() {
    divan::main();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

const USERS: usize = 100_000;

/// A store holding `USERS` users, each with one live session and an explicit status.
fn populated(rt: &tokio::runtime::Runtime, data_dir: Option<std::path::PathBuf>) -> (MemoryStore, Vec<UserId>) {
    let mut cfg = MemoryConfig::new("bench");
    cfg.data_dir = data_dir;
    let store = MemoryStore::open(cfg, Arc::new(SystemClock), EventBus::new(1 << 16)).unwrap();
    let ids: Vec<UserId> = (0..USERS).map(|i| UserId::parse(&format!("user-{i}"), 128).unwrap()).collect();
    rt.block_on(async {
        store.start();
        for id in &ids {
            store.register_session(id, NewSession::new("phone", "gw-1", 600_000)).await.unwrap();
        }
    });
    (store, ids)
}

#[divan::bench]
fn store_single_read(b: Bencher) {
    let rt = rt();
    let (store, ids) = populated(&rt, None);
    let mut i = 0usize;
    b.bench_local(|| {
        i = (i + 7919) % USERS;
        rt.block_on(store.get_many(std::slice::from_ref(&ids[i]))).unwrap()
    });
}

#[divan::bench]
fn store_batch_read_100(b: Bencher) {
    let rt = rt();
    let (store, ids) = populated(&rt, None);
    let mut i = 0usize;
    b.bench_local(|| {
        i = (i + 101) % (USERS - 100);
        rt.block_on(store.get_many(&ids[i..i + 100])).unwrap()
    });
}

#[divan::bench]
fn store_session_refresh(b: Bencher) {
    let rt = rt();
    let (store, ids) = populated(&rt, None);
    let mut i = 0usize;
    b.bench_local(|| {
        i = (i + 7919) % USERS;
        rt.block_on(store.refresh_session(&ids[i], "phone")).unwrap()
    });
}

#[divan::bench]
fn store_status_write_in_memory(b: Bencher) {
    let rt = rt();
    let (store, ids) = populated(&rt, None);
    let mut i = 0usize;
    let statuses = [Status::Busy, Status::Away];
    b.bench_local(|| {
        i += 1;
        let req = SetStatus { status: statuses[i % 2], message: Arc::from("In a meeting"), ttl_ms: Some(3_600_000) };
        rt.block_on(store.set_status(&ids[i % USERS], req)).unwrap()
    });
}

/// Durable write: returns after the group commit (fsync) that holds it. Run alone, one
/// writer: this is the latency of one acknowledged write, not the throughput.
#[divan::bench(sample_count = 20, sample_size = 5)]
fn store_status_write_durable(b: Bencher) {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let (store, ids) = populated(&rt, Some(dir.path().to_path_buf()));
    let mut i = 0usize;
    let statuses = [Status::Busy, Status::Away];
    b.bench_local(|| {
        i += 1;
        let req = SetStatus { status: statuses[i % 2], message: Arc::from("x"), ttl_ms: None };
        rt.block_on(store.set_status(&ids[i % USERS], req)).unwrap()
    });
}

/// Durable writes from 256 concurrent writers: group commit amortises the fsync.
#[divan::bench(sample_count = 10, sample_size = 1)]
fn store_status_write_durable_256_concurrent(b: Bencher) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (store, ids) = populated(&rt, Some(dir.path().to_path_buf()));
    let ids = Arc::new(ids);
    b.counter(divan::counter::ItemsCount::new(256usize)).bench_local(|| {
        rt.block_on(async {
            let mut tasks = Vec::with_capacity(256);
            for w in 0..256usize {
                let store = store.clone();
                let ids = ids.clone();
                tasks.push(tokio::spawn(async move {
                    let req =
                        SetStatus { status: if w % 2 == 0 { Status::Busy } else { Status::Away }, message: Arc::from("x"), ttl_ms: None };
                    store.set_status(&ids[w * 13 % USERS], req).await.unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    });
}

fn router_fixture(rt: &tokio::runtime::Runtime) -> (axum::Router, presenced::server::App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("PRESENCE_AUTH__JWT_SECRET".to_string(), "bench-secret-bench-secret-bench-secret".to_string()),
        ("PRESENCE_SERVICE__DATA_DIR".to_string(), dir.path().display().to_string()),
        ("PRESENCE_LIMITS__WRITE_RATE_PER_SEC".to_string(), "1000000000".to_string()),
        ("PRESENCE_LIMITS__WRITE_BURST".to_string(), "1000000000".to_string()),
    ];
    let config = presenced::config::Config::load(None, env).unwrap();
    let app = rt.block_on(async { presenced::server::App::build(config).await.unwrap() });
    rt.block_on(async {
        for i in 0..1000 {
            let id = UserId::parse(&format!("user-{i}"), 128).unwrap();
            app.svc.store.register_session(&id, NewSession::new("phone", "gw", 600_000)).await.unwrap();
        }
    });
    (app.router(), app, dir)
}

#[divan::bench]
fn router_single_read(b: Bencher) {
    let rt = rt();
    let (router, _app, _dir) = router_fixture(&rt);
    let mut i = 0usize;
    b.bench_local(|| {
        i = (i + 7) % 1000;
        let req = Request::get(format!("/api/v2/presence/user-{i}")).body(Body::empty()).unwrap();
        let resp = rt.block_on(router.clone().oneshot(req)).unwrap();
        assert!(resp.status().is_success());
        black_box(resp)
    });
}

#[divan::bench]
fn router_batch_read_100(b: Bencher) {
    let rt = rt();
    let (router, _app, _dir) = router_fixture(&rt);
    let body = serde_json::json!({ "user_ids": (0..100).map(|i| format!("user-{i}")).collect::<Vec<_>>() }).to_string();
    b.bench_local(|| {
        let req = Request::post("/api/v2/presence/batch").body(Body::from(body.clone())).unwrap();
        let resp = rt.block_on(async {
            let r = router.clone().oneshot(req).await.unwrap();
            http_body_util::BodyExt::collect(r.into_body()).await.unwrap().to_bytes()
        });
        black_box(resp)
    });
}

#[divan::bench(sample_count = 20, sample_size = 5)]
fn router_status_write_with_jwt(b: Bencher) {
    let rt = rt();
    let (router, app, _dir) = router_fixture(&rt);
    let token = app.svc.auth.mint("user-1", Duration::from_secs(3600), None).unwrap();
    let mut i = 0usize;
    b.bench_local(|| {
        i += 1;
        let status = if i.is_multiple_of(2) { "busy" } else { "away" };
        let req = Request::put("/api/v2/presence/user-1")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(format!(r#"{{"status":"{status}","message":"m","ttl":60}}"#)))
            .unwrap();
        let resp = rt.block_on(router.clone().oneshot(req)).unwrap();
        assert!(resp.status().is_success());
        black_box(resp)
    });
}
