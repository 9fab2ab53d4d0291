//! What a handler takes from a request, as axum extractors that refuse with [`ApiError`]
//! (so a refusal is the documented envelope, never axum's plain-text rejection), as
//! axum's `customize-extractor-error` example does.
//!
//! Extractors run in the order of the handler's arguments, before its body: the caller,
//! then the path. The request body is read by then too, but parsed only when the handler
//! asks ([`Body::json`]), after its authorization checks, so a caller who may not write
//! learns nothing about the body's form.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use serde::Deserialize;

use super::Http;
use crate::auth::Identity;
use crate::core::UserId;
use crate::error::ApiError;

/// The caller, from `Authorization: Bearer` (or `X-User-Id` in gateway mode); 401 without.
pub struct Caller(pub Identity);

impl FromRequestParts<Http> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Http) -> Result<Self, ApiError> {
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0);
        state.svc.identify(&parts.headers, None).map(|who| Caller(who.via("http", peer)))
    }
}

/// The caller when a credential was sent; `None` for an anonymous read (which sees what
/// `everyone` may). A credential that is sent but bad is still 401.
pub struct Viewer(pub Option<Identity>);

impl FromRequestParts<Http> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Http) -> Result<Self, ApiError> {
        state.svc.identify_optional(&parts.headers).map(Viewer)
    }
}

/// The path's one id segment (`{user_id}` or `{id}`), as sent.
async fn segment(parts: &mut Parts, state: &Http, what: &str) -> Result<String, ApiError> {
    Path::<String>::from_request_parts(parts, state)
        .await
        .map(|Path(raw)| raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid {what} in path: {e}")))
}

/// The path's one id segment, checked as an id of `what`.
async fn checked_segment(parts: &mut Parts, state: &Http, what: &'static str) -> Result<String, ApiError> {
    let id = segment(parts, state, what).await?;
    state.svc.check_id(what, &id)?;
    Ok(id)
}

/// `{user_id}` of the path, a valid user id.
pub struct UserParam(pub UserId);

impl FromRequestParts<Http> for UserParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Http) -> Result<Self, ApiError> {
        let raw = segment(parts, state, "user id").await?;
        state.svc.parse_user(&raw).map(UserParam)
    }
}

/// `{id}` of `/conversations/{id}`, a valid conversation id.
pub struct ConversationParam(pub String);

impl FromRequestParts<Http> for ConversationParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Http) -> Result<Self, ApiError> {
        checked_segment(parts, state, "conversation id").await.map(ConversationParam)
    }
}

/// `{id}` of `/instances/{id}`, a valid gateway instance id.
pub struct InstanceParam(pub String);

impl FromRequestParts<Http> for InstanceParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Http) -> Result<Self, ApiError> {
        checked_segment(parts, state, "instance id").await.map(InstanceParam)
    }
}

/// The request body (within `limits.max_body_bytes`), parsed when the handler asks.
pub struct Body(Result<Bytes, BytesRejection>);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Ok(Body(Bytes::from_request(req, state).await))
    }
}

impl Body {
    /// The bytes: 413 past the limit, 400 if they cannot be read.
    pub fn bytes(&self) -> Result<&Bytes, ApiError> {
        self.0.as_ref().map_err(|e| {
            if e.status().as_u16() == 413 {
                ApiError::PayloadTooLarge("request body is too large".into())
            } else {
                ApiError::BadRequest(format!("cannot read request body: {e}"))
            }
        })
    }

    /// The body as a JSON object of type `T` (400 for anything else, or nothing).
    pub fn json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, ApiError> {
        let bytes = self.bytes()?;
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => return Err(ApiError::BadRequest("request body is empty: a JSON object is expected".into())),
            // serde would read a struct from an array of its fields: only objects are bodies.
            Some(b'{') => {}
            Some(_) => return Err(ApiError::BadRequest("the request body must be a JSON object".into())),
        }
        serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))
    }

    /// As [`Body::json`], with `T::default()` for an empty body (an optional body).
    pub fn json_or_default<'a, T: Deserialize<'a> + Default>(&'a self) -> Result<T, ApiError> {
        if self.bytes()?.is_empty() {
            Ok(T::default())
        } else {
            self.json()
        }
    }
}
