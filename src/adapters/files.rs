//! `/<id>/files/<path>` (stub; the files branch replaces this file).

/// Serves a project's files (not yet: 501).
pub async fn handle(
    _host: &std::sync::Arc<crate::core::Host>,
    id: crate::domain::project::ProjectId,
    _rest: &str,
    _req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<crate::adapters::proxy::Body> {
    let body = serde_json::json!({
        "error": format!("/{id}/files/ is not served by this build"),
        "code": "not_implemented",
    });
    let mut r = hyper::Response::new(crate::adapters::proxy::full(body.to_string()));
    *r.status_mut() = hyper::StatusCode::NOT_IMPLEMENTED;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
