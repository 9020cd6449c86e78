//! The admin API over HTTP (see `docs/admin-api.md`): parses requests, checks the token, and
//! hands the request to the control plane (which forwards it to the metadata leader).

use super::{AdminError, AdminReply, AdminRequest, ControlPlane};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::admin::{AttachVolume, CreateVolume, DetachVolume, ResizeVolume, SetQos};
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// Largest request body.
pub const MAX_BODY: usize = 64 << 10;

type Cp = State<Arc<ControlPlane>>;

fn respond(r: AdminReply) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::NO_CONTENT {
        return status.into_response();
    }
    let mut body = serde_json::to_vec_pretty(&r.body).unwrap_or_default();
    body.push(b'\n');
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

fn err(e: AdminError) -> Response {
    respond(e.reply())
}

/// Constant-time comparison (the token is a secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(cp: &ControlPlane, headers: &HeaderMap) -> Result<(), AdminError> {
    let Some(token) = cp.token() else {
        return Err(AdminError::Unauthorized(
            "this head node has no admin token configured (admin-token-file); the admin API is disabled".into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        // The scheme is case-insensitive (RFC 9110, section 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match given {
        None => Err(AdminError::Unauthorized(
            "missing admin token: send `Authorization: Bearer <token>` with the content of the cluster's admin token file (the CLI takes --token-file or STOCKADE_TOKEN_FILE)".into(),
        )),
        Some(t) if same(t.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(AdminError::Unauthorized(
            "wrong admin token: use the content of the cluster's admin token file".into(),
        )),
    }
}

fn parse<T: DeserializeOwned + Default>(body: &[u8], empty_ok: bool) -> Result<T, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(T::default())
        } else {
            Err(AdminError::BadRequest("missing JSON request body".into()))
        };
    }
    serde_json::from_slice(body)
        .map_err(|e| AdminError::BadRequest(format!("malformed JSON request: {e}")))
}

fn parse_required<T: DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(AdminError::BadRequest("missing JSON request body".into()));
    }
    serde_json::from_slice(body)
        .map_err(|e| AdminError::BadRequest(format!("malformed JSON request: {e}")))
}

async fn run(
    cp: &ControlPlane,
    headers: &HeaderMap,
    req: Result<AdminRequest, AdminError>,
) -> Response {
    if let Err(e) = authorize(cp, headers) {
        cp.metrics
            .observe("unauthorized", e.status(), std::time::Instant::now());
        return err(e);
    }
    match req {
        Ok(req) => respond(cp.admin(req).await),
        Err(e) => {
            cp.metrics
                .observe("invalid", e.status(), std::time::Instant::now());
            err(e)
        }
    }
}

async fn cluster(State(cp): Cp, h: HeaderMap) -> Response {
    run(&cp, &h, Ok(AdminRequest::Cluster)).await
}

async fn nodes(State(cp): Cp, h: HeaderMap) -> Response {
    run(&cp, &h, Ok(AdminRequest::Nodes)).await
}

async fn sleds(State(cp): Cp, h: HeaderMap) -> Response {
    run(&cp, &h, Ok(AdminRequest::Sleds)).await
}

async fn drain(State(cp): Cp, h: HeaderMap, Path(id): Path<String>) -> Response {
    run(&cp, &h, Ok(AdminRequest::DrainSled { id, drain: true })).await
}

async fn add_sled(State(cp): Cp, h: HeaderMap, body: Bytes) -> Response {
    let req = parse_required::<common::admin::AddSled>(&body).map(AdminRequest::AddSled);
    run(&cp, &h, req).await
}

async fn remove_sled(State(cp): Cp, h: HeaderMap, Path(id): Path<String>) -> Response {
    run(&cp, &h, Ok(AdminRequest::RemoveSled { id })).await
}

async fn undrain(State(cp): Cp, h: HeaderMap, Path(id): Path<String>) -> Response {
    run(&cp, &h, Ok(AdminRequest::DrainSled { id, drain: false })).await
}

async fn list(State(cp): Cp, h: HeaderMap) -> Response {
    run(&cp, &h, Ok(AdminRequest::Volumes)).await
}

async fn create(State(cp): Cp, h: HeaderMap, body: Bytes) -> Response {
    let req = parse_required::<CreateVolume>(&body).map(AdminRequest::Create);
    run(&cp, &h, req).await
}

async fn show(State(cp): Cp, h: HeaderMap, Path(name): Path<String>) -> Response {
    run(&cp, &h, Ok(AdminRequest::Volume { name })).await
}

fn force_flag(q: Option<&str>) -> Result<bool, AdminError> {
    let mut force = false;
    for kv in q.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=').unwrap_or((kv, "true")) {
            ("force", "true" | "1" | "") => force = true,
            ("force", "false" | "0") => force = false,
            ("force", v) => {
                return Err(AdminError::BadRequest(format!(
                    "force={v}: use force=true or force=false"
                )));
            }
            (k, _) => {
                return Err(AdminError::BadRequest(format!(
                    "unknown query parameter {k:?} (only `force` is accepted)"
                )));
            }
        }
    }
    Ok(force)
}

async fn delete(
    State(cp): Cp,
    h: HeaderMap,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let req = force_flag(q.as_deref()).map(|force| AdminRequest::Delete { name, force });
    run(&cp, &h, req).await
}

async fn resize(State(cp): Cp, h: HeaderMap, Path(name): Path<String>, body: Bytes) -> Response {
    let req =
        parse_required::<ResizeVolume>(&body).map(|r| AdminRequest::Resize { name, size: r.size });
    run(&cp, &h, req).await
}

async fn attach(State(cp): Cp, h: HeaderMap, Path(name): Path<String>, body: Bytes) -> Response {
    let req = parse::<AttachVolume>(&body, true).map(|req| AdminRequest::Attach { name, req });
    run(&cp, &h, req).await
}

async fn detach(State(cp): Cp, h: HeaderMap, Path(name): Path<String>, body: Bytes) -> Response {
    let req = parse::<DetachVolume>(&body, true).map(|req| AdminRequest::Detach { name, req });
    run(&cp, &h, req).await
}

async fn qos(State(cp): Cp, h: HeaderMap, Path(name): Path<String>, body: Bytes) -> Response {
    let req = parse_required::<SetQos>(&body).and_then(|req| {
        if req == SetQos::default() {
            Err(AdminError::BadRequest(
                "no QoS field given: set at least one of iops, burst_iops, burst_credits, bandwidth".into(),
            ))
        } else {
            Ok(AdminRequest::Qos { name, req })
        }
    });
    run(&cp, &h, req).await
}

async fn no_route() -> Response {
    err(AdminError::NotFound(
        "no such endpoint; see docs/admin-api.md".into(),
    ))
}

async fn bad_method() -> Response {
    respond(AdminReply {
        status: 405,
        body: serde_json::json!({"error": {"code": "method_not_allowed", "message": "method not allowed on this endpoint; see docs/admin-api.md"}}),
    })
}

/// The admin API routes (merge with the metrics router).
pub fn router(cp: Arc<ControlPlane>, events: crate::events::SharedEvents) -> Router {
    Router::new()
        .route(
            "/v1/events",
            get(move |State(cp): Cp, h: HeaderMap| {
                let events = events.clone();
                async move {
                    if let Err(e) = authorize(&cp, &h) {
                        return err(e);
                    }
                    let view = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    respond(AdminReply {
                        status: 200,
                        body: serde_json::to_value(&view).unwrap_or_default(),
                    })
                }
            }),
        )
        .route("/v1/cluster", get(cluster))
        .route("/v1/nodes", get(nodes))
        .route("/v1/sleds", get(sleds).post(add_sled))
        .route("/v1/sleds/{id}", axum::routing::delete(remove_sled))
        .route("/v1/sleds/{id}/drain", post(drain))
        .route("/v1/sleds/{id}/undrain", post(undrain))
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{name}", get(show).delete(delete))
        .route("/v1/volumes/{name}/resize", post(resize))
        .route("/v1/volumes/{name}/attach", post(attach))
        .route("/v1/volumes/{name}/detach", post(detach))
        .route("/v1/volumes/{name}/qos", post(qos))
        .fallback(no_route)
        .method_not_allowed_fallback(bad_method)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(cp)
}

/// Errors are always JSON: axum answers some rejections itself in plain text (a body over
/// [`MAX_BODY`], a path that does not decode); this wraps them in the error document.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), MAX_BODY)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status.as_u16() {
        413 => "too_large",
        401 => "unauthorized",
        404 => "not_found",
        s if s >= 500 => "internal",
        _ => "bad_request",
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    respond(AdminReply {
        status: status.as_u16(),
        body: serde_json::json!({"error": {"code": code, "message": message}}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_flag_parses_or_refuses() {
        assert_eq!(force_flag(None), Ok(false));
        assert_eq!(force_flag(Some("force=true")), Ok(true));
        assert_eq!(force_flag(Some("force")), Ok(true));
        assert_eq!(force_flag(Some("force=0")), Ok(false));
        assert!(force_flag(Some("force=maybe")).is_err());
        assert!(force_flag(Some("forse=1")).is_err());
    }

    #[test]
    fn bodies_parse_with_clear_errors() {
        let e = parse_required::<CreateVolume>(b"").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let e = parse_required::<CreateVolume>(b"{\"name\":1}").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("malformed JSON"), "{e}");
        let a: AttachVolume = parse(b"", true).unwrap();
        assert!(!a.shared);
    }

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
