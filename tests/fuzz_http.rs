//! Property tests: random or hostile input never crashes the server, never yields a 5xx,
//! and is always answered with the JSON envelope (4xx with `success: false` and an `error`).

mod common;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn encode_path(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sends one request through the real router and checks the envelope contract.
async fn check(app: &axum::Router, req: Request<Body>) -> Result<u16, TestCaseError> {
    let resp = app.clone().oneshot(req).await.map_err(|e| TestCaseError::fail(format!("router error: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.map_err(|e| TestCaseError::fail(e.to_string()))?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| TestCaseError::fail(format!("status {status}: not JSON ({e}): {:?}", String::from_utf8_lossy(&bytes))))?;
    prop_assert!(status < 500, "server error {status}: {v}");
    if status == 200 {
        prop_assert_eq!(&v["success"], &serde_json::Value::Bool(true), "{}", v);
    } else {
        prop_assert!((400..500).contains(&status), "unexpected {status}");
        prop_assert_eq!(&v["success"], &serde_json::Value::Bool(false), "{}", v);
        prop_assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{}", v);
    }
    Ok(status)
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
        prop_oneof![Just("online"), Just("away"), Just("busy"), Just("offline")].prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::hash_map(
                prop_oneof![
                    Just("status".to_string()),
                    Just("message".to_string()),
                    Just("ttl".to_string()),
                    Just("user_ids".to_string()),
                    ".{0,8}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_token() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        ".{0,60}".prop_map(Some),
        "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}".prop_map(|t| Some(format!("Bearer {t}"))),
        Just(Some("Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.".to_string())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_requests_get_envelopes(
        user in prop_oneof![".{0,200}", "[a-z]{1,10}"],
        users_q in ".{0,120}",
        body in prop_oneof![arb_json().prop_map(|v| v.to_string().into_bytes()), prop::collection::vec(any::<u8>(), 0..200)],
        token in arb_token(),
        which in 0..5u8,
    ) {
        let rt = runtime();
        let (config, _dir) = common::test_config(&[]);
        rt.block_on(async {
            let app = presenced::server::App::build(config).await.unwrap();
            let router = app.router();
            let path_user = encode_path(&user);
            let (method, uri) = match which {
                0 => ("GET", format!("/api/v2/presence/{path_user}")),
                1 => ("PUT", format!("/api/v2/presence/{path_user}")),
                2 => ("GET", format!("/api/v2/presence?users={}", encode_path(&users_q))),
                3 => ("POST", "/api/v2/presence/batch".to_string()),
                _ => ("DELETE", format!("/api/v2/presence/{path_user}")),
            };
            let mut req = Request::builder().method(method).uri(&uri).header("content-type", "application/json");
            if let Some(t) = &token {
                if let Ok(v) = axum::http::HeaderValue::from_str(t) {
                    req = req.header("authorization", v);
                }
            }
            let req = req.body(Body::from(body.clone())).map_err(|e| TestCaseError::fail(e.to_string()))?;
            check(&router, req).await?;
            // A valid token for the path user must never turn random input into a 5xx either.
            if which == 1 {
                if let Ok(t) = app.svc.auth.mint(if user.is_empty() { "x" } else { &user }, std::time::Duration::from_secs(60), None) {
                    let req = Request::builder().method("PUT").uri(&uri).header("authorization", format!("Bearer {t}")).body(Body::from(body)).unwrap();
                    check(&router, req).await?;
                }
            }
            app.svc.store.shutdown().await;
            Ok::<(), TestCaseError>(())
        })?;
    }
}

/// Raw bytes on a real socket (broken request lines, bad headers, truncated bodies): the
/// server answers or closes, and keeps serving everyone else.
#[tokio::test]
async fn garbage_on_the_wire_does_not_take_the_server_down() {
    let s = common::TestServer::start(&[]).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strat = prop::collection::vec(any::<u8>(), 0..512);
    let fixed: Vec<Vec<u8>> = vec![
        b"GET /api/v2/presence/%ZZ HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PUT /api/v2/presence/a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{".to_vec(),
        b"POST /api/v2/presence/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n".to_vec(),
        b"GET /api/v2/presence/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(),
    ];
    let mut inputs = fixed;
    for _ in 0..64 {
        inputs.push(strat.new_tree(&mut runner).unwrap().current());
    }
    for bytes in inputs {
        if let Ok(mut sock) = tokio::net::TcpStream::connect(&addr).await {
            let _ = sock.write_all(&bytes).await;
            let _ = sock.shutdown().await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), sock.read_to_end(&mut buf)).await;
            let text = String::from_utf8_lossy(&buf);
            assert!(!text.starts_with("HTTP/1.1 5"), "server error for {bytes:?}: {text}");
        }
    }
    let (code, body) = s.get("/health").await;
    assert_eq!(code, 200, "{body}");
    s.stop().await;
}
