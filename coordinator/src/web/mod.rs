//! The read-only web dashboard, served over HTTP on its own port (`dashboard.listen`) next to
//! gRPC: the sweeps with live progress, a sweep's leaderboard (sorted and filtered in the page)
//! and charts ([`crate::plot`]), and a design's page (stage table, analysis, results, training
//! curves, downstream results).
//!
//! Pages are rendered on the server (`pages.rs`, `design.rs`, with `html.rs`'s escaping and
//! layout) with inline CSS and one small inline script (`dashboard.js`), so nothing is fetched
//! from the internet. The script polls the JSON API (`api.rs`) for progress and re-fetches the
//! leaderboard and chart fragments when the counts move. Data comes from the [`Coordinator`]
//! use cases only. With tokens configured every route but the login form needs a client token
//! (`auth.rs`). Every response carries a content security policy under which the inline
//! script, allowed by its hash, is the only script that runs.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | the sweeps |
//! | `GET /sweeps/{id}` | a sweep: progress, leaderboard, charts, downstream agreement |
//! | `GET /sweeps/{id}/designs/{design}` | a design in a sweep |
//! | `GET /sweeps/{id}/charts/{kind}.svg` | one chart (`rho`, `pareto`, `entropy`, `curves`) |
//! | `GET /fragments/sweeps/{id}/leaderboard`, `.../charts` | what the script refreshes |
//! | `GET /api/sweeps`, `/api/sweeps/{id}` | summaries (JSON) |
//! | `GET /api/sweeps/{id}/leaderboard`, `.../analytics` | JSON |
//! | `GET /api/trials/{id}` | a trial's history (JSON) |
//! | `GET, POST /login`, `POST /logout` | the session cookie |
//!
//! [`dashboard_router`] and [`serve_dashboard`] build and serve it in two steps, like the
//! gRPC and metrics servers.

mod api;
mod auth;
mod design;
mod html;
mod pages;

use std::future::Future;
use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tracing::{error, warn};

use crate::auth::Tokens;
use crate::error::Error;
use crate::model::{DesignId, SweepId, TrialId};
use crate::service::Coordinator;

/// What every handler shares.
#[derive(Clone, Debug)]
struct Dashboard {
    coordinator: Arc<Coordinator>,
    tokens: Arc<Tokens>,
}

/// Returns the dashboard's routes over `coordinator`; `tokens` are the coordinator's (empty:
/// open, which the settings allow on a loopback address only).
pub fn dashboard_router(coordinator: Arc<Coordinator>, tokens: Tokens) -> Router {
    let dashboard = Dashboard {
        coordinator,
        tokens: Arc::new(tokens),
    };
    let guarded = Router::new()
        .route("/", get(pages::sweeps))
        .route("/sweeps/{sweep}", get(pages::sweep))
        .route("/sweeps/{sweep}/designs/{design}", get(design::design))
        .route("/sweeps/{sweep}/charts/{file}", get(pages::chart_file))
        .route(
            "/fragments/sweeps/{sweep}/leaderboard",
            get(pages::leaderboard_fragment),
        )
        .route(
            "/fragments/sweeps/{sweep}/charts",
            get(pages::charts_fragment),
        )
        .route("/api/sweeps", get(api::sweeps))
        .route("/api/sweeps/{sweep}", get(api::sweep))
        .route("/api/sweeps/{sweep}/leaderboard", get(api::leaderboard))
        .route("/api/sweeps/{sweep}/analytics", get(api::analytics))
        .route("/api/trials/{trial}", get(api::trial))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            dashboard.clone(),
            auth::require_client,
        ));
    let policy =
        HeaderValue::from_str(&html::content_security_policy()).expect("the policy is ASCII");
    Router::new()
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .merge(guarded)
        .with_state(dashboard)
        .layer(axum::middleware::map_response(move |response: Response| {
            let policy = policy.clone();
            async move { with_safety_headers(response, policy) }
        }))
}

/// Adds to every response: the content security policy, no MIME sniffing, no referrer (a
/// `?token=` URL is never sent on), and no caching (the data is private and changes).
fn with_safety_headers(mut response: Response, policy: HeaderValue) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish.
pub async fn serve_dashboard(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Why a request failed, as a status and a message for people. Internal details are logged,
/// not shown.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    message: String,
}

impl Problem {
    fn not_found(message: String) -> Problem {
        Problem {
            status: StatusCode::NOT_FOUND,
            message,
        }
    }
}

impl From<Error> for Problem {
    fn from(error: Error) -> Problem {
        let message = error.to_string();
        let status = match error {
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            Error::Unavailable(detail) => {
                warn!(%detail, "dashboard: store unavailable");
                return Problem {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: "the database is unavailable; retry later".into(),
                };
            }
            Error::Internal(detail) => {
                error!(%detail, "dashboard: internal error");
                return Problem {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: "internal error".into(),
                };
            }
            Error::Unauthenticated => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied => StatusCode::FORBIDDEN,
            Error::NotLeaseHolder { .. } | Error::Conflict { .. } => StatusCode::CONFLICT,
            Error::ResourceExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
        };
        Problem { status, message }
    }
}

/// A failure of the JSON API: `{"error": MESSAGE}`.
#[derive(Debug)]
struct JsonProblem(Problem);

impl From<Problem> for JsonProblem {
    fn from(problem: Problem) -> JsonProblem {
        JsonProblem(problem)
    }
}

impl From<Error> for JsonProblem {
    fn from(error: Error) -> JsonProblem {
        JsonProblem(error.into())
    }
}

impl IntoResponse for JsonProblem {
    fn into_response(self) -> Response {
        let body = axum::Json(serde_json::json!({ "error": self.0.message }));
        (self.0.status, body).into_response()
    }
}

/// A failure of a page: the error page.
#[derive(Debug)]
struct PageProblem(Problem);

impl From<Problem> for PageProblem {
    fn from(problem: Problem) -> PageProblem {
        PageProblem(problem)
    }
}

impl From<Error> for PageProblem {
    fn from(error: Error) -> PageProblem {
        PageProblem(error.into())
    }
}

impl IntoResponse for PageProblem {
    fn into_response(self) -> Response {
        let Problem { status, message } = self.0;
        let title = status.canonical_reason().unwrap_or("error");
        let body = format!(
            "<h1>{}</h1>\n<p class=\"error\">{}</p>\n<p><a href=\"/\">all sweeps</a></p>",
            html::escape(title),
            html::escape(&message)
        );
        (status, html::page(title, html::Session::Open, &body)).into_response()
    }
}

/// Routes no page has: a 404 page, or a JSON error under `/api/`.
async fn not_found(uri: axum::http::Uri) -> Response {
    let problem = Problem::not_found(format!("no page at {}", uri.path()));
    if uri.path().starts_with("/api/") || uri.path().starts_with("/fragments/") {
        JsonProblem(problem).into_response()
    } else {
        PageProblem(problem).into_response()
    }
}

fn parse_sweep(text: &str) -> Result<SweepId, Problem> {
    text.parse()
        .map_err(|_| Problem::not_found(format!("no sweep {text:?}: a sweep id is a UUID")))
}

fn parse_trial(text: &str) -> Result<TrialId, Problem> {
    text.parse()
        .map_err(|_| Problem::not_found(format!("no trial {text:?}: a trial id is a UUID")))
}

/// A design id is the SHA-256 of its canonical JSON: 64 lowercase hex digits.
fn parse_design(text: &str) -> Result<DesignId, Problem> {
    let well_formed = text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if well_formed {
        Ok(DesignId(text.to_string()))
    } else {
        Err(Problem::not_found(format!(
            "no design {text:?}: a design id is 64 lowercase hex digits"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_before_the_store_is_asked() {
        assert!(parse_sweep("6f1c0b8e-3c1d-4d7e-9a55-0d1f2e3a4b5c").is_ok());
        let problem = parse_sweep("nope").unwrap_err();
        assert_eq!(problem.status, StatusCode::NOT_FOUND);
        assert!(problem.message.contains("UUID"), "{}", problem.message);
        assert!(parse_trial("1").is_err());
        assert!(parse_design(&"ab".repeat(32)).is_ok());
        assert!(parse_design(&"AB".repeat(32)).is_err());
        assert!(parse_design("abc").is_err());
    }

    #[test]
    fn internal_details_stay_in_the_log() {
        let problem = Problem::from(Error::Internal("password=hunter2".into()));
        assert_eq!(problem.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!problem.message.contains("hunter2"));
        let problem = Problem::from(Error::NotFound {
            what: "sweep".into(),
            id: "x".into(),
        });
        assert_eq!(problem.status, StatusCode::NOT_FOUND);
    }
}
