//! The server plumbing through real sockets on 127.0.0.1:0: auth in front of the deepmad
//! services, health, reflection, TLS, graceful shutdown, the metrics endpoint, and the
//! settings' file layer. The deepmad services here are stubs that answer `Unimplemented`
//! with the caller's name, so the tests see what the auth layer let through.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deepmad_coordinator::auth::caller_name;
use deepmad_coordinator::metrics::{self, Metrics};
use deepmad_coordinator::server::{self, CoordinatorRouter, SERVICE_NAMES};
use deepmad_coordinator::settings::{self, Overrides, Settings, SettingsError, Validated};
use deepmad_proto::v1;
use deepmad_proto::v1::design_service_server::{DesignService, DesignServiceServer};
use deepmad_proto::v1::result_service_server::{ResultService, ResultServiceServer};
use deepmad_proto::v1::sweep_service_server::{SweepService, SweepServiceServer};
use deepmad_proto::v1::work_service_server::{WorkService, WorkServiceServer};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Mutex};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const WORKER: &str = "worker-token-0123456789";
const CLIENT: &str = "client-token-0123456789";

type Answer<T> = Result<Response<T>, Status>;
type Stream<T> = tokio_stream::Once<Result<T, Status>>;

/// Answers every call with `Unimplemented` carrying the caller's name.
fn caller<T>(request: &Request<T>) -> Status {
    Status::unimplemented(caller_name(request))
}

#[derive(Debug, Default)]
struct Stub {
    /// When set, `Lease` signals `started` and waits for `release` before answering.
    lease_gate: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
}

#[tonic::async_trait]
impl DesignService for Stub {
    async fn analyze(&self, request: Request<v1::AnalyzeRequest>) -> Answer<v1::AnalyzeResponse> {
        Err(caller(&request))
    }
    async fn solve(&self, request: Request<v1::SolveRequest>) -> Answer<v1::SolveResponse> {
        Err(caller(&request))
    }
}

#[tonic::async_trait]
impl SweepService for Stub {
    type WatchSweepStream = Stream<v1::SweepProgress>;
    async fn create_sweep(
        &self,
        request: Request<v1::CreateSweepRequest>,
    ) -> Answer<v1::CreateSweepResponse> {
        Err(caller(&request))
    }
    async fn get_sweep(&self, request: Request<v1::GetSweepRequest>) -> Answer<v1::SweepSummary> {
        Err(caller(&request))
    }
    async fn list_sweeps(
        &self,
        request: Request<v1::ListSweepsRequest>,
    ) -> Answer<v1::ListSweepsResponse> {
        Err(caller(&request))
    }
    async fn cancel_sweep(
        &self,
        request: Request<v1::CancelSweepRequest>,
    ) -> Answer<v1::SweepSummary> {
        Err(caller(&request))
    }
    async fn retry_trials(
        &self,
        request: Request<v1::RetryTrialsRequest>,
    ) -> Answer<v1::RetryTrialsResponse> {
        Err(caller(&request))
    }
    async fn watch_sweep(
        &self,
        request: Request<v1::WatchSweepRequest>,
    ) -> Answer<Self::WatchSweepStream> {
        Err(caller(&request))
    }
}

#[tonic::async_trait]
impl WorkService for Stub {
    type FetchWeightsStream = Stream<v1::WeightsChunk>;
    async fn upload_weights(
        &self,
        request: Request<tonic::Streaming<v1::WeightsChunk>>,
    ) -> Answer<v1::UploadWeightsResponse> {
        Err(caller(&request))
    }
    async fn fetch_weights(
        &self,
        request: Request<v1::FetchWeightsRequest>,
    ) -> Answer<Self::FetchWeightsStream> {
        Err(caller(&request))
    }
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Answer<v1::RegisterResponse> {
        Err(caller(&request))
    }
    async fn lease(&self, request: Request<v1::LeaseRequest>) -> Answer<v1::LeaseResponse> {
        let gate = self.lease_gate.lock().await.take();
        let Some((started, release)) = gate else {
            return Err(caller(&request));
        };
        started
            .send(())
            .expect("the test waits for the call to start");
        release.await.expect("the test releases the call");
        Ok(Response::new(v1::LeaseResponse {
            assignment: None,
            retry_after_ms: 7,
        }))
    }
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Answer<v1::HeartbeatResponse> {
        Err(caller(&request))
    }
    async fn complete(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Answer<v1::CompleteResponse> {
        Err(caller(&request))
    }
    async fn fail(&self, request: Request<v1::FailRequest>) -> Answer<v1::FailResponse> {
        Err(caller(&request))
    }
}

#[tonic::async_trait]
impl ResultService for Stub {
    type ExportResultsStream = Stream<v1::ExportResultsResponse>;
    async fn leaderboard(
        &self,
        request: Request<v1::LeaderboardRequest>,
    ) -> Answer<v1::LeaderboardResponse> {
        Err(caller(&request))
    }
    async fn trial_history(
        &self,
        request: Request<v1::TrialHistoryRequest>,
    ) -> Answer<v1::TrialHistoryResponse> {
        Err(caller(&request))
    }
    async fn export_results(
        &self,
        request: Request<v1::ExportResultsRequest>,
    ) -> Answer<Self::ExportResultsStream> {
        Err(caller(&request))
    }
    async fn sweep_analytics(
        &self,
        request: Request<v1::SweepAnalyticsRequest>,
    ) -> Answer<v1::SweepAnalyticsResponse> {
        Err(caller(&request))
    }
}

fn settings_with_tokens() -> Validated {
    let mut settings = Settings::default();
    settings.auth.worker_tokens = vec![WORKER.into()];
    settings.auth.client_tokens = vec![CLIENT.into()];
    settings.validate().unwrap()
}

async fn router_with_stubs(settings: &Validated, stub: Arc<Stub>) -> CoordinatorRouter {
    let (router, _health) = server::build_router(
        settings,
        DesignServiceServer::from_arc(stub.clone()),
        SweepServiceServer::from_arc(stub.clone()),
        WorkServiceServer::from_arc(stub.clone()),
        ResultServiceServer::from_arc(stub),
    )
    .await
    .unwrap();
    router
}

/// A running server: its address, its shutdown trigger and its task.
struct Running {
    address: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

/// Binds 127.0.0.1:0 before spawning, so clients can connect at once.
async fn start(router: CoordinatorRouter) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (shutdown, signal) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listener, router, async {
        let _ = signal.await;
    }));
    Running {
        address,
        shutdown,
        task,
    }
}

async fn channel(address: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test]
async fn the_auth_layer_guards_every_deepmad_service() {
    let settings = settings_with_tokens();
    let running = start(router_with_stubs(&settings, Arc::default()).await).await;
    let channel = channel(running.address).await;
    let mut work = v1::work_service_client::WorkServiceClient::new(channel.clone());
    let mut sweeps = v1::sweep_service_client::SweepServiceClient::new(channel);

    let lease = |token| {
        with_token(
            v1::LeaseRequest {
                worker_id: "w".into(),
            },
            token,
        )
    };
    assert_eq!(
        work.lease(lease(None)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        work.lease(lease(Some("nope-nope-nope-nope")))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        work.lease(lease(Some(CLIENT))).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let passed = work.lease(lease(Some(WORKER))).await.unwrap_err();
    assert_eq!(passed.code(), Code::Unimplemented, "{passed:?}");
    assert!(passed.message().starts_with("worker:"), "{passed:?}");

    let list = |token| with_token(v1::ListSweepsRequest { limit: 1 }, token);
    assert_eq!(
        sweeps
            .list_sweeps(list(Some(WORKER)))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let passed = sweeps.list_sweeps(list(Some(CLIENT))).await.unwrap_err();
    assert_eq!(passed.code(), Code::Unimplemented);
    assert!(passed.message().starts_with("client:"), "{passed:?}");
    running.shutdown.send(()).unwrap();
    running.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn without_tokens_callers_are_anonymous() {
    let settings = Settings::default().validate().unwrap();
    let running = start(router_with_stubs(&settings, Arc::default()).await).await;
    let mut work = v1::work_service_client::WorkServiceClient::new(channel(running.address).await);
    let status = work.lease(v1::LeaseRequest::default()).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unimplemented, "anonymous")
    );
}

#[tokio::test]
async fn health_reports_every_service_serving_without_a_token() {
    let settings = settings_with_tokens();
    let running = start(router_with_stubs(&settings, Arc::default()).await).await;
    let mut health = HealthClient::new(channel(running.address).await);
    for service in std::iter::once("").chain(SERVICE_NAMES) {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let answer = health.check(request).await.unwrap().into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = HealthCheckRequest {
        service: "deepmad.v1.Nope".into(),
    };
    assert_eq!(
        health.check(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn reflection_lists_the_services_without_a_token() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let settings = settings_with_tokens();
    let (router, _health) = server::base_router(&settings).await.unwrap();
    let running = start(router).await;
    let mut reflection = ServerReflectionClient::new(channel(running.address).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list, got {answer:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for name in SERVICE_NAMES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(
            names.iter().any(|listed| listed == name),
            "{name} not in {names:?}"
        );
    }

    // What `grpcurl describe` does next: the file defining a service, then its imports.
    for (request, expected) in [
        (
            MessageRequest::FileContainingSymbol("deepmad.v1.WorkService".into()),
            "deepmad/v1/work.proto",
        ),
        (
            MessageRequest::FileByFilename("google/protobuf/timestamp.proto".into()),
            "google/protobuf/timestamp.proto",
        ),
    ] {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::once(request))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().expect("one answer");
        let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
            panic!("expected file descriptors for {expected}, got {answer:?}");
        };
        let names: Vec<String> = files
            .file_descriptor_proto
            .iter()
            .map(|bytes| {
                prost_types::FileDescriptorProto::decode(bytes.as_slice())
                    .unwrap()
                    .name()
                    .to_string()
            })
            .collect();
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} not in {names:?}"
        );
    }
}

#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish() {
    let settings = Settings::default().validate().unwrap();
    let stub = Arc::new(Stub::default());
    let (started_tx, started_rx) = oneshot::channel();
    let (release_tx, release_rx) = oneshot::channel();
    *stub.lease_gate.lock().await = Some((started_tx, release_rx));
    let running = start(router_with_stubs(&settings, stub).await).await;
    let mut work = v1::work_service_client::WorkServiceClient::new(channel(running.address).await);
    let call = tokio::spawn(async move { work.lease(v1::LeaseRequest::default()).await });

    started_rx.await.unwrap();
    running.shutdown.send(()).unwrap();
    tokio::task::yield_now().await;
    assert!(
        !running.task.is_finished(),
        "the server stopped before the call finished"
    );
    release_tx.send(()).unwrap();
    let answer = call.await.unwrap().unwrap().into_inner();
    assert_eq!(answer.retry_after_ms, 7);
    running.task.await.unwrap().unwrap();
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// The clients' own connector (`deepmad worker --ca-cert`, `deepmad ... --ca-cert`) reaches a
/// TLS coordinator by IP, verifying the certificate against the given CA.
#[tokio::test]
async fn the_deepmad_client_connector_speaks_tls_with_a_ca_file() {
    let mut raw = Settings::default();
    raw.tls.cert_path = Some(fixture("server.pem"));
    raw.tls.key_path = Some(fixture("server.key"));
    let settings = raw.validate().unwrap();
    let running = start(router_with_stubs(&settings, Arc::default()).await).await;
    let url = format!("https://{}", running.address);
    let ca = fixture("ca.pem");
    let channel = deepmad_proto::client::endpoint(&url, Some(&ca))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
    // Trusting the wrong CA (the server's own certificate is not a CA) fails the handshake.
    let wrong = deepmad_proto::client::endpoint(&url, Some(&fixture("server.pem"))).unwrap();
    let refused = match wrong.connect().await {
        Err(_) => true,
        Ok(channel) => HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from an untrusted CA was accepted");
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca() {
    let mut raw = Settings::default();
    raw.tls.cert_path = Some(fixture("server.pem"));
    raw.tls.key_path = Some(fixture("server.key"));
    let settings = raw.validate().unwrap();
    let running = start(router_with_stubs(&settings, Arc::default()).await).await;
    let ca = Certificate::from_pem(std::fs::read(fixture("ca.pem")).unwrap());
    let tls = ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("localhost");
    let endpoint = Endpoint::from_shared(format!("https://{}", running.address)).unwrap();
    let channel = endpoint.tls_config(tls).unwrap().connect().await.unwrap();
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);

    // A plaintext client gets no gRPC answer from a TLS server.
    let plain = Endpoint::from_shared(format!("http://{}", running.address)).unwrap();
    if let Ok(channel) = plain.connect().await {
        let result = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await;
        assert!(result.is_err());
    }
}

#[tokio::test]
async fn a_key_that_is_not_a_key_fails_at_start_up() {
    let mut raw = Settings::default();
    raw.tls.cert_path = Some(fixture("server.pem"));
    raw.tls.key_path = Some(fixture("ca.pem"));
    let settings = raw.validate().unwrap();
    let error = server::base_router(&settings).await.unwrap_err();
    assert!(error.to_string().contains("tls.key_path"), "{error}");
}

#[test]
fn tls_files_are_read_at_start_up_naming_the_key() {
    let mut raw = Settings::default();
    raw.tls.cert_path = Some(fixture("missing.pem"));
    raw.tls.key_path = Some(fixture("server.key"));
    assert_eq!(key_of(raw.validate().unwrap_err()), "tls.cert_path");
    raw.tls.cert_path = Some(fixture("README.md"));
    assert_eq!(key_of(raw.validate().unwrap_err()), "tls.cert_path");
}

fn key_of(error: SettingsError) -> String {
    match error {
        SettingsError::Invalid { key, .. } => key,
        other => panic!("expected a validation error, got {other}"),
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_settings_file_sits_between_defaults_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    let text = "listen = \"127.0.0.1:6000\"\n\
                [database]\nurl = \"sqlite://file.db\"\n\
                [lease]\nlease_ms = 40000\nheartbeat_interval_ms = 4000\n\
                [retry]\nmax_attempts = 4\n";
    std::fs::write(&path, text).unwrap();
    let validated = settings::load(
        Some(&path),
        env(&[("DEEPMAD__LEASE__LEASE_MS", "50000")]),
        &Overrides {
            listen: Some("127.0.0.1:6001".into()),
            database_url: None,
        },
    )
    .unwrap();
    assert_eq!(validated.listen, "127.0.0.1:6001".parse().unwrap());
    assert_eq!(validated.database_url, "sqlite://file.db");
    assert_eq!(validated.lease.lease_ms, 50_000);
    assert_eq!(validated.lease.heartbeat_interval_ms, 4_000);
    // The grace period defaults to the lease in force: the environment's.
    assert_eq!(validated.lease.grace_ms, 50_000);
    assert_eq!(validated.max_attempts, 4);
    assert_eq!(validated.limits.max_grid_points, 10_000);
}

#[test]
fn unknown_keys_and_missing_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, "[lease]\nlease_ms = 40000\nlease_secs = 4\n").unwrap();
    let error = settings::load(Some(&path), Vec::new(), &Overrides::default()).unwrap_err();
    assert_eq!(key_of(error), "lease.lease_secs");

    std::fs::write(&path, "[leases]\nlease_ms = 40000\n").unwrap();
    let error = settings::load(Some(&path), Vec::new(), &Overrides::default()).unwrap_err();
    assert_eq!(key_of(error), "leases");

    let missing = dir.path().join("missing.toml");
    let error = settings::load(Some(&missing), Vec::new(), &Overrides::default()).unwrap_err();
    assert!(error.to_string().contains("missing.toml"), "{error}");

    std::fs::write(&path, "[lease\n").unwrap();
    let error = settings::load(Some(&path), Vec::new(), &Overrides::default()).unwrap_err();
    assert!(matches!(error, SettingsError::Load { .. }), "{error}");
}

/// Sends one HTTP/1.1 request and returns the whole response.
async fn http_get(address: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn the_metrics_endpoint_serves_prometheus_text() {
    let metrics = Arc::new(Metrics::new());
    metrics.lease_granted();
    metrics.trial_duration(90.0);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (shutdown, signal) = oneshot::channel::<()>();
    let router = metrics::metrics_router(metrics.clone());
    let task = tokio::spawn(metrics::serve_metrics(listener, router, async {
        let _ = signal.await;
    }));

    let response = http_get(address, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{response}"
    );
    assert!(
        response.contains("\ndeepmad_leases_granted_total 1\n"),
        "{response}"
    );
    assert!(
        response.contains("deepmad_trial_duration_seconds_count 1"),
        "{response}"
    );
    metrics.lease_granted();
    assert!(http_get(address, "/metrics")
        .await
        .contains("\ndeepmad_leases_granted_total 2\n"));
    assert!(http_get(address, "/other")
        .await
        .starts_with("HTTP/1.1 404"));

    shutdown.send(()).unwrap();
    task.await.unwrap().unwrap();
}
