//! Bearer-token authentication with two roles.
//!
//! A **worker** token may call `deepmad.v1.WorkService` only; a **client** token may call
//! every other deepmad service but never `WorkService` (a client cannot lease work, a worker
//! cannot create sweeps). gRPC health and server reflection stay open. With no tokens
//! configured, auth is off; the settings only allow that on a loopback address.
//!
//! [`authorize`] is the whole decision, a pure function; [`AuthLayer`] applies it to every
//! request the server receives and puts the [`Caller`] into the request's extensions, where a
//! handler finds it with `request.extensions().get::<Caller>()`.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use deepmad_design::digest::{hex, sha256};
use subtle::{Choice, ConstantTimeEq};
use tonic::codegen::http;
use tonic::Status;

/// Paths under these prefixes need no token.
const OPEN_PREFIXES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The only service a worker token may call, and a client token may not.
const WORK_SERVICE_PREFIX: &str = "/deepmad.v1.WorkService/";

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Leases, trains and reports work (`WorkService`).
    Worker,
    /// Designs, sweeps and reads results (every service but `WorkService`).
    Client,
}

impl Role {
    /// Returns `worker` or `client`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Client => "client",
        }
    }
}

/// Who made a request, as handlers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Auth is off, or the path is open (health, reflection).
    Anonymous,
    /// A known token. `fingerprint` is the first 8 hex digits of the token's SHA-256: enough
    /// to tell tokens apart in logs and `created_by`, useless for guessing the token.
    Authenticated { role: Role, fingerprint: String },
}

impl Caller {
    /// Returns a name for logs and `created_by`: `anonymous` or `client:1a2b3c4d`.
    pub fn name(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".to_string(),
            Caller::Authenticated { role, fingerprint } => format!("{}:{fingerprint}", role.name()),
        }
    }
}

/// Returns the name of the caller of `request` (see [`Caller::name`]); `anonymous` when the
/// request did not pass through [`AuthLayer`].
pub fn caller_name<T>(request: &tonic::Request<T>) -> String {
    request
        .extensions()
        .get::<Caller>()
        .map_or_else(|| Caller::Anonymous.name(), Caller::name)
}

/// The configured tokens, kept only as SHA-256 digests. Empty: auth is off.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    worker: Vec<[u8; 32]>,
    client: Vec<[u8; 32]>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("worker", &self.worker.len())
            .field("client", &self.client.len())
            .finish()
    }
}

/// Returns the SHA-256 of a token: what [`Tokens`] keeps, and what the dashboard's session
/// cookie holds (`web/auth.rs`), so the cookie is not the token itself.
pub fn digest(token: &str) -> [u8; 32] {
    sha256(token)
}

impl Tokens {
    /// Returns the token sets (the settings check that they are non-empty and disjoint).
    pub fn new(worker: &[String], client: &[String]) -> Tokens {
        Tokens {
            worker: worker.iter().map(|token| digest(token)).collect(),
            client: client.iter().map(|token| digest(token)).collect(),
        }
    }

    /// Returns true when any token is configured, so every non-open call needs one.
    pub fn is_enabled(&self) -> bool {
        !self.worker.is_empty() || !self.client.is_empty()
    }

    /// Returns the role of `token`, comparing against every configured token in constant time.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        self.role_of_digest(&digest(token))
    }

    /// Returns the role of the token whose [`digest`] is `presented`, comparing against every
    /// configured token in constant time.
    pub fn role_of_digest(&self, presented: &[u8; 32]) -> Option<Role> {
        let matches = |set: &[[u8; 32]]| {
            set.iter().fold(Choice::from(0), |found, known| {
                found | known.ct_eq(presented)
            })
        };
        let (worker, client) = (matches(&self.worker), matches(&self.client));
        if bool::from(worker) {
            Some(Role::Worker)
        } else if bool::from(client) {
            Some(Role::Client)
        } else {
            None
        }
    }
}

/// Returns the role a gRPC path needs, or `None` for open paths (health, reflection).
pub fn required_role(path: &str) -> Option<Role> {
    if OPEN_PREFIXES.iter().any(|prefix| path.starts_with(prefix)) {
        None
    } else if path.starts_with(WORK_SERVICE_PREFIX) {
        Some(Role::Worker)
    } else {
        Some(Role::Client)
    }
}

/// Decides whether a call to `path` with this `authorization` header value may proceed.
///
/// `Unauthenticated` for a missing, malformed or unknown token; `PermissionDenied` for a
/// known token of the wrong role.
pub fn authorize(
    path: &str,
    authorization: Option<&str>,
    tokens: &Tokens,
) -> Result<Caller, Status> {
    let Some(required) = required_role(path) else {
        return Ok(Caller::Anonymous);
    };
    if !tokens.is_enabled() {
        return Ok(Caller::Anonymous);
    }
    let header = authorization.ok_or_else(|| {
        Status::unauthenticated(
            "missing authorization header: send `authorization: Bearer <token>`",
        )
    })?;
    let token = bearer_token(header).ok_or_else(|| {
        Status::unauthenticated("malformed authorization header: expected `Bearer <token>`")
    })?;
    let role = tokens
        .role_of(token)
        .ok_or_else(|| Status::unauthenticated("unknown token"))?;
    if role != required {
        let message = match role {
            Role::Worker => "a worker token may only call deepmad.v1.WorkService",
            Role::Client => "a client token may not call deepmad.v1.WorkService",
        };
        return Err(Status::permission_denied(message));
    }
    let fingerprint = hex(&digest(token)[..4]);
    Ok(Caller::Authenticated { role, fingerprint })
}

/// Returns the token of `Bearer <token>` (the scheme is case-insensitive, RFC 7235).
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A tower layer that runs [`authorize`] on every request (see [`crate::server`]).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Arc<Tokens>,
}

impl AuthLayer {
    /// Returns a layer checking against `tokens`.
    pub fn new(tokens: Tokens) -> AuthLayer {
        AuthLayer {
            tokens: Arc::new(tokens),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            tokens: Arc::clone(&self.tokens),
        }
    }
}

/// The service [`AuthLayer`] wraps around the server's routes.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    tokens: Arc<Tokens>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        match authorize(request.uri().path(), header, &self.tokens) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                // The clone is ready only after poll_ready: call the instance that was polled
                // and keep the fresh clone for the next request (tower's documented pattern).
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(ready.call(request))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    const WORKER: &str = "worker-token-0123456789";
    const CLIENT: &str = "client-token-0123456789";

    fn tokens() -> Tokens {
        Tokens::new(&[WORKER.to_string()], &[CLIENT.to_string()])
    }

    fn code(path: &str, header: Option<&str>) -> Result<Caller, Code> {
        authorize(path, header, &tokens()).map_err(|status| status.code())
    }

    #[test]
    fn workers_may_only_call_the_work_service() {
        let bearer = format!("Bearer {WORKER}");
        let caller = code("/deepmad.v1.WorkService/Lease", Some(&bearer)).unwrap();
        assert!(matches!(
            caller,
            Caller::Authenticated {
                role: Role::Worker,
                ..
            }
        ));
        for path in [
            "/deepmad.v1.SweepService/CreateSweep",
            "/deepmad.v1.DesignService/Solve",
            "/deepmad.v1.ResultService/Leaderboard",
            "/deepmad.v2.Future/Call",
        ] {
            assert_eq!(
                code(path, Some(&bearer)),
                Err(Code::PermissionDenied),
                "{path}"
            );
        }
    }

    #[test]
    fn clients_may_not_lease_work() {
        let bearer = format!("Bearer {CLIENT}");
        assert_eq!(
            code("/deepmad.v1.WorkService/Lease", Some(&bearer)),
            Err(Code::PermissionDenied)
        );
        let caller = code("/deepmad.v1.SweepService/CreateSweep", Some(&bearer)).unwrap();
        assert!(matches!(
            caller,
            Caller::Authenticated {
                role: Role::Client,
                ..
            }
        ));
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let path = "/deepmad.v1.SweepService/ListSweeps";
        for header in [
            None,
            Some(""),
            Some(CLIENT),
            Some("Basic dXNlcjpwYXNz"),
            Some("Bearer "),
            Some("Bearer not-a-configured-token"),
        ] {
            assert_eq!(code(path, header), Err(Code::Unauthenticated), "{header:?}");
        }
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        let header = format!("bearer  {CLIENT} ");
        assert!(code("/deepmad.v1.ResultService/Leaderboard", Some(&header)).is_ok());
    }

    #[test]
    fn health_and_reflection_are_open() {
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(code(path, None), Ok(Caller::Anonymous), "{path}");
        }
    }

    #[test]
    fn without_tokens_everything_is_anonymous() {
        let off = Tokens::default();
        assert!(!off.is_enabled());
        let caller = authorize("/deepmad.v1.WorkService/Lease", None, &off).unwrap();
        assert_eq!(caller, Caller::Anonymous);
    }

    #[test]
    fn callers_are_named_by_role_and_fingerprint() {
        let bearer = format!("Bearer {CLIENT}");
        let caller = code("/deepmad.v1.SweepService/GetSweep", Some(&bearer)).unwrap();
        let name = caller.name();
        assert!(name.starts_with("client:"), "{name}");
        assert_eq!(name.len(), "client:".len() + 8);
        assert!(!name.contains(CLIENT));
        assert_eq!(Caller::Anonymous.name(), "anonymous");
    }

    #[test]
    fn token_debug_output_hides_the_tokens() {
        let printed = format!("{:?}", tokens());
        assert!(!printed.contains("token-0123"), "{printed}");
    }
}
