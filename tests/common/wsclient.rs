//! A WebSocket test client speaking the `/ws` protocol.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::TestServer;

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Stream,
}

/// How a handshake was refused: HTTP status and the JSON envelope.
#[derive(Debug)]
pub struct Refused(pub u16, pub Value);

pub async fn connect_with(s: &TestServer, query: &str, headers: &[(&str, &str)]) -> Result<Client, Refused> {
    let url = format!("{}/ws{}", s.base.replace("http://", "ws://"), query);
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Client { ws }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().clone().map(|b| serde_json::from_slice(&b).expect("JSON refusal")).unwrap_or(Value::Null);
            Err(Refused(status, body))
        }
        Err(e) => panic!("connect failed: {e}"),
    }
}

/// Connects as `user` on `device` with a JWT, and reads the `connected` greeting.
pub async fn connect(s: &TestServer, user: &str, device: &str) -> Client {
    let token = s.token(user);
    let mut c =
        connect_with(s, &format!("?device_id={device}"), &[("authorization", &format!("Bearer {token}"))]).await.expect("handshake");
    let hello = c.recv_type("connected").await;
    assert_eq!(hello["payload"]["user_id"], user);
    assert_eq!(hello["payload"]["device_id"], device);
    c
}

/// As [`connect`], declaring the device's platform (`X-Device-Platform`).
pub async fn connect_platform(s: &TestServer, user: &str, device: &str, platform: &str) -> Client {
    let token = s.token(user);
    let auth = format!("Bearer {token}");
    let mut c = connect_with(s, &format!("?device_id={device}"), &[("authorization", &auth), ("x-device-platform", platform)])
        .await
        .expect("handshake");
    let hello = c.recv_type("connected").await;
    assert_eq!(hello["payload"]["platform"], platform);
    c
}

impl Client {
    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// The next JSON message (pings answered by the library), within 5 s.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg =
                tokio::time::timeout(Duration::from_secs(5), self.ws.next()).await.expect("a message within 5s").expect("stream open");
            match msg.expect("frame") {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(f) => panic!("unexpected close: {f:?}"),
                _ => {}
            }
        }
    }

    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Next presence_update about `user`.
    pub async fn presence_of(&mut self, user: &str) -> Value {
        loop {
            let v = self.recv_type("presence_update").await;
            if v["payload"]["user_id"] == user {
                return v["payload"].clone();
            }
        }
    }

    /// Discards whatever arrives within `ms`.
    pub async fn settle(&mut self, ms: u64) {
        let _ = tokio::time::timeout(Duration::from_millis(ms), async { while let Some(Ok(_)) = self.ws.next().await {} }).await;
    }

    /// Asserts nothing but pings arrives for `ms`.
    pub async fn silent(&mut self, ms: u64) {
        if let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(ms), async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => return other,
                }
            }
        })
        .await
        {
            panic!("expected silence, got {m:?}");
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed(&mut self) -> Option<CloseCode> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await.expect("closed within 15s") {
                Some(Ok(Message::Close(f))) => return f.map(|f| f.code),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn ack(&mut self, v: Value) -> Value {
        let id = v["id"].clone();
        self.send(v).await;
        loop {
            let m = self.recv().await;
            if (m["type"] == "ack" || m["type"] == "error") && m["id"] == id {
                return m;
            }
        }
    }
}
