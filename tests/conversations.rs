//! Conversation presence (issue 27): `GET /api/v2/conversations/{id}/presence` gives a
//! conversation's member and online counts and a page of its members as the caller may
//! see them; a WebSocket `subscribe {conversation_ids}` gets the same as a snapshot, then
//! each change (small conversations: every member change as a `presence_update` and the
//! counts at once; large ones: one `conversation_presence` per interval). On the embedded
//! store and across nodes on NATS and Redis.

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

const LARGE: [(&str, &str); 2] =
    [("PRESENCE_LIMITS__CONVERSATION_LIVE_MEMBERS", "3"), ("PRESENCE_PRESENCE__CONVERSATION_INTERVAL", "400ms")];

async fn subscribe(c: &mut wsclient::Client, conv: &str) -> Value {
    let ack = c.ack(json!({"type":"subscribe","payload":{"conversation_ids":[conv]},"id":"sub"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let snap = c.recv_type("conversation_presence").await;
    assert_eq!(snap["payload"]["snapshot"], true, "{snap}");
    assert_eq!(snap["payload"]["conversation_id"], conv);
    snap["payload"].clone()
}

/// The next `conversation_presence` update (not a snapshot), with nothing but updates of
/// members' presence before it (whose user ids are returned too).
async fn next_counts(c: &mut wsclient::Client) -> (Value, Vec<String>) {
    let mut pushed = Vec::new();
    loop {
        let m = c.recv().await;
        match m["type"].as_str() {
            Some("conversation_presence") => return (m["payload"].clone(), pushed),
            Some("presence_update") => pushed.push(m["payload"]["user_id"].as_str().unwrap().to_string()),
            _ => panic!("unexpected {m}"),
        }
    }
}

fn listed(p: &Value) -> Vec<String> {
    p["presences"].as_array().unwrap().iter().map(|p| p["user_id"].as_str().unwrap().to_string()).collect()
}

fn counts(p: &Value) -> (u64, u64) {
    (p["members"].as_u64().unwrap(), p["online"].as_u64().unwrap())
}

/// Small conversation: the snapshot, then each member change as a `presence_update` and
/// the counts when they move; forbidden for non-members; unsubscribe stops it all.
#[tokio::test]
async fn a_small_conversation_pushes_each_change_and_its_counts() {
    let s = TestServer::start(&[NO_GRACE]).await;
    members(&s, "chat", &["viv", "amy", "bob", "cid"]).await;
    let _amy = wsclient::connect(&s, "amy", "d").await;
    let mut viv = wsclient::connect(&s, "viv", "d").await;
    let snap = subscribe(&mut viv, "chat").await;
    assert_eq!(counts(&snap), (4, 2), "{snap}");
    assert_eq!(listed(&snap), ["amy", "viv"]);
    assert!(snap.get("next_cursor").is_none());
    assert_eq!(snap["presences"][0]["status"], "online");
    // bob comes: his presence, then the count with him (the list of members online
    // changes with the count).
    let mut bob = wsclient::connect(&s, "bob", "d").await;
    let (p, pushed) = next_counts(&mut viv).await;
    assert_eq!((counts(&p), p["snapshot"].clone(), listed(&p)), ((4, 3), json!(false), vec!["bob".to_string()]), "{p}");
    assert_eq!(pushed, ["bob"]);
    // busy: a presence, no count (it did not move).
    bob.ack(json!({"type":"presence_update","payload":{"online_status":"busy"},"id":1})).await;
    assert_eq!(viv.presence_of("bob").await["status"], "busy");
    // bob leaves: offline, then the count.
    bob.ack(json!({"type":"bye","id":2})).await;
    let (p, pushed) = next_counts(&mut viv).await;
    assert_eq!((counts(&p), listed(&p)), ((4, 2), vec!["bob".to_string()]), "{p}");
    assert_eq!(p["presences"][0]["status"], "offline");
    assert_eq!(pushed, ["bob"]);
    // Others are refused; bad input too; a conversation with no members is 404 for an admin.
    let mut eve = wsclient::connect(&s, "eve", "d").await;
    let e = eve.ack(json!({"type":"subscribe","payload":{"conversation_ids":["chat"]},"id":"x"})).await;
    assert_eq!((e["type"].clone(), e["payload"]["code"].clone()), (json!("error"), json!("forbidden")), "{e}");
    let e = viv.ack(json!({"type":"subscribe","payload":{"conversation_ids":["a b"]},"id":"y"})).await;
    assert_eq!(e["payload"]["code"], "bad_request", "{e}");
    let e = viv.ack(json!({"type":"subscribe","payload":{},"id":"z"})).await;
    assert_eq!(e["payload"]["code"], "bad_request", "{e}");
    // Unsubscribed: nothing more about cid.
    let a = viv.ack(json!({"type":"unsubscribe","payload":{"conversation_ids":["chat"]},"id":"u"})).await;
    assert_eq!(a["type"], "ack");
    let _cid = wsclient::connect(&s, "cid", "d").await;
    viv.silent(500).await;
    s.stop().await;
}

/// Large conversation: no per-member pushes; the changes of an interval come together in
/// one `conversation_presence` with the counts, shared by every viewer.
#[tokio::test]
async fn a_large_conversation_sends_the_changes_of_each_interval_together() {
    let s = TestServer::start(&[NO_GRACE, LARGE[0], LARGE[1]]).await;
    members(&s, "hall", &["v1", "v2", "m1", "m2", "m3", "m4"]).await;
    let mut v1 = wsclient::connect(&s, "v1", "d").await;
    let mut v2 = wsclient::connect(&s, "v2", "d").await;
    assert_eq!(counts(&subscribe(&mut v1, "hall").await), (6, 2));
    assert_eq!(counts(&subscribe(&mut v2, "hall").await), (6, 2));
    let mut joined = Vec::new();
    for m in ["m1", "m2", "m3"] {
        joined.push(wsclient::connect(&s, m, "d").await);
    }
    for v in [&mut v1, &mut v2] {
        let mut seen = Vec::new();
        let mut messages = 0;
        while seen.len() < 3 {
            let (p, pushed) = next_counts(v).await;
            assert!(pushed.is_empty(), "no presence_update in a large conversation: {pushed:?}");
            assert_eq!(p["snapshot"], false);
            messages += 1;
            seen.extend(listed(&p));
            if seen.len() == 3 {
                assert_eq!(counts(&p), (6, 5), "{p}");
            }
        }
        seen.sort();
        assert_eq!(seen, ["m1", "m2", "m3"]);
        assert!(messages <= 2, "three joins within an interval come in one or two messages, not {messages}");
    }
    // One leaves: its presence (offline) and the count, once.
    joined.pop().unwrap().ack(json!({"type":"bye","id":1})).await;
    let (p, _) = next_counts(&mut v1).await;
    assert_eq!((counts(&p), listed(&p)), ((6, 4), vec!["m3".to_string()]), "{p}");
    assert_eq!(p["presences"][0]["status"], "offline");
    v1.silent(900).await;
    s.stop().await;
}

/// A join storm in a large conversation (more changes in one interval than a page
/// holds): a fresh snapshot of one page instead of the changes, with the counts.
#[tokio::test]
async fn a_join_storm_in_a_large_conversation_sends_one_page_not_every_change() {
    let s = TestServer::start(&[NO_GRACE, LARGE[0], LARGE[1], ("PRESENCE_LIMITS__CONVERSATION_PAGE", "2")]).await;
    members(&s, "arena", &["w0", "w1", "a1", "a2", "a3", "a4"]).await;
    let mut w0 = wsclient::connect(&s, "w0", "d").await;
    let snap = subscribe(&mut w0, "arena").await;
    assert_eq!((counts(&snap), listed(&snap)), ((6, 1), vec!["w0".to_string()]));
    let mut joined = Vec::new();
    for m in ["a1", "a2", "a3", "a4"] {
        joined.push(wsclient::connect(&s, m, "d").await);
    }
    // Within an interval or two: a snapshot of the first page, then nothing pending.
    loop {
        let m = w0.recv_type("conversation_presence").await;
        if m["payload"]["snapshot"] == true {
            assert_eq!(counts(&m["payload"]), (6, 5), "{m}");
            assert_eq!(listed(&m["payload"]), ["a1", "a2"]);
            assert_eq!(m["payload"]["next_cursor"], "a2");
            break;
        }
        assert!(listed(&m["payload"]).len() <= 2, "a message holds at most a page: {m}");
    }
    s.stop().await;
}

/// Members added and removed mid-subscription: counts and lists follow at once (small),
/// a viewer removed is told and unsubscribed.
#[tokio::test]
async fn membership_changes_reach_live_subscriptions() {
    for env in [vec![NO_GRACE], vec![NO_GRACE, LARGE[0], LARGE[1]]] {
        let s = TestServer::start(&env).await;
        members(&s, "g", &["ada", "ian"]).await;
        let _kim = wsclient::connect(&s, "kim", "d").await;
        let mut ada = wsclient::connect(&s, "ada", "d").await;
        let mut ian = wsclient::connect(&s, "ian", "d").await;
        assert_eq!(counts(&subscribe(&mut ada, "g").await), (2, 2));
        assert_eq!(counts(&subscribe(&mut ian, "g").await), (2, 2));
        members(&s, "g", &["ada", "ian", "kim", "lou"]).await;
        let (p, _) = next_counts(&mut ada).await;
        assert_eq!((counts(&p), listed(&p)), ((4, 3), vec!["kim".to_string()]), "kim is online: {p}");
        members(&s, "g", &["ada", "kim", "lou"]).await;
        let e = ian.recv_type("error").await;
        assert_eq!((e["payload"]["code"].clone(), e["payload"]["conversation_id"].clone()), (json!("forbidden"), json!("g")), "{e}");
        let (p, _) = next_counts(&mut ada).await;
        assert_eq!((counts(&p), p["removed"].clone()), ((3, 2), json!(["ian"])), "{p}");
        // ian hears nothing more of g.
        let _lou = wsclient::connect(&s, "lou", "d").await;
        let (p, _) = next_counts(&mut ada).await;
        assert_eq!(counts(&p), (3, 3), "{p}");
        ian.silent(700).await;
        s.stop().await;
    }
}

/// Live counts follow privacy as the pages do: an invisible member moves no count and
/// sends nothing; a contacts-only one counts for their contacts only; each viewer's count
/// agrees with its REST page. In small and large conversations.
#[tokio::test]
async fn live_counts_keep_privacy_and_agree_with_the_pages() {
    for env in [vec![NO_GRACE], vec![NO_GRACE, LARGE[0], LARGE[1]]] {
        let s = TestServer::start(&env).await;
        members(&s, "p", &["ann", "ben", "cat", "dan"]).await;
        let set = |user: &str, path: &str, body: Value| {
            let req = s.client.put(s.url(&format!("/api/v2/{path}/{user}"))).bearer_auth(s.token(user)).json(&body);
            async move { assert_eq!(req.send().await.unwrap().status(), 200) }
        };
        s.client
            .put(s.url("/api/v2/presence/ben/privacy"))
            .bearer_auth(s.token("ben"))
            .json(&json!({"visibility":"nobody"}))
            .send()
            .await
            .unwrap();
        s.client
            .put(s.url("/api/v2/presence/cat/privacy"))
            .bearer_auth(s.token("cat"))
            .json(&json!({"visibility":"contacts"}))
            .send()
            .await
            .unwrap();
        set("cat", "contacts", json!({"contacts":["ann"]})).await;
        let mut ann = wsclient::connect(&s, "ann", "d").await;
        let mut dan = wsclient::connect(&s, "dan", "d").await;
        assert_eq!(counts(&subscribe(&mut ann, "p").await), (4, 2));
        assert_eq!(counts(&subscribe(&mut dan, "p").await), (4, 2));
        let mut ben = wsclient::connect(&s, "ben", "d").await;
        let mut cat = wsclient::connect(&s, "cat", "d").await;
        let (p, pushed) = next_counts(&mut ann).await;
        assert_eq!(counts(&p), (4, 3), "ann sees cat, not ben: {p}");
        assert!(!pushed.contains(&"ben".to_string()) && !listed(&p).contains(&"ben".to_string()), "{p}");
        dan.silent(900).await; // neither ben nor cat shows to dan: not even the moment
                               // ben sees himself; cat sees herself.
        assert_eq!(counts(&subscribe(&mut ben, "p").await), (4, 3));
        let snap = subscribe(&mut cat, "p").await;
        assert_eq!((counts(&snap), listed(&snap)), ((4, 3), vec!["ann".to_string(), "cat".into(), "dan".into()]));
        for (who, online) in [("ann", 3), ("dan", 2), ("ben", 3), ("cat", 3)] {
            let (_, v) = page(&s, &s.token(who), "p", "").await;
            assert_eq!(v["data"]["online"], online, "{who}'s page agrees with its live count: {v}");
        }
        // cat drops ann: ann's count goes down, dan's does not move.
        set("cat", "contacts", json!({"contacts":[]})).await;
        let (p, _) = next_counts(&mut ann).await;
        assert_eq!(counts(&p), (4, 2), "{p}");
        dan.silent(900).await;
        s.stop().await;
    }
}

on_engines!(live_counts_are_cluster_wide: nats, redis);
/// A viewer on one node follows members on the other, and a membership change made
/// through the other node.
async fn live_counts_are_cluster_wide(e: Engine) {
    for env in [vec![NO_GRACE], vec![NO_GRACE, LARGE[0], LARGE[1]]] {
        let a = e.node_with("node-a", &env).await;
        let b = e.node_with("node-b", &env).await;
        members(&a, "crew", &["y0", "y1", "y2", "y3"]).await;
        let mut y0 = wsclient::connect(&a, "y0", "d").await;
        eventually("node b knows the members", std::time::Duration::from_secs(5), async || {
            page(&b, &b.token("y1"), "crew", "").await.0 == 200
        })
        .await;
        assert_eq!(counts(&subscribe(&mut y0, "crew").await), (4, 1));
        let _y1 = wsclient::connect(&b, "y1", "d").await;
        let (p, _) = next_counts(&mut y0).await;
        assert_eq!(counts(&p), (4, 2), "{p}");
        members(&b, "crew", &["y0", "y1", "y2", "y3", "y4"]).await;
        let (p, _) = next_counts(&mut y0).await;
        assert_eq!(counts(&p), (5, 2), "{p}");
        let mut y2 = wsclient::connect(&b, "y2", "d").await;
        let (p, _) = next_counts(&mut y0).await;
        assert_eq!(counts(&p), (5, 3), "{p}");
        y2.ack(json!({"type":"bye","id":1})).await;
        let (p, _) = next_counts(&mut y0).await;
        assert_eq!(counts(&p), (5, 2), "{p}");
        a.stop().await;
        b.stop().await;
    }
}

fn grpc_as<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// gRPC: `GetConversationPresence` pages as REST does, with the same refusals;
/// `WatchPresence { conversation_ids }` sends the members' state, their changes, a member
/// who joins, and ends with PERMISSION_DENIED when the caller is removed.
#[tokio::test]
async fn grpc_reads_and_watches_a_conversation() {
    use presenced::grpc::pb;
    use presenced::grpc::pb::get_conversation_presence_request::Listed;
    let s = TestServer::start(&[NO_GRACE]).await;
    let mut c = pb::presence_api_client::PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    members(&s, "ops", &["oa", "ob", "oc", "od"]).await;
    let _oa = wsclient::connect(&s, "oa", "d").await;
    let _oc = wsclient::connect(&s, "oc", "d").await;
    let req = |listed: Listed, limit: u32, cursor: &str| pb::GetConversationPresenceRequest {
        conversation_id: "ops".into(),
        listed: listed as i32,
        limit,
        cursor: cursor.into(),
    };
    let r = c.get_conversation_presence(grpc_as(req(Listed::Online, 0, ""), &s.token("ob"))).await.unwrap().into_inner();
    assert_eq!((r.members, r.online, r.next_cursor.as_str()), (4, 2, ""));
    assert_eq!(r.presences.iter().map(|p| p.user_id.as_str()).collect::<Vec<_>>(), ["oa", "oc"]);
    let r = c.get_conversation_presence(grpc_as(req(Listed::All, 3, ""), &s.token("ob"))).await.unwrap().into_inner();
    assert_eq!((r.presences.len(), r.next_cursor.as_str()), (3, "oc"));
    let r = c.get_conversation_presence(grpc_as(req(Listed::All, 3, "oc"), &s.token("ob"))).await.unwrap().into_inner();
    assert_eq!((r.presences[0].user_id.as_str(), r.next_cursor.as_str()), ("od", ""));
    let code = |r: Result<tonic::Response<pb::GetConversationPresenceResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(c.get_conversation_presence(grpc_as(req(Listed::Online, 0, ""), &s.token("zed"))).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(code(c.get_conversation_presence(req(Listed::Online, 0, "")).await), tonic::Code::Unauthenticated);
    assert_eq!(
        code(c.get_conversation_presence(grpc_as(req(Listed::Online, 1001, ""), &s.token("ob"))).await),
        tonic::Code::InvalidArgument
    );
    let mut unknown = req(Listed::Online, 0, "");
    unknown.conversation_id = "nope".into();
    assert_eq!(code(c.get_conversation_presence(grpc_as(unknown, &s.admin_token("svc"))).await), tonic::Code::NotFound);

    // Watching the conversation's members.
    let watch = pb::WatchPresenceRequest { user_ids: vec![], all: false, conversation_ids: vec!["ops".into()] };
    let e = c.watch_presence(grpc_as(watch.clone(), &s.token("zed"))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let mut stream = c.watch_presence(grpc_as(watch, &s.token("ob"))).await.unwrap().into_inner();
    let mut snap = Vec::new();
    for _ in 0..4 {
        let ev = next_event(&mut stream).await.unwrap().unwrap();
        assert!(ev.snapshot);
        snap.push(ev.presence.unwrap().user_id);
    }
    snap.sort();
    assert_eq!(snap, ["oa", "ob", "oc", "od"]);
    let _od = wsclient::connect(&s, "od", "d").await;
    let ev = next_event(&mut stream).await.unwrap().unwrap();
    assert_eq!((ev.presence.unwrap().user_id.as_str(), ev.snapshot), ("od", false));
    // A member joins: its state comes, then its changes.
    members(&s, "ops", &["oa", "ob", "oc", "od", "oe"]).await;
    let ev = next_event(&mut stream).await.unwrap().unwrap();
    assert_eq!((ev.presence.unwrap().user_id.as_str(), ev.snapshot), ("oe", true));
    let _oe = wsclient::connect(&s, "oe", "d").await;
    let ev = next_event(&mut stream).await.unwrap().unwrap();
    assert_eq!((ev.presence.unwrap().user_id.as_str(), ev.snapshot), ("oe", false));
    // The caller is removed: the stream ends.
    members(&s, "ops", &["oa", "oc", "od", "oe"]).await;
    let e = next_event(&mut stream).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    s.stop().await;
}

async fn next_event(
    stream: &mut tonic::Streaming<presenced::grpc::pb::PresenceEvent>,
) -> Result<Option<presenced::grpc::pb::PresenceEvent>, tonic::Status> {
    tokio::time::timeout(std::time::Duration::from_secs(5), stream.message()).await.expect("an event within 5s")
}

on_engines!(a_node_back_on_the_engine_resyncs_its_watchers: nats, redis);
/// The engine goes away and comes back; a member leaves meanwhile through node a. Events
/// published while node b's subscriptions were down never reach it, so b reads its
/// watched users again once its subscriptions are back: the departure reaches the room's
/// counts, a WebSocket watcher by user id and a gRPC watch stream on b. (NATS keeps its
/// data: a's held write lands after the restart. Redis here runs without persistence and
/// comes back empty: the departure changes no record, and only b's read shows it.)
async fn a_node_back_on_the_engine_resyncs_its_watchers(mut e: Engine) {
    use futures_util::StreamExt;
    use presenced::grpc::pb;
    // The nodes' logs, shown if the test fails (an outage's order of events is timing).
    let _ = tracing_subscriber::fmt().with_env_filter("presenced=debug").with_test_writer().try_init();
    // Renewals every half second: the write-backs that follow the restart come soon.
    let fast = ("PRESENCE_PRESENCE__NODE_LEASE_TTL", "1500ms");
    let a = e.node_with("node-a", &[NO_GRACE, fast]).await;
    let b = e.node_with("node-b", &[NO_GRACE, fast]).await;
    members(&a, "den", &["z0", "z1", "z2"]).await;
    eventually("node b knows the members", std::time::Duration::from_secs(5), async || page(&b, &b.token("z0"), "den", "").await.0 == 200)
        .await;
    let z1 = wsclient::connect(&a, "z1", "d").await;
    let _z2 = wsclient::connect(&a, "z2", "d").await; // stays: must not be read offline
    let mut z0 = wsclient::connect(&b, "z0", "d").await;
    assert_eq!(counts(&subscribe(&mut z0, "den").await), (3, 3));
    let mut w = wsclient::connect(&b, "w", "d").await;
    let ack = w.ack(json!({"type":"subscribe","payload":{"user_ids":["z1"]},"id":"s"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(w.presence_of("z1").await["status"], "online");
    let mut grpc = pb::presence_api_client::PresenceApiClient::connect(b.grpc.clone()).await.unwrap();
    let watch = pb::WatchPresenceRequest { user_ids: vec!["z1".into()], all: false, conversation_ids: vec![] };
    let mut stream = grpc.watch_presence(grpc_as(watch, &b.token("w"))).await.unwrap().into_inner();
    let first = next_event(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.presence.unwrap().status, pb::Status::Online as i32);

    e.stop();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop(z1); // node a holds the departure while cut off
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    e.restart();

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = tokio::time::timeout_at(deadline, z0.ws.next()).await.expect("z1's departure counted within 30 s");
        let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = m else { continue };
        let m: Value = serde_json::from_str(&t).unwrap();
        if m["type"] == "conversation_presence" && counts(&m["payload"]) == (3, 2) {
            break;
        }
    }
    loop {
        let m = tokio::time::timeout_at(deadline, w.ws.next()).await.expect("the watcher by user id sees z1 offline within 30 s");
        let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = m else { continue };
        let m: Value = serde_json::from_str(&t).unwrap();
        if m["type"] == "presence_update" && m["payload"]["user_id"] == "z1" && m["payload"]["status"] == "offline" {
            break;
        }
    }
    tokio::time::timeout_at(deadline, async {
        loop {
            let ev = stream.message().await.expect("the stream goes on").expect("open");
            if ev.presence.is_some_and(|p| p.user_id == "z1" && p.status == pb::Status::Offline as i32) {
                break;
            }
        }
    })
    .await
    .expect("the gRPC watch sees z1 offline within 30 s");
    // Node a's write-back (its lease was lost with Redis's data, or it reconnected) does
    // not bring z1 back: the end it could not write at once was kept for it.
    let mut late = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        while let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = w.ws.next().await {
            late.push(t.to_string());
        }
    })
    .await;
    assert!(!late.iter().any(|t| t.contains("\"z1\"") && !t.contains("offline")), "z1 came back: {late:?}");
    // Once all is settled, the room on b counts z2 (who never left) online.
    let mut z0b = wsclient::connect(&b, "z0", "d2").await;
    assert_eq!(counts(&subscribe(&mut z0b, "den").await), (3, 2));
    for n in [&a, &b] {
        let r = n.client.get(n.url("/api/v2/presence/z1")).bearer_auth(n.token("w")).send().await.unwrap();
        let body: Value = r.json().await.unwrap();
        // Offline, or (Redis came back empty, and nothing wrote z1 again) unknown.
        assert!(body["data"]["z1"]["status"] == "offline" || body["code"] == "not_found", "{body}");
    }
    a.stop().await;
    b.stop().await;
}
