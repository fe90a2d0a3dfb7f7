//! Who may open the dashboard: the coordinator's client tokens ([`crate::auth`]), never its
//! worker tokens; with no tokens configured (a loopback address only), everyone.
//!
//! A token is accepted three ways:
//! - `Authorization: Bearer TOKEN`, for scripts;
//! - the login form (`/login`), which sets a session cookie;
//! - `?token=TOKEN` on any GET, which answers with a redirect to the same URL without the
//!   parameter and sets the session cookie, so a link (or a headless browser) opens a page
//!   without the form, and the token stays out of the page and the address bar.
//!
//! The cookie (`deepmad_session`, HttpOnly, SameSite=Strict, a week) holds the token's
//! SHA-256 ([`crate::auth::digest`]), never the token: it opens the dashboard and nothing
//! else. Tokens and digests are compared in constant time by [`Tokens`].
//!
//! Without a valid client token, the JSON API and the page fragments answer 401 with a JSON
//! error; pages redirect to the login form.

use axum::extract::{Form, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use deepmad_design::digest::hex;
use serde::Deserialize;

use super::html::{self, escape, Session};
use super::Dashboard;
use crate::auth::{bearer_token, digest, Role, Tokens};

/// The session cookie's name.
const COOKIE: &str = "deepmad_session";

/// How long a session cookie lasts.
const SESSION_SECONDS: u32 = 7 * 24 * 60 * 60;

/// The query parameter exchanged for a session cookie.
const TOKEN_PARAMETER: &str = "token";

/// Runs before every route but the login form's: lets a client token through (recording the
/// [`Session`] for the page header), exchanges `?token=`, or refuses.
pub(super) async fn require_client(
    State(dashboard): State<Dashboard>,
    mut request: Request,
    next: Next,
) -> Response {
    let tokens = &dashboard.tokens;
    if !tokens.is_enabled() {
        request.extensions_mut().insert(Session::Open);
        return next.run(request).await;
    }
    let path = request.uri().path().to_string();
    if let Some((token, rest)) = token_in_query(request.uri().query()) {
        return exchange(tokens, &token, &path, &rest);
    }
    match check(request.headers(), tokens) {
        Ok(()) => {
            request.extensions_mut().insert(Session::SignedIn);
            next.run(request).await
        }
        Err(reason) if is_for_scripts(&path) => unauthorized(reason),
        Err(_) => {
            let here = match request.uri().query() {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            see_other(&format!("/login?next={}", percent_encode(&here)), None)
        }
    }
}

/// The JSON API and the fragments the pages' script fetches: answered 401, not redirected.
fn is_for_scripts(path: &str) -> bool {
    path.starts_with("/api/") || path.starts_with("/fragments/")
}

/// Checks the bearer header, or else the session cookie.
fn check(headers: &HeaderMap, tokens: &Tokens) -> Result<(), &'static str> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(bearer_token)
            .ok_or("malformed authorization header: expected `Bearer <token>`")?;
        return client_only(tokens.role_of(token));
    }
    match session_digest(headers) {
        Some(digest) => client_only(tokens.role_of_digest(&digest))
            .map_err(|_| "the session's token is no longer accepted: log in again"),
        None => Err(
            "missing credentials: send `Authorization: Bearer <client token>`, or log in at /login",
        ),
    }
}

fn client_only(role: Option<Role>) -> Result<(), &'static str> {
    match role {
        Some(Role::Client) => Ok(()),
        Some(Role::Worker) => Err("a worker token cannot open the dashboard: use a client token"),
        None => Err("unknown token"),
    }
}

fn unauthorized(reason: &str) -> Response {
    let body = serde_json::json!({ "error": reason }).to_string();
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, "Bearer realm=\"deepmad\""),
            (header::CONTENT_TYPE, "application/json"),
        ],
        body,
    )
        .into_response()
}

/// A 303 to `location` (a path of this server), setting `cookie` when given.
fn see_other(location: &str, cookie: Option<String>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/")),
    );
    if let Some(cookie) = cookie {
        headers.insert(
            header::SET_COOKIE,
            HeaderValue::from_str(&cookie).expect("the cookie is hex and fixed text"),
        );
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn session_cookie(token: &str) -> String {
    let value = hex(&digest(token));
    format!("{COOKIE}={value}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Strict")
}

fn cleared_cookie() -> String {
    format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")
}

/// Returns the digest in the request's session cookie, if it holds a well-formed one.
fn session_digest(headers: &HeaderMap) -> Option<[u8; 32]> {
    let prefix = format!("{COOKIE}=");
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|line| line.split(';'))
        .map(str::trim)
        .find_map(|pair| pair.strip_prefix(prefix.as_str()))?;
    parse_hex_digest(value)
}

fn parse_hex_digest(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (index, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16).ok()?;
    }
    Some(digest)
}

/// Exchanges a `?token=` for the session cookie: a redirect to `path` with the query's other
/// parameters (`rest`, as sent). A token that is not a client token gets the login form.
fn exchange(tokens: &Tokens, token: &str, path: &str, rest: &str) -> Response {
    match client_only(tokens.role_of(token)) {
        Ok(()) => {
            let location = if rest.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{rest}")
            };
            see_other(&location, Some(session_cookie(token)))
        }
        Err(reason) => login_form(StatusCode::UNAUTHORIZED, path, Some(reason)),
    }
}

/// Splits a query into the decoded `token` parameter and the other parameters as sent;
/// `None` without a `token` parameter (or with one that is not valid percent-encoded UTF-8,
/// which no token is).
fn token_in_query(query: Option<&str>) -> Option<(String, String)> {
    let query = query?;
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some((TOKEN_PARAMETER, value)) => token = Some(percent_decode(value)?),
            _ => rest.push(pair),
        }
    }
    Some((token?, rest.join("&")))
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => decoded.push(b' '),
            b'%' => {
                let hex = text.get(index + 1..index + 3)?;
                decoded.push(u8::from_str_radix(hex, 16).ok()?);
                index += 2;
            }
            byte => decoded.push(byte),
        }
        index += 1;
    }
    String::from_utf8(decoded).ok()
}

/// Encodes text for a query value: everything but unreserved characters and `/` as `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Where to go after logging in: a path of this server, else the sweeps list (never another
/// site: `//host` and `/\host` are refused).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.contains('\\')
                && !path.chars().any(char::is_control)
                && !path.starts_with("/login") =>
        {
            path.to_string()
        }
        _ => "/".to_string(),
    }
}

fn login_form(status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let error = error.map_or(String::new(), |message| {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape(message))
    });
    let body = format!(
        "<h1>Log in</h1>\n<p class=\"muted\">Use one of the coordinator's client tokens \
         (<code>auth.client_tokens</code>); worker tokens do not open the dashboard.</p>\n\
         {error}<form class=\"login\" method=\"post\" action=\"/login\">\
         <label>client token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" \
         required autofocus></label><input type=\"hidden\" name=\"next\" value=\"{next}\">\
         <button type=\"submit\">log in</button></form>",
        next = escape(&safe_next(Some(next))),
    );
    (status, html::page("log in", Session::Open, &body)).into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct LoginQuery {
    next: Option<String>,
}

/// `GET /login`: the form (or, with auth off, straight on).
pub(super) async fn login_page(
    State(dashboard): State<Dashboard>,
    Query(query): Query<LoginQuery>,
) -> Response {
    let next = safe_next(query.next.as_deref());
    if !dashboard.tokens.is_enabled() {
        return see_other(&next, None);
    }
    login_form(StatusCode::OK, &next, None)
}

#[derive(Debug, Deserialize)]
pub(super) struct LoginForm {
    token: String,
    next: Option<String>,
}

/// `POST /login`: a client token sets the session cookie and goes on to `next`.
pub(super) async fn login(
    State(dashboard): State<Dashboard>,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    if !dashboard.tokens.is_enabled() {
        return see_other(&next, None);
    }
    let token = form.token.trim();
    match client_only(dashboard.tokens.role_of(token)) {
        Ok(()) => see_other(&next, Some(session_cookie(token))),
        Err(reason) => login_form(StatusCode::UNAUTHORIZED, &next, Some(reason)),
    }
}

/// `POST /logout`: clears the session cookie.
pub(super) async fn logout() -> Response {
    see_other("/login", Some(cleared_cookie()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKER: &str = "worker-token-0123456789";
    const CLIENT: &str = "client-token-0123456789";

    fn tokens() -> Tokens {
        Tokens::new(&[WORKER.to_string()], &[CLIENT.to_string()])
    }

    fn headers(pairs: &[(header::HeaderName, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn only_client_tokens_pass() {
        let tokens = tokens();
        let bearer = |token: &str| headers(&[(header::AUTHORIZATION, format!("Bearer {token}"))]);
        assert_eq!(check(&bearer(CLIENT), &tokens), Ok(()));
        let refused = check(&bearer(WORKER), &tokens).unwrap_err();
        assert!(refused.contains("worker token"), "{refused}");
        assert_eq!(
            check(&bearer("nope-nope-nope-nope"), &tokens),
            Err("unknown token")
        );
        assert!(check(&HeaderMap::new(), &tokens).is_err());
        let malformed = headers(&[(header::AUTHORIZATION, CLIENT.to_string())]);
        assert!(check(&malformed, &tokens)
            .unwrap_err()
            .contains("malformed"));
    }

    #[test]
    fn the_session_cookie_holds_the_digest_not_the_token() {
        let tokens = tokens();
        let cookie = session_cookie(CLIENT);
        assert!(!cookie.contains(CLIENT));
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        let value = cookie.split(';').next().unwrap().to_string();
        let sent = headers(&[(header::COOKIE, format!("theme=dark; {value}"))]);
        assert_eq!(check(&sent, &tokens), Ok(()));
        let worker_value = session_cookie(WORKER)
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let sent = headers(&[(header::COOKIE, worker_value)]);
        assert!(check(&sent, &tokens).is_err());
        let garbage = headers(&[(header::COOKIE, format!("{COOKIE}=zz"))]);
        assert!(check(&garbage, &tokens).is_err());
    }

    #[test]
    fn the_token_parameter_is_split_from_the_rest() {
        assert_eq!(token_in_query(None), None);
        assert_eq!(token_in_query(Some("a=1")), None);
        assert_eq!(
            token_in_query(Some("a=1&token=x%2By+z&b=%20")),
            Some(("x+y z".to_string(), "a=1&b=%20".to_string()))
        );
        assert_eq!(
            token_in_query(Some("token=abc")),
            Some(("abc".to_string(), String::new()))
        );
        assert_eq!(token_in_query(Some("token=%zz")), None);
    }

    #[test]
    fn next_stays_on_this_server() {
        assert_eq!(safe_next(Some("/sweeps/1?x=2")), "/sweeps/1?x=2");
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "https://evil.example",
            "/login",
            "",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn percent_encoding_round_trips() {
        let text = "/sweeps/a b?x=1&y=ä";
        assert_eq!(percent_decode(&percent_encode(text)).unwrap(), text);
        assert!(!percent_encode(text).contains('&'));
    }
}
