//! Conversation presence (issue 27, first part): `GET /api/v2/conversations/{id}/presence`
//! gives a conversation's member and online counts and a page of its members as the caller
//! may see them, on the embedded store and across nodes on NATS and Redis.

mod common;

use common::engine::Engine;
use common::wsclient;
use common::*;
use serde_json::{json, Value};

async fn members(s: &TestServer, conv: &str, ids: &[&str]) {
    let r = s
        .client
        .put(s.url(&format!("/api/v2/conversations/{conv}/members")))
        .bearer_auth(s.admin_token("backend"))
        .json(&json!({ "members": ids }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn page(s: &TestServer, token: &str, conv: &str, query: &str) -> (u16, Value) {
    let r = s.client.get(s.url(&format!("/api/v2/conversations/{conv}/presence{query}"))).bearer_auth(token).send().await.unwrap();
    decode(r).await
}

fn ids(v: &Value) -> Vec<String> {
    v["data"]["presences"].as_array().unwrap().iter().map(|p| p["user_id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn counts_pages_and_cursors_for_members_only() {
    let s = TestServer::start(&[NO_GRACE]).await;
    let all: Vec<String> = (0..25).map(|i| format!("m{i:02}")).collect();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    members(&s, "room", &refs).await;
    // Every third member online; m03 busy.
    let mut sockets = Vec::new();
    for i in (0..25).step_by(3) {
        sockets.push(wsclient::connect(&s, &format!("m{i:02}"), "d").await);
    }
    assert_eq!(sockets[1].ack(json!({"type":"presence_update","payload":{"online_status":"busy"},"id":1})).await["type"], "ack");
    let me = s.token("m00");
    let (code, v) = page(&s, &me, "room", "").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["data"]["members"].clone(), v["data"]["online"].clone()), (json!(25), json!(9)), "{v}");
    let online: Vec<String> = (0..25).step_by(3).map(|i| format!("m{i:02}")).collect();
    assert_eq!(ids(&v), online, "online members, by id");
    assert!(v["data"].get("next_cursor").is_none());
    assert_eq!(v["data"]["presences"][1]["status"], "busy");
    // Pages of 10 over everyone, with cursors, in order, nobody twice.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let q = if cursor.is_empty() { "?status=all&limit=10".to_string() } else { format!("?status=all&limit=10&cursor={cursor}") };
        let (code, v) = page(&s, &me, "room", &q).await;
        assert_eq!(code, 200, "{v}");
        seen.extend(ids(&v));
        match v["data"]["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, all);
    let (_, v) = page(&s, &me, "room", "?status=offline&limit=5").await;
    assert_eq!(ids(&v), ["m01", "m02", "m04", "m05", "m07"]);
    assert_eq!(v["data"]["next_cursor"], "m07");
    // Not a member: 403; no token: 401; an admin of an unknown conversation: 404; bad input: 400.
    assert_error(&page(&s, &s.token("stranger"), "room", "").await, 403, "forbidden");
    let r = s.client.get(s.url("/api/v2/conversations/room/presence")).send().await.unwrap();
    assert_eq!(decode(r).await.0, 401);
    assert_eq!(page(&s, &s.admin_token("backend"), "room", "").await.0, 200);
    assert_error(&page(&s, &s.admin_token("backend"), "nowhere", "").await, 404, "not_found");
    for bad in ["?status=idle", "?limit=0", "?limit=1001", "?cursor=a%20b", "?colour=red"] {
        assert_error(&page(&s, &me, "room", bad).await, 400, "bad_request");
    }
    // Membership follows: a member removed is no longer counted, nor allowed.
    members(&s, "room", &refs[..10]).await;
    let (_, v) = page(&s, &me, "room", "").await;
    assert_eq!((v["data"]["members"].clone(), v["data"]["online"].clone()), (json!(10), json!(4)), "{v}");
    assert_error(&page(&s, &s.token("m12"), "room", "").await, 403, "forbidden");
    s.stop().await;
}

/// A hidden member is never counted nor listed online; a contacts-only one only for the
/// viewers among their contacts; counts and pages agree for each viewer.
#[tokio::test]
async fn privacy_makes_counts_and_pages_agree_per_viewer() {
    let s = TestServer::start(&[NO_GRACE]).await;
    members(&s, "c", &["ann", "ben", "cat", "dan"]).await;
    let privacy = |user: &str, body: Value| {
        let req = s.client.put(s.url(&format!("/api/v2/presence/{user}/privacy"))).bearer_auth(s.token(user)).json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(privacy("ben", json!({"visibility": "nobody"})).await, 200);
    assert_eq!(privacy("cat", json!({"visibility": "contacts"})).await, 200);
    let r =
        s.client.put(s.url("/api/v2/contacts/cat")).bearer_auth(s.token("cat")).json(&json!({"contacts": ["ann"]})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let _sockets = [
        wsclient::connect(&s, "ann", "d").await,
        wsclient::connect(&s, "ben", "d").await,
        wsclient::connect(&s, "cat", "d").await,
        wsclient::connect(&s, "dan", "d").await,
    ];
    let srv = &s;
    let view = |who: &str| {
        let t = srv.token(who);
        async move {
            let (code, v) = page(srv, &t, "c", "").await;
            assert_eq!(code, 200, "{v}");
            (v["data"]["online"].as_u64().unwrap(), ids(&v))
        }
    };
    assert_eq!(view("ann").await, (3, vec!["ann".into(), "cat".into(), "dan".into()]), "ann is cat's contact");
    assert_eq!(view("dan").await, (2, vec!["ann".into(), "dan".into()]), "dan is not");
    assert_eq!(view("ben").await, (3, vec!["ann".into(), "ben".into(), "dan".into()]), "ben sees himself");
    let (_, v) = page(&s, &s.token("dan"), "c", "?status=offline").await;
    let hidden = &v["data"]["presences"];
    assert_eq!(ids(&v), ["ben", "cat"]);
    assert!(hidden.as_array().unwrap().iter().all(|p| p["devices"] == json!([]) && p["last_seen"].is_null()), "{hidden}");
    s.stop().await;
}

on_engines!(counts_are_cluster_wide: nats, redis);
/// Members connected to either node are counted online on both.
async fn counts_are_cluster_wide(e: Engine) {
    let a = e.node_with("node-a", &[NO_GRACE]).await;
    let b = e.node_with("node-b", &[NO_GRACE]).await;
    members(&a, "team", &["x1", "x2", "x3"]).await;
    let _x1 = wsclient::connect(&a, "x1", "d").await;
    let mut x2 = wsclient::connect(&b, "x2", "d").await;
    for n in [&a, &b] {
        let t = n.token("x3");
        eventually("both members online on this node", std::time::Duration::from_secs(5), async || {
            let (code, v) = page(n, &t, "team", "").await;
            code == 200 && v["data"]["online"] == 2 && ids(&v) == ["x1", "x2"]
        })
        .await;
    }
    x2.ack(json!({"type":"bye","id":1})).await;
    for n in [&a, &b] {
        let t = n.token("x3");
        eventually("x2 gone on this node", std::time::Duration::from_secs(5), async || {
            page(n, &t, "team", "").await.1["data"]["online"] == 1
        })
        .await;
    }
    a.stop().await;
    b.stop().await;
}
