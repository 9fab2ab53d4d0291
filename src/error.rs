//! Every failure a client can see, and the one table that decides how each transport
//! says it (linkerd2-proxy's `errors/respond.rs` idea): HTTP status and envelope code,
//! gRPC code, the WebSocket `error` code, and the close code when the error ends a
//! WebSocket connection. Transports call [`ApiError::wire`] and [`ApiError::report`];
//! none keeps a mapping of its own.
//!
//! Also here: the WebSocket close codes of connection events that are not errors of a
//! request (a slow reader, a replaced device, a stale connection, a bad frame).

use crate::auth::AuthError;
use crate::core::IdError;
use crate::store::StoreError;

/// Every failure a client can see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(#[from] AuthError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("rate limit exceeded: retry in {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    #[error("{0}")]
    LimitExceeded(String),
    #[error("{0}")]
    Unavailable(String),
    /// A bug. The detail is logged (once, by [`ApiError::report`]) and never sent.
    #[error("internal error")]
    Internal(String),
}

/// The kinds of [`ApiError`], for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    RateLimited,
    LimitExceeded,
    Unavailable,
    Internal,
}

/// How one kind of error is said on each transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// HTTP status (seed 003 §12.1).
    pub http: u16,
    /// Stable machine-readable code: the envelope's `code`, the WebSocket `error` code.
    pub code: &'static str,
    pub grpc: tonic::Code,
    /// Close code when the error ends a WebSocket connection (RFC 6455 §7.4.1).
    pub ws_close: u16,
}

/// The table.
pub const TABLE: [(Kind, Wire); 10] = [
    (Kind::BadRequest, Wire { http: 400, code: "bad_request", grpc: tonic::Code::InvalidArgument, ws_close: close::POLICY }),
    (Kind::Unauthorized, Wire { http: 401, code: "unauthorized", grpc: tonic::Code::Unauthenticated, ws_close: close::POLICY }),
    (Kind::Forbidden, Wire { http: 403, code: "forbidden", grpc: tonic::Code::PermissionDenied, ws_close: close::POLICY }),
    (Kind::NotFound, Wire { http: 404, code: "not_found", grpc: tonic::Code::NotFound, ws_close: close::POLICY }),
    (Kind::MethodNotAllowed, Wire { http: 405, code: "method_not_allowed", grpc: tonic::Code::Unimplemented, ws_close: close::POLICY }),
    (Kind::PayloadTooLarge, Wire { http: 413, code: "payload_too_large", grpc: tonic::Code::InvalidArgument, ws_close: close::TOO_BIG }),
    (Kind::RateLimited, Wire { http: 429, code: "rate_limited", grpc: tonic::Code::ResourceExhausted, ws_close: close::TRY_AGAIN_LATER }),
    (
        Kind::LimitExceeded,
        Wire { http: 429, code: "limit_exceeded", grpc: tonic::Code::ResourceExhausted, ws_close: close::TRY_AGAIN_LATER },
    ),
    (Kind::Unavailable, Wire { http: 503, code: "unavailable", grpc: tonic::Code::Unavailable, ws_close: close::TRY_AGAIN_LATER }),
    (Kind::Internal, Wire { http: 500, code: "internal", grpc: tonic::Code::Internal, ws_close: close::INTERNAL_ERROR }),
];

/// The OpenAPI schema of the envelope's `code`: every code of [`TABLE`], so the document
/// cannot drift from the table.
pub fn code_schema() -> utoipa::openapi::Object {
    let mut codes: Vec<&str> = TABLE.iter().map(|(_, w)| w.code).collect();
    codes.dedup();
    utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String).enum_values(Some(codes)).build()
}

impl ApiError {
    pub fn kind(&self) -> Kind {
        match self {
            ApiError::BadRequest(_) => Kind::BadRequest,
            ApiError::Unauthorized(_) => Kind::Unauthorized,
            ApiError::Forbidden(_) => Kind::Forbidden,
            ApiError::NotFound(_) => Kind::NotFound,
            ApiError::MethodNotAllowed(_) => Kind::MethodNotAllowed,
            ApiError::PayloadTooLarge(_) => Kind::PayloadTooLarge,
            ApiError::RateLimited { .. } => Kind::RateLimited,
            ApiError::LimitExceeded(_) => Kind::LimitExceeded,
            ApiError::Unavailable(_) => Kind::Unavailable,
            ApiError::Internal(_) => Kind::Internal,
        }
    }

    /// How this error is said on every transport.
    pub fn wire(&self) -> Wire {
        let kind = self.kind();
        TABLE.iter().find(|(k, _)| *k == kind).map_or(TABLE[9].1, |(_, w)| *w)
    }

    /// HTTP status for this error (seed 003 §12.1).
    pub fn http_status(&self) -> u16 {
        self.wire().http
    }

    /// Stable machine-readable code, sent beside the human-readable message.
    pub fn code(&self) -> &'static str {
        self.wire().code
    }

    /// Logs what a client is not told: an internal error's detail (error level) and why
    /// the service is unavailable (warn). Every transport calls this once per error it
    /// answers; client mistakes are not logged.
    pub fn report(&self, transport: &'static str) {
        match self {
            ApiError::Internal(detail) => tracing::error!(transport, error = %detail, "internal error"),
            ApiError::Unavailable(detail) => tracing::warn!(transport, error = %detail, "service unavailable"),
            _ => {}
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TooManyDevices { .. } => ApiError::LimitExceeded(e.to_string()),
            StoreError::Corrupt { .. } | StoreError::Misconfigured(_) => ApiError::Internal(e.to_string()),
            StoreError::Unreachable(_)
            | StoreError::Degraded(_)
            | StoreError::NotDurable(_)
            | StoreError::ShuttingDown
            | StoreError::Contended { .. } => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<IdError> for ApiError {
    fn from(e: IdError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

/// WebSocket close codes (RFC 6455 §7.4.1, and 4000-4999 for the application's own).
pub mod close {
    /// The client said `bye`: its session ended, and the server closes normally.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame that breaks RFC 6455 (bad opcode, reserved bits, unmasked, bad fragments).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not valid UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// The client broke a rule of the service (an error that ends the connection).
    pub const POLICY: u16 = 1008;
    /// A frame larger than `limits.ws_max_message_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// The server failed.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The node is draining (SIGTERM: a restart or a deploy): reconnect at once, to any
    /// node; the device's session is held for the offline grace and continues.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The client cannot keep up with what it is sent (or the server is overloaded).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// A newer connection took over this device.
    pub const REPLACED: u16 = 4001;
    /// No inbound traffic (pong, heartbeat, any message) within `presence.session_ttl`.
    pub const STALE: u16 = 4002;
    /// The user was erased (`DELETE /api/v2/users/{id}`): do not reconnect.
    pub const ERASED: u16 = 4003;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_in_the_table_once() {
        let kinds: std::collections::HashSet<Kind> = TABLE.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds.len(), TABLE.len());
        let codes: std::collections::HashSet<&str> = TABLE.iter().map(|(_, w)| w.code).collect();
        assert_eq!(codes.len(), TABLE.len(), "codes are distinct");
    }

    #[test]
    fn error_table_matches_seed_codes() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::Unauthorized(AuthError::Expired), 401),
            (ApiError::Forbidden("x".into()), 403),
            (ApiError::NotFound("x".into()), 404),
            (ApiError::RateLimited { retry_after_ms: 5 }, 429),
            (ApiError::Internal("x".into()), 500),
            (ApiError::Unavailable("x".into()), 503),
        ];
        for (e, code) in cases {
            assert_eq!(e.http_status(), code, "{e:?}");
        }
        assert_eq!(ApiError::Internal("secret detail".into()).to_string(), "internal error");
    }
}
