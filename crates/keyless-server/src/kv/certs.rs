//! Certificates (filled in with the certificate issuance).

use super::Ctx;
use crate::error::Result;
use crate::state::AppState;
use axum::http::Method;
use axum::response::Response;
use keyless_core::vault::route::Target;
use std::sync::Arc;

pub async fn handle(_s: &Arc<AppState>, _ctx: &Ctx<'_>, m: &Method, _target: Target, _body: &[u8]) -> Result<Response> {
    Err(super::method_not_allowed(m))
}
