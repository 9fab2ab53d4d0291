//! The OpenAPI 3.1 document of everything served on the HTTP port, generated from the
//! handlers' request and answer types (utoipa), served at `/openapi.json`.
//!
//! The request bodies are the structs the handlers parse, the answers the structs they
//! serialize, and the error codes come from the error table, so the document follows the
//! code. What utoipa cannot see is checked by tests: the router serves exactly the paths
//! documented here (`tests/openapi.rs`), and schemathesis fuzzes a live server against the
//! document (no 5xx, every answer matches its schema).

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{account, gateway, health, legacy, presence, social, stats};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "presenced",
        description = "Real-time presence: who is online, away, busy or offline, on which devices. \
            Every answer is the envelope `{\"success\": true, \"data\": ...}` or \
            `{\"success\": false, \"error\": \"...\", \"code\": \"...\"}`. \
            Writes take `Authorization: Bearer <JWT>` (HS256; `presenced token --sub alice` mints one), \
            or `X-User-Id` when `auth.mode` is `gateway`. Real-time updates: `GET /ws`."
    ),
    paths(
        presence::get_many,
        presence::batch,
        presence::get_one,
        presence::put,
        presence::delete,
        social::get_privacy,
        social::put_privacy,
        social::get_contacts,
        social::put_contacts,
        social::get_members,
        social::put_members,
        social::get_conversation_presence,
        account::export,
        account::erase,
        gateway::register,
        gateway::unregister,
        gateway::end,
        gateway::refresh,
        legacy::update,
        legacy::bulk,
        legacy::heartbeat,
        legacy::bye,
        legacy::typing,
        legacy::get,
        health::health,
        health::cache,
        health::nats,
        health::redis,
        health::metrics,
        stats::stats,
        super::page,
        super::client_js,
        super::favicon,
        super::dev_token,
        openapi_json,
        ws_upgrade,
    ),
    components(schemas(super::envelope::Err)),
    modifiers(&Common),
    tags(
        (name = "presence", description = "REST API v2: read and write presence (seed 003)"),
        (name = "privacy", description = "Who may see a user and their last_seen"),
        (name = "contacts", description = "Whom a user's changes are pushed to"),
        (name = "conversations", description = "Conversation members (typing indicators)"),
        (name = "users", description = "A user's data as a whole: export (right of access) and erasure (right to be forgotten)"),
        (name = "gateway", description = "Sessions held by a gateway (bulk, instance leases)"),
        (name = "legacy", description = "Seed 004's HTTP endpoints"),
        (name = "realtime", description = "The WebSocket protocol"),
        (name = "health", description = "Health, cache, backends and metrics"),
        (name = "operator", description = "The operator view's figures"),
        (name = "page", description = "The live page")
    )
)]
pub struct ApiDoc;

/// The document as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "health", summary = "This OpenAPI 3.1 document",
    responses((status = 200, description = "The document", content_type = "application/json", body = Object)))]
pub(super) async fn openapi_json() -> axum::response::Response {
    static RENDERED: std::sync::OnceLock<axum::body::Bytes> = std::sync::OnceLock::new();
    let body = RENDERED.get_or_init(|| document().to_json().unwrap_or_default().into()).clone();
    let mut r = axum::response::Response::new(axum::body::Body::from(body));
    r.headers_mut().insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    r
}

/// `GET /ws` (served by [`crate::ws::upgrade`]): authenticates, applies the per-IP
/// connection rate limit and opens the device session before upgrading, so a refusal is
/// the JSON envelope (401/400/429). Documentation only: the WebSocket transport does not
/// reach up into the HTTP one for it.
#[utoipa::path(get, path = "/ws", operation_id = "websocket", tag = "realtime", summary = "Upgrade to the WebSocket protocol",
    description = "Messages are JSON `{\"type\": ..., \"payload\": ..., \"id\"?: ...}`: the server sends `connected`, \
        `presence_update`, `typing_indicator`, `ack`, `error`; the client sends `presence_update`, `heartbeat`, `activity`, \
        `typing`, `subscribe`, `unsubscribe`, `bye`. See the README's WebSocket section.",
    params(crate::ws::WsQuery),
    responses((status = 101, description = "Switching protocols"),
              (status = 400, description = "Not an upgrade request, or invalid input", body = super::envelope::Err)),
    security(("bearer" = []), ()))]
#[allow(dead_code)]
fn ws_upgrade() {}

/// The errors any authenticated operation can answer, besides those it lists.
const COMMON_ERRORS: [(&str, &str); 7] = [
    ("400", "Invalid input: a malformed id, body or query (`bad_request`)"),
    ("401", "A missing, malformed or expired token (`unauthorized`)"),
    ("403", "The token may not do this (`forbidden`)"),
    ("404", "No such conversation, user or instance (`not_found`)"),
    ("413", "The body is larger than `limits.max_body_bytes` (`payload_too_large`)"),
    ("429", "Over a rate or count limit (`rate_limited`, `limit_exceeded`); see `Retry-After`"),
    ("503", "The store cannot answer now (`unavailable`)"),
];

/// The bearer scheme, and the error envelope on every operation that reads input.
struct Common;

impl Modify for Common {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("HS256, `sub` = user id; scope `presence:admin` for admin calls"))
                    .build(),
            ),
        );
        for item in doc.paths.paths.values_mut() {
            let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete];
            for op in ops.into_iter().flatten() {
                add_errors(op);
            }
        }
    }
}

fn add_errors(op: &mut Operation) {
    let takes_input = op.security.is_some() || op.parameters.is_some() || op.request_body.is_some();
    if !takes_input {
        return;
    }
    for (status, description) in COMMON_ERRORS {
        if op.responses.responses.contains_key(status) {
            continue;
        }
        let response = ResponseBuilder::new()
            .description(description)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("Error"))).build())
            .build();
        op.responses.responses.insert(status.to_string(), response.into());
    }
}
