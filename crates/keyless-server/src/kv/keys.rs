//! Keys (filled in with the key cryptography).

use super::Ctx;
use crate::error::Result;
use axum::http::Method;
use axum::response::Response;
use keyless_core::vault::route::Target;

pub async fn handle(_ctx: &Ctx<'_>, m: &Method, _target: Target, _body: &[u8]) -> Result<Response> {
    Err(super::method_not_allowed(m))
}
