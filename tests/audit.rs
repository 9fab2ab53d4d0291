//! The audit log (`logging.audit_file`): one JSON line per change of someone's presence
//! data, with the actor, the subject, the transport and the peer, never a token;
//! reopened on SIGHUP.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use presenced::grpc::pb;

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn every_change_is_one_line_with_who_whose_what_and_where() {
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("audit.jsonl");
    let s = TestServer::start(&[("PRESENCE_LOGGING__AUDIT_FILE", path.to_str().unwrap())]).await;
    let admin = s.admin_token("backend");

    // An admin writes another user's status over HTTP.
    let (code, _) = s.put_status("alice", Some(&admin), serde_json::json!({"status": "busy", "message": "set by ops"})).await;
    assert_eq!(code, 200);
    // The user changes their contacts and privacy themself.
    let alice = s.token("alice");
    let r = s
        .client
        .put(s.url("/api/v2/contacts/alice"))
        .bearer_auth(&alice)
        .json(&serde_json::json!({"contacts": ["bob"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .put(s.url("/api/v2/presence/alice/privacy"))
        .bearer_auth(&alice)
        .json(&serde_json::json!({"visibility": "contacts"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Over a WebSocket, and over gRPC.
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url("bob", "phone")).await.unwrap();
    let set = serde_json::json!({"type": "presence_update", "id": "1", "payload": {"online_status": "away", "custom_status": "lunch"}});
    ws.send(tokio_tungstenite::tungstenite::Message::text(set.to_string())).await.unwrap();
    let mut grpc = pb::presence_api_client::PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    grpc.set_presence(s.admin_request(pb::SetPresenceRequest {
        user_id: "carol".into(),
        status: pb::Status::Busy as i32,
        ..Default::default()
    }))
    .await
    .unwrap();
    // A read changes nothing and is not logged.
    let _ = s.get("/api/v2/presence/alice").await;

    let mut all = Vec::new();
    eventually("five audit lines", Duration::from_secs(10), async || {
        s.svc.audit.flush();
        all = lines(&path);
        all.len() >= 5
    })
    .await;
    let find = |user: &str, action: &str| {
        all.iter()
            .find(|l| l["user"] == user && l["action"] == action)
            .unwrap_or_else(|| panic!("no {action} line for {user}: {all:?}"))
            .clone()
    };
    let by_admin = find("alice", "status_set");
    assert_eq!(by_admin["actor"], serde_json::json!({"sub": "backend", "admin": true, "gateway": false}));
    assert_eq!(by_admin["transport"], "http");
    assert!(by_admin["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{by_admin}");
    assert_eq!(by_admin["change"]["status"], "busy");
    assert_eq!(by_admin["change"]["message"], "set by ops");
    assert!(by_admin["time"].as_str().unwrap().ends_with('Z'), "{by_admin}");
    assert_eq!(by_admin["node"], "test-node");
    let contacts = find("alice", "contacts_set");
    assert_eq!(contacts["actor"]["sub"], "alice");
    assert_eq!(contacts["actor"]["admin"], false);
    assert_eq!(contacts["change"]["contacts"], serde_json::json!(["bob"]));
    assert_eq!(find("alice", "privacy_set")["change"]["privacy"]["visibility"], "contacts");
    let ws_line = find("bob", "status_set");
    assert_eq!(ws_line["transport"], "ws");
    assert_eq!(ws_line["change"]["message"], "lunch");
    let grpc_line = find("carol", "status_set");
    assert_eq!(grpc_line["transport"], "grpc");
    assert_eq!(grpc_line["actor"]["admin"], true);
    assert_eq!(all.len(), 5, "one line per change, none for reads: {all:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&admin) && !text.contains(&alice) && !text.contains("eyJ"), "no token in the audit log");

    // Rotation: the operator moves the file and sends SIGHUP; new lines go to a new file.
    let rotated = logs.path().join("audit.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    let pid = std::process::id().to_string();
    assert!(tokio::process::Command::new("kill").args(["-s", "HUP", &pid]).status().await.unwrap().success());
    // Until the reopen, a line may still reach the moved file; after it, the new one.
    eventually("the audit file reopened", Duration::from_secs(10), async || {
        let _ = s.put_status("dave", Some(&admin), serde_json::json!({"status": "busy"})).await;
        s.svc.audit.flush();
        lines(&path).iter().any(|l| l["user"] == "dave")
    })
    .await;
    assert!(lines(&rotated).len() >= 5);
    s.stop().await;
}
