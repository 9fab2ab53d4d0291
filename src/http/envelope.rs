//! The seed 003 envelope `{"success","data","error"}` of every HTTP answer.

use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;

/// `{"success": true, "data": ...}`
#[derive(Serialize, ToSchema)]
pub struct Ok<T> {
    /// Always `true`.
    pub success: bool,
    pub data: T,
}

pub fn ok_body<T: Serialize>(data: T) -> Vec<u8> {
    serde_json::to_vec(&Ok { success: true, data })
        .unwrap_or_else(|_| br#"{"success":false,"error":"internal error","code":"internal"}"#.to_vec())
}

/// The success envelope of a read served from a possibly stale cache.
pub fn stale_body<T: Serialize>(data: T, reason: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Stale<'a, T> {
        success: bool,
        data: T,
        stale: bool,
        warning: &'a str,
    }
    serde_json::to_vec(&Stale { success: true, data, stale: true, warning: reason })
        .unwrap_or_else(|_| br#"{"success":false,"error":"internal error","code":"internal"}"#.to_vec())
}

/// `{"success": false, "error": "...", "code": "..."}`
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct Err<'a> {
    /// Always `false`.
    pub success: bool,
    /// What went wrong, for people.
    pub error: String,
    /// What went wrong, for programs: one of the error table's codes.
    #[schema(schema_with = crate::error::code_schema)]
    pub code: &'a str,
    /// With `rate_limited`: when to try again (also the `Retry-After` header, in seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

pub fn error_body(e: &ApiError) -> Vec<u8> {
    let retry_after_ms = match e {
        ApiError::RateLimited { retry_after_ms } => Some(*retry_after_ms),
        _ => None,
    };
    serde_json::to_vec(&Err { success: false, error: e.to_string(), code: e.code(), retry_after_ms }).unwrap_or_default()
}
