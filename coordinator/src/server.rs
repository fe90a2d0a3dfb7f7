//! The gRPC server's plumbing, in two steps: build a router, then serve it.
//!
//! [`build_router`] takes the validated settings and the four generated services
//! (`DesignServiceServer<T>`, ..., each already given its message-size limits) and returns a
//! tonic router with bearer-token auth ([`crate::auth`]) in front of every call, gRPC health
//! (every deepmad service reported `SERVING`), server reflection (so `grpcurl` needs no
//! `.proto` files) and TLS when configured. [`serve`] runs a
//! router on a bound listener until a shutdown future completes, then stops accepting and
//! lets in-flight calls finish. [`base_router`] is the first step without the deepmad
//! services, for tests and tools.
//!
//! ```ignore
//! let listener = TcpListener::bind(settings.listen).await?;
//! let services = grpc::services(coordinator, settings.limits.max_message_bytes);
//! let (router, health) = server::build_router(
//!     &settings, services.design, services.sweep, services.work, services.result,
//! ).await?;
//! server::serve(listener, router, token.cancelled_owned()).await?;
//! ```
//!
//! Graceful shutdown waits for open server streams (`WatchSweep`, `ExportResults`) to end,
//! so those streams must end on shutdown themselves.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use deepmad_proto::v1;
use tokio::net::TcpListener;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower::layer::util::{Identity as NoLayer, Stack};

use crate::auth::AuthLayer;
use crate::settings::Validated;

/// The middleware every call passes through: auth.
pub type Layers = Stack<AuthLayer, NoLayer>;

/// A router with the coordinator's middleware.
pub type CoordinatorRouter = Router<Layers>;

/// HTTP/2 keep-alive pings, so dead worker connections are noticed while idle.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// The names the health service reports, one per deepmad service.
pub const SERVICE_NAMES: [&str; 4] = [
    v1::design_service_server::SERVICE_NAME,
    v1::sweep_service_server::SERVICE_NAME,
    v1::work_service_server::SERVICE_NAME,
    v1::result_service_server::SERVICE_NAME,
];

/// Why the server could not be built or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configured certificate or key cannot be used; the text is the whole error chain.
    #[error("invalid TLS identity (tls.cert_path, tls.key_path): {0}")]
    Tls(String),
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server stopped with an error; the text is the whole error chain.
    #[error("the gRPC server failed: {0}")]
    Transport(String),
}

/// Returns an error and its sources, `: `-separated (tonic's own text is only
/// "transport error").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A tonic-generated service (`WorkServiceServer<T>`, ...) as [`Router::add_service`] takes
/// it; every generated server is one.
pub trait GrpcService:
    tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> GrpcService for T where
    T: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Returns the server builder: TLS when configured, keep-alives, a span per call, and auth.
pub fn server_builder(settings: &Validated) -> Result<Server<Layers>, ServerError> {
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()));
    if let Some(tls) = &settings.tls {
        let identity = Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        server = server
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|error| ServerError::Tls(error_chain(&error)))?;
    }
    Ok(server.layer(AuthLayer::new(settings.tokens.clone())))
}

/// Returns a router with auth, health and reflection but no deepmad service, and the health
/// reporter (the overall status `""` is `SERVING`).
pub async fn base_router(
    settings: &Validated,
) -> Result<(CoordinatorRouter, HealthReporter), ServerError> {
    let mut server = server_builder(settings)?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection_v1 = reflection_builder().build_v1()?;
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;
    let router = server
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((router, reporter))
}

/// The descriptors reflection serves: deepmad's and the health service's.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Returns the full router: [`base_router`] plus the four deepmad services, each reported
/// `SERVING` by the health service. The services come wrapped in their generated servers
/// (`DesignServiceServer::new(handler)`), with the message-size limits of
/// `settings.limits.max_message_bytes` applied by the caller
/// (`.max_decoding_message_size(limit).max_encoding_message_size(limit)`): a generic
/// service has no such methods.
pub async fn build_router<D, S, W, R>(
    settings: &Validated,
    design: D,
    sweep: S,
    work: W,
    result: R,
) -> Result<(CoordinatorRouter, HealthReporter), ServerError>
where
    D: GrpcService,
    S: GrpcService,
    W: GrpcService,
    R: GrpcService,
{
    let (router, reporter) = base_router(settings).await?;
    let router = router
        .add_service(design)
        .add_service(sweep)
        .add_service(work)
        .add_service(result);
    for name in [D::NAME, S::NAME, W::NAME, R::NAME] {
        reporter
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    Ok((router, reporter))
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting
/// connections and waits for in-flight calls to finish.
pub async fn serve(
    listener: TcpListener,
    router: CoordinatorRouter,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|error| ServerError::Transport(error_chain(&error)))
}
