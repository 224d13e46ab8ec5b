//! The live dashboard's files, built into the binary and served on the admin listener at `/`
//! (and `/ui/`): one HTML page, its script and its style sheet, nothing fetched from elsewhere.
//!
//! Invariant: every answer carries a Content-Security-Policy that allows only these files and
//! the admin API of the same origin, so the page runs no inline or foreign code; the page reads
//! the JSON endpoints and changes routing only through the admin API with the bearer token.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Response, StatusCode};
use http_body_util::Full;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");

/// Same-origin files and fetches only; no inline script or style, no frames, no forms.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The file at `segments` (the path cut at `/`), if it is one of the dashboard's.
fn file(segments: &[&str]) -> Option<(&'static str, &'static str)> {
    let html = (INDEX_HTML, "text/html; charset=utf-8");
    match segments {
        [""] | ["ui"] | ["ui", ""] | ["ui", "index.html"] => Some(html),
        ["ui", "app.js"] => Some((APP_JS, "text/javascript; charset=utf-8")),
        ["ui", "style.css"] => Some((STYLE_CSS, "text/css; charset=utf-8")),
        _ => None,
    }
}

/// The answer for a dashboard path: the file for GET and HEAD (hyper leaves out a HEAD's body),
/// 405 for any other method; `None` when the path is not the dashboard's.
pub fn serve(method: &Method, segments: &[&str]) -> Option<Response<Full<Bytes>>> {
    let (body, content_type) = file(segments)?;
    let readable = *method == Method::GET || *method == Method::HEAD;
    let mut r = if readable {
        Response::new(Full::new(Bytes::from_static(body.as_bytes())))
    } else {
        let mut r = Response::new(Full::new(Bytes::from(
            serde_json::json!({"error": format!("{method} is not allowed here: the dashboard's files answer GET and HEAD"), "detail": null})
                .to_string(),
        )));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        r
    };
    let headers = r.headers_mut();
    let content_type = if readable {
        content_type
    } else {
        "application/json"
    };
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    // The files change only with the binary; a new weir must not be shown an old script.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(r)
}
