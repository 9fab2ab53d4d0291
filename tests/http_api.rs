//! REST API v2 over a real socket: every endpoint and every documented error code.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_error, decode, TestServer, ISSUER, SECRET};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use presenced::core::NewSession;
use presenced::core::{EventKind, UserId};
use serde_json::json;

#[tokio::test]
async fn put_then_get_single_multi_and_batch() {
    let s = TestServer::start(&[]).await;
    let t = s.token("alice");
    let (code, body) = s.put_status("alice", Some(&t), json!({"status": "busy", "message": "In a meeting", "ttl": 3600})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["success"], true);
    let p = &body["data"]["alice"];
    assert_eq!(p["user_id"], "alice");
    assert_eq!(p["status"], "busy");
    assert_eq!(p["message"], "In a meeting");
    assert_eq!(p["node_id"], "test-node");
    assert_eq!(p["ttl"], 3600);
    for field in ["last_seen", "updated_at", "expires_at"] {
        let v = p[field].as_str().unwrap_or_else(|| panic!("{field} missing: {p}"));
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).unwrap_or_else(|e| panic!("{field}={v}: {e}"));
    }

    let (code, body) = s.get("/api/v2/presence/alice").await;
    assert_eq!(code, 200);
    assert_eq!(body["data"]["alice"]["status"], "busy");
    assert_eq!(body["data"].as_object().unwrap().len(), 1);

    // Multi read: every requested id comes back; unknown users are offline.
    let (code, body) = s.get("/api/v2/presence?users=alice,ghost,alice").await;
    assert_eq!(code, 200);
    let data = body["data"].as_object().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data["alice"]["status"], "busy");
    assert_eq!(data["ghost"]["status"], "offline");
    assert_eq!(data["ghost"]["last_seen"], serde_json::Value::Null);

    let r = s.client.post(s.url("/api/v2/presence/batch")).json(&json!({"user_ids": ["ghost", "alice", "other"]})).send().await.unwrap();
    let (code, body) = decode(r).await;
    assert_eq!(code, 200);
    let keys: Vec<&String> = body["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3);
    assert_eq!(body["data"]["alice"]["message"], "In a meeting");
    assert_eq!(body["data"]["other"]["status"], "offline");

    // Reads need no token; a reader's token is accepted too.
    let r = s.client.get(s.url("/api/v2/presence/alice")).bearer_auth(s.token("bob")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn writes_publish_typed_events_and_no_op_writes_do_not() {
    let s = TestServer::start(&[]).await;
    let mut rx = s.svc.bus.subscribe();
    let t = s.token("carol");
    assert_eq!(s.put_status("carol", Some(&t), json!({"status": "away"})).await.0, 200);
    assert_eq!(s.put_status("carol", Some(&t), json!({"status": "away"})).await.0, 200);
    assert_eq!(s.put_status("carol", Some(&t), json!({"status": "online", "message": "back"})).await.0, 200);
    let mut kinds = Vec::new();
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
        kinds.push((e.kind, e.presence.status.as_str()));
    }
    assert_eq!(kinds, vec![(EventKind::PresenceUpdated, "away"), (EventKind::PresenceUpdated, "online")]);
    s.stop().await;
}

#[tokio::test]
async fn status_ttl_expires_back_to_derived_status() {
    let s = TestServer::start(&[]).await;
    let mut rx = s.svc.bus.subscribe();
    let t = s.token("dave");
    let (code, body) = s.put_status("dave", Some(&t), json!({"status": "busy", "ttl": 1})).await;
    assert_eq!(code, 200, "{body}");
    let e = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = rx.recv().await.unwrap();
            if e.kind == EventKind::PresenceExpired {
                return e;
            }
        }
    })
    .await
    .expect("expiry event within 5s");
    assert_eq!(e.presence.status.as_str(), "offline");
    let (_, body) = s.get("/api/v2/presence/dave").await;
    assert_eq!(body["data"]["dave"]["status"], "offline");
    assert!(body["data"]["dave"].get("ttl").is_none());

    // ttl 0 = until changed; absent = default_status_ttl (1h).
    let (_, body) = s.put_status("dave", Some(&t), json!({"status": "away", "ttl": 0})).await;
    assert!(body["data"]["dave"].get("expires_at").is_none(), "{body}");
    let (_, body) = s.put_status("dave", Some(&t), json!({"status": "busy"})).await;
    assert_eq!(body["data"]["dave"]["ttl"], 3600);
    // DELETE clears the explicit status.
    let r = s.client.delete(s.url("/api/v2/presence/dave")).bearer_auth(&t).send().await.unwrap();
    let (code, body) = decode(r).await;
    assert_eq!(code, 200);
    assert_eq!(body["data"]["dave"]["status"], "offline");
    s.stop().await;
}

#[tokio::test]
async fn bad_requests_are_400_envelopes() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__MAX_BATCH_IDS", "3"), ("PRESENCE_LIMITS__MAX_MESSAGE_LEN", "10")]).await;
    let t = s.token("alice");
    for body in [
        json!({"status": "sleeping"}),
        json!({"status": "ONLINE"}),
        json!({"message": "no status"}),
        json!({"status": "busy", "message": "far too long a message"}),
        json!({"status": "busy", "message": "bell\u{7}"}),
        json!({"status": "busy", "ttl": -5}),
        json!({"status": "busy", "ttl": 999_999_999}),
        json!({"status": "busy", "ttl": "1h"}),
        json!({"status": "busy", "stauts": "typo"}),
        json!(["not", "an", "object"]),
    ] {
        assert_error(&s.put_status("alice", Some(&t), body.clone()).await, 400, "bad_request");
    }
    // Malformed JSON and empty bodies.
    for raw in ["{", "", "null", "{\"status\": busy}"] {
        let r = s.client.put(s.url("/api/v2/presence/alice")).bearer_auth(&t).body(raw).send().await.unwrap();
        assert_error(&decode(r).await, 400, "bad_request");
    }
    // Bad user ids in path, query and batch.
    let admin = s.admin_token("svc");
    assert_error(&s.put_status("bad%20id", Some(&admin), json!({"status": "busy"})).await, 400, "bad_request");
    assert_error(&s.get("/api/v2/presence/bad%20id").await, 400, "bad_request");
    assert_error(&s.get(&format!("/api/v2/presence/{}", "x".repeat(129))).await, 400, "bad_request");
    assert_error(&s.get("/api/v2/presence?users=a,b%2Fc").await, 400, "bad_request");
    assert_error(&s.get("/api/v2/presence?users=").await, 400, "bad_request");
    assert_error(&s.get("/api/v2/presence").await, 400, "bad_request");
    // Too many ids (limit 3 here).
    assert_error(&s.get("/api/v2/presence?users=a,b,c,d").await, 400, "bad_request");
    assert_eq!(s.get("/api/v2/presence?users=a,b,c").await.0, 200);
    for body in [
        json!({"user_ids": ["a", "b", "c", "d"]}),
        json!({"user_ids": []}),
        json!({"user_ids": ["ok", ""]}),
        json!({}),
        json!({"user_ids": "a"}),
    ] {
        let r = s.client.post(s.url("/api/v2/presence/batch")).json(&body).send().await.unwrap();
        assert_error(&decode(r).await, 400, "bad_request");
    }
    let r = s.client.post(s.url("/api/v2/presence/batch")).body("{not json").send().await.unwrap();
    assert_error(&decode(r).await, 400, "bad_request");
    s.stop().await;
}

fn signed(alg: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn unauthenticated_writes_are_401() {
    let s = TestServer::start(&[]).await;
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let b64 = |v: &str| {
        use std::fmt::Write;
        // base64url without padding, enough for a test header/payload.
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for c in v.as_bytes().chunks(3) {
            let n = c.iter().enumerate().fold(0u32, |a, (i, &x)| a | (u32::from(x) << (16 - 8 * i)));
            for i in 0..=c.len() {
                let _ = write!(out, "{}", T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    };
    let exp = now_s() + 600;
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing"),
        (Some("Basic YWxpY2U6cHc=".into()), "scheme"),
        (Some("Bearer garbage".into()), "malformed"),
        (
            Some(format!("Bearer {}", signed(Algorithm::HS256, &hs, json!({"sub": "alice", "exp": now_s() - 3600, "iss": ISSUER})))),
            "expired",
        ),
        (Some(format!("Bearer {}", signed(Algorithm::HS256, &hs, json!({"sub": "alice", "exp": exp, "iss": "evil"})))), "issuer"),
        (Some(format!("Bearer {}", signed(Algorithm::HS256, &hs, json!({"sub": "alice", "exp": exp})))), "iss"),
        (
            Some(format!(
                "Bearer {}",
                signed(Algorithm::HS256, &EncodingKey::from_secret(b"wrong"), json!({"sub": "alice", "exp": exp, "iss": ISSUER}))
            )),
            "signature",
        ),
        (
            Some(format!(
                "Bearer {}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&format!(r#"{{"sub":"alice","exp":{exp},"iss":"{ISSUER}"}}"#))
            )),
            "alg none",
        ),
        (Some(format!("Bearer {}", signed(Algorithm::HS512, &hs, json!({"sub": "alice", "exp": exp, "iss": ISSUER})))), "HS512"),
    ];
    for (header, why) in cases {
        let mut req = s.client.put(s.url("/api/v2/presence/alice")).json(&json!({"status": "busy"}));
        if let Some(h) = &header {
            req = req.header("authorization", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.headers().get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"), "{why}");
        let resp = decode(r).await;
        assert_error(&resp, 401, "unauthorized");
        let msg = resp.1["error"].as_str().unwrap().to_lowercase();
        let expect = match why {
            "missing" => "missing",
            "scheme" => "bearer",
            "expired" => "expired",
            "issuer" | "iss" => "iss",
            "signature" => "signature",
            "alg none" => "alg none",
            "HS512" => "algorithm",
            _ => "malformed",
        };
        assert!(msg.contains(expect), "{why}: {msg}");
    }
    // Nothing was written.
    assert_error(&s.get("/api/v2/presence/alice").await, 404, "not_found");
    s.stop().await;
}

#[tokio::test]
async fn writing_someone_else_is_403_unless_admin_scope() {
    let s = TestServer::start(&[]).await;
    let resp = s.put_status("alice", Some(&s.token("mallory")), json!({"status": "offline"})).await;
    assert_error(&resp, 403, "forbidden");
    let r = s.client.delete(s.url("/api/v2/presence/alice")).bearer_auth(s.token("mallory")).send().await.unwrap();
    assert_error(&decode(r).await, 403, "forbidden");
    let (code, _) = s.put_status("alice", Some(&s.admin_token("backend")), json!({"status": "away"})).await;
    assert_eq!(code, 200);
    s.stop().await;
}

#[tokio::test]
async fn rs256_and_es256_tokens_with_configured_public_keys() {
    let fixtures = common::source::source_root().join("tests/fixtures");
    let fixtures = fixtures.display();
    for (alg, public, private) in
        [(Algorithm::RS256, "rsa_public.pem", "rsa_private.pem"), (Algorithm::ES256, "ec_public.pem", "ec_private.pem")]
    {
        let key_file = format!("{fixtures}/{public}");
        let s = TestServer::start(&[("PRESENCE_AUTH__PUBLIC_KEY_FILE", &key_file)]).await;
        let pem = std::fs::read(format!("{fixtures}/{private}")).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let token = signed(alg, &key, json!({"sub": "erin", "exp": now_s() + 600, "iss": ISSUER}));
        let (code, body) = s.put_status("erin", Some(&token), json!({"status": "busy"})).await;
        assert_eq!(code, 200, "{alg:?}: {body}");
        // HS256 still works beside it.
        assert_eq!(s.put_status("erin", Some(&s.token("erin")), json!({"status": "away"})).await.0, 200);
        // A token of the other asymmetric family is refused.
        let other = if alg == Algorithm::RS256 { Algorithm::ES256 } else { Algorithm::RS256 };
        let other_pem =
            std::fs::read(format!("{fixtures}/{}", if alg == Algorithm::RS256 { "ec_private.pem" } else { "rsa_private.pem" })).unwrap();
        let other_key = if other == Algorithm::RS256 {
            EncodingKey::from_rsa_pem(&other_pem).unwrap()
        } else {
            EncodingKey::from_ec_pem(&other_pem).unwrap()
        };
        let bad = signed(other, &other_key, json!({"sub": "erin", "exp": now_s() + 600, "iss": ISSUER}));
        assert_error(&s.put_status("erin", Some(&bad), json!({"status": "busy"})).await, 401, "unauthorized");
        s.stop().await;
    }
}

#[tokio::test]
async fn single_get_of_unknown_user_is_404_and_unknown_routes_are_enveloped() {
    let s = TestServer::start(&[]).await;
    assert_error(&s.get("/api/v2/presence/nobody").await, 404, "not_found");
    assert_error(&s.get("/api/v2/nothing-here").await, 404, "not_found");
    assert_error(&s.get("/api").await, 404, "not_found");
    let r = s.client.delete(s.url("/api/v2/presence/batch")).send().await.unwrap();
    assert_error(&decode(r).await, 405, "method_not_allowed");
    let r = s.client.patch(s.url("/api/v2/presence/alice")).send().await.unwrap();
    assert_error(&decode(r).await, 405, "method_not_allowed");
    s.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__MAX_BODY_BYTES", "1KiB")]).await;
    let big = json!({"user_ids": vec!["abcdefgh"; 500]});
    let r = s.client.post(s.url("/api/v2/presence/batch")).json(&big).send().await.unwrap();
    assert_error(&decode(r).await, 413, "payload_too_large");
    s.stop().await;
}

#[tokio::test]
async fn write_rate_limit_is_429_with_retry_after() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__WRITE_RATE_PER_SEC", "1"), ("PRESENCE_LIMITS__WRITE_BURST", "2")]).await;
    let t = s.token("fast");
    assert_eq!(s.put_status("fast", Some(&t), json!({"status": "busy"})).await.0, 200);
    assert_eq!(s.put_status("fast", Some(&t), json!({"status": "away"})).await.0, 200);
    let r = s.client.put(s.url("/api/v2/presence/fast")).bearer_auth(&t).json(&json!({"status": "online"})).send().await.unwrap();
    assert_eq!(r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("1".into()));
    let resp = decode(r).await;
    assert_error(&resp, 429, "rate_limited");
    assert!(resp.1["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0 && ms <= 1000));
    // Another user has their own bucket.
    assert_eq!(s.put_status("slow", Some(&s.token("slow")), json!({"status": "busy"})).await.0, 200);
    let (_, metrics) = (0, s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap());
    assert!(metrics.contains("presence_rate_limited_total"), "{metrics}");
    s.stop().await;
}

#[tokio::test]
async fn store_unavailable_is_503() {
    let s = TestServer::with_store(&[], Arc::new(common::DownStore)).await;
    assert_error(&s.get("/api/v2/presence/alice").await, 503, "unavailable");
    assert_error(&s.get("/api/v2/presence?users=a,b").await, 503, "unavailable");
    assert_error(&s.put_status("alice", Some(&s.token("alice")), json!({"status": "busy"})).await, 503, "unavailable");
    assert_error(&s.get("/health").await, 503, "unavailable");
    s.stop().await;
}

#[tokio::test]
async fn health_cache_and_metrics() {
    let s = TestServer::start(&[]).await;
    let (code, body) = s.get("/health").await;
    assert_eq!(code, 200);
    assert_eq!(body["data"]["status"], "ok");
    assert_eq!(body["data"]["store"]["ready"], true);
    assert_eq!(body["data"]["node_id"], "test-node");

    let before = s.scrape().await;
    let id = UserId::parse("sam", 64).unwrap();
    s.svc.store.register_session(&id, NewSession::new("phone", "gw-1", 60_000)).await.unwrap();
    s.svc.store.register_session(&id, NewSession::new("laptop", "gw-2", 60_000)).await.unwrap();
    assert_eq!(s.put_status("sam", Some(&s.token("sam")), json!({"status": "busy"})).await.0, 200);
    s.get("/api/v2/presence/sam").await;
    s.get("/api/v2/presence/unknown-user").await;

    let (code, body) = s.get("/health/cache").await;
    assert_eq!(code, 200);
    assert!(body["data"]["hits"].as_u64().unwrap() >= 1, "{body}");
    assert!(body["data"]["misses"].as_u64().unwrap() >= 1, "{body}");
    assert!(body["data"]["hit_ratio"].as_f64().is_some());

    let r = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
    };
    assert_eq!(value("presence_sessions"), 2.0);
    assert_eq!(value("presence_online_users"), 1.0);
    // A counter: what this test added (other tests may share the process).
    assert!(value("presence_updates_total") - common::sample(&before, "presence_updates_total") >= 1.0);
    // The embedded store has no cache: its lookups are named for what they are.
    assert!(value(r#"presence_reads_total{result="known"}"#) >= 1.0);
    assert!(value(r#"presence_reads_total{result="unknown"}"#) >= 1.0);
    assert!(!text.contains("presence_cache_hits_total"), "{text}");
    assert!(
        text.contains(r#"http_request_duration_seconds_bucket{route="/api/v2/presence/{user_id}",method="GET",status="200""#),
        "histogram by route and status missing:\n{text}"
    );
    assert!(text.contains(r#"status="404""#));
    // The standard process metrics, and which build runs.
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_cpu_seconds_total") > 0.0);
    assert!(value("process_open_fds") >= 3.0 && value("process_max_fds") >= value("process_open_fds"));
    let started = value("process_start_time_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(started > now - 3600.0 && started <= now + 1.0, "start time {started}, now {now}");
    assert!(text.contains(&format!("presenced_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{text}");
    // The top latency bucket is at least the request timeout (10 s).
    assert!(text.contains(r#"le="10""#) && text.contains(r#"le="60""#), "{text}");
    // Prometheus's own linter has nothing to say about the exposition.
    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; ./scripts/test installs it)");
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(out.status.success(), "promtool: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    s.stop().await;
}

/// Every documented metric is in the first scrape, with its help text, before anything
/// used it; every route is labelled by its template (never "other").
#[tokio::test]
async fn every_metric_is_exported_from_the_start_and_routes_by_template() {
    let s = TestServer::start(&[]).await;
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let exposition = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text");
    for m in presenced::telemetry::METRICS {
        use presenced::telemetry::Scope;
        if matches!(m.scope, Scope::Nats | Scope::Redis | Scope::Cluster | Scope::Sinks) {
            continue;
        }
        assert!(text.contains(&format!("# HELP {} ", m.name)), "no HELP for {}:\n{text}", m.name);
        let sample = if m.kind == presenced::telemetry::Kind::Histogram { format!("{}_count", m.name) } else { m.name.to_string() };
        assert!(exposition.samples.iter().any(|x| x.metric == sample || x.metric == m.name), "{} not exported at start", m.name);
    }
    assert!(!text.contains("nats_") && !text.contains("redis_"), "backend metrics only in cluster mode:\n{text}");
    let admin = s.admin_token("backend");
    for path in ["/api/v2/contacts/al", "/api/v2/conversations/c1/members", "/health/nats", "/health/redis", "/", "/presence/al"] {
        s.client.get(s.url(path)).bearer_auth(&admin).send().await.unwrap();
    }
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for route in
        ["/api/v2/contacts/{user_id}", "/api/v2/conversations/{id}/members", "/health/nats", "/health/redis", "/", "/presence/{user_id}"]
    {
        assert!(text.contains(&format!(r#"route="{route}""#)), "route {route} not labelled:\n{text}");
    }
    assert!(!text.contains(r#"route="other""#), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_closes_the_listener_and_persists() {
    let (config, dir) = common::test_config(&[]);
    let app = presenced::server::App::build(config.clone()).await.unwrap();
    let token = app.svc.auth.mint("pat", Duration::from_secs(60), None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(listener, async move {
        let _ = rx.await;
    }));
    let client = reqwest::Client::new();
    let r = client
        .put(format!("{base}/api/v2/presence/pat"))
        .bearer_auth(&token)
        .json(&json!({"status": "busy", "message": "kept", "ttl": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stops").unwrap().unwrap();
    // The listener is closed...
    assert!(client.get(format!("{base}/health")).send().await.is_err());
    // ...and the status is on disk for the next start.
    let app = presenced::server::App::build(config).await.unwrap();
    let p = presenced::store::get_one(&*app.svc.store, &UserId::parse("pat", 64).unwrap()).await.unwrap().unwrap();
    assert_eq!((p.status.as_str(), &*p.message), ("busy", "kept"));
    app.svc.store.shutdown().await;
    drop(dir);
}

/// A gateway's identity headers sent to a server that wants JWTs: the 401 says how to run
/// it in gateway mode. The live page's icon is served.
#[tokio::test]
async fn gateway_headers_on_a_jwt_server_get_a_hint_and_the_favicon_is_served() {
    let s = TestServer::start(&[]).await;
    let r =
        s.client.put(s.url("/api/v2/presence/alice")).header("X-User-Id", "alice").json(&json!({"status": "busy"})).send().await.unwrap();
    let (code, body) = common::decode(r).await;
    assert_eq!(code, 401);
    assert!(body["error"].as_str().unwrap().contains("PRESENCE_AUTH__MODE=gateway"), "{body}");
    let r = s.client.get(s.url("/favicon.ico")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    assert!(r.text().await.unwrap().starts_with("<svg"));
    s.stop().await;
}
