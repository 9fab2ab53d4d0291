//! The schema pieces request types share, for the OpenAPI document: the id pattern, ids,
//! statuses, platforms, and the documentation of the path parameters ([`super::extract`]
//! validates them).

use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::Required;
use utoipa::IntoParams;

/// The characters of a user, device, instance or conversation id.
pub(crate) const ID_PATTERN: &str = r"^[A-Za-z0-9._@:+\-]+$";

/// A user, device or conversation id (the schema of request fields handlers validate).
pub(crate) fn id() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(ID_PATTERN))
        .min_length(Some(1))
        .build()
}

/// An id that may be `null` (then a default applies).
pub(crate) fn id_or_null() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{SchemaType, Type};
    let mut o = id();
    o.schema_type = SchemaType::from_iter([Type::String, Type::Null]);
    o
}

/// An id that may be empty (then a default applies).
pub(crate) fn id_or_empty() -> utoipa::openapi::Object {
    let mut o = id();
    o.pattern = Some(ID_PATTERN.replace("]+$", "]*$"));
    o.min_length = None;
    o
}

/// A list of ids.
pub(crate) fn ids() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new().items(id()).build()
}

/// `online`, `away`, `busy` or `offline`.
pub(crate) fn status() -> utoipa::openapi::Object {
    crate::wire::json::enum_schema(crate::core::Status::ALL.map(crate::core::Status::as_str), false)
}

/// `desktop`, `mobile`, `web` or `null`.
pub(crate) fn platform_or_null() -> utoipa::openapi::Object {
    crate::wire::json::enum_schema(crate::core::Platform::ALL.map(crate::core::Platform::as_str), true)
}

/// One id segment of a path, documented as [`id`] says.
fn path_id(name: &str, description: &str, example: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(description))
        .example(Some(example.into()))
        .schema(Some(id()))
        .build()
}

/// The user of a `/{user_id}` path.
pub(crate) struct UserPath;

impl IntoParams for UserPath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![path_id("user_id", "A user id: 1 to `limits.max_user_id_len` (128) characters of `A-Z a-z 0-9 . _ @ : + -`.", "alice")]
    }
}

/// The conversation of a `/conversations/{id}` path.
pub(crate) struct ConversationPath;

impl IntoParams for ConversationPath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![path_id("id", "A conversation id (same characters as a user id).", "room-1")]
    }
}

/// The instance of an `/instances/{id}` path.
pub(crate) struct InstancePath;

impl IntoParams for InstancePath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![path_id("id", "A gateway instance id (same characters as a user id).", "gw-1")]
    }
}
