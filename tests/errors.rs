//! The one error table, walked through every transport's adapter: each kind of error
//! leaves HTTP with its status and envelope code, gRPC with its code, and the WebSocket
//! protocol with its `error` code, all as `presenced::error::TABLE` says.

use presenced::auth::AuthError;
use presenced::error::{ApiError, Kind, TABLE};

fn one_of_each() -> Vec<ApiError> {
    vec![
        ApiError::BadRequest("bad".into()),
        ApiError::Unauthorized(AuthError::Missing),
        ApiError::Forbidden("no".into()),
        ApiError::NotFound("gone".into()),
        ApiError::MethodNotAllowed("no".into()),
        ApiError::PayloadTooLarge("big".into()),
        ApiError::RateLimited { retry_after_ms: 1500 },
        ApiError::LimitExceeded("many".into()),
        ApiError::Unavailable("down".into()),
        ApiError::Internal("a secret detail".into()),
    ]
}

#[tokio::test]
async fn every_kind_through_every_transport() {
    let errors = one_of_each();
    let kinds: std::collections::HashSet<Kind> = errors.iter().map(ApiError::kind).collect();
    assert_eq!(kinds.len(), TABLE.len(), "one error of each kind");
    for e in errors {
        let wire = TABLE.iter().find(|(k, _)| *k == e.kind()).unwrap().1;
        // HTTP: status and envelope.
        let resp = presenced::http::error(&e);
        assert_eq!(resp.status().as_u16(), wire.http, "{e:?}");
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((v["success"].as_bool(), v["code"].as_str()), (Some(false), Some(wire.code)), "{e:?}");
        // gRPC: code, and the message the client reads.
        let st = presenced::grpc::to_status(e.clone());
        assert_eq!(st.code(), wire.grpc, "{e:?}");
        // WebSocket: the error message.
        let m: serde_json::Value = serde_json::from_str(&presenced::ws::protocol::error_of(&None, &e)).unwrap();
        assert_eq!((m["type"].as_str(), m["payload"]["code"].as_str()), (Some("error"), Some(wire.code)), "{e:?}");
        // What no transport tells: an internal error's detail.
        if e.kind() == Kind::Internal {
            assert!(!String::from_utf8_lossy(&body).contains("secret") && !st.message().contains("secret"));
            assert!(!m.to_string().contains("secret"));
        }
        assert!(wire.ws_close >= 1000, "a close code for when it ends a connection");
    }
}
