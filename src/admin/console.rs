//! The web console's files, embedded in the binary (`include_str!`): plain HTML, CSS and
//! one ES module, no build step, so what runs is what the repository holds. Served at `/`
//! and under `/console/`, with a content security policy that allows only this origin's
//! own files (no inline script, nothing from elsewhere).

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AdminState;

const INDEX: &str = include_str!("console/index.html");

/// Every file but the index: (name under /console/, content type, content).
const FILES: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("console/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("console/style.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_str!("console/icon.svg"),
    ),
];

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/", get(index))
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/{file}", get(file))
        // Browsers ask for it whatever the page says; an answer keeps their consoles clean.
        .route("/favicon.ico", get(favicon))
}

async fn favicon() -> Response {
    serve("image/svg+xml", include_str!("console/icon.svg"))
}

fn serve(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The files change with the binary; a stale one after an upgrade would talk
            // to an API it does not match.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    serve("text/html; charset=utf-8", INDEX)
}

async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => serve(content_type, body),
        None if name == "index.html" => serve("text/html; charset=utf-8", INDEX),
        None => (StatusCode::NOT_FOUND, "no such console file\n").into_response(),
    }
}
