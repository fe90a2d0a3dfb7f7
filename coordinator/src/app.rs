//! The coordinator process: store, start-up grace, reaper, gRPC, metrics and dashboard
//! servers, wired together and run until a shutdown token is cancelled.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::Error;
use crate::grpc;
use crate::metrics::{metrics_router, serve_metrics, Metrics};
use crate::server::{build_router, serve};
use crate::service::{Coordinator, WorkConfig};
use crate::settings::Validated;
use crate::store::Store;
use crate::web::{dashboard_router, serve_dashboard};

/// Returns the work protocol's parameters from the validated settings.
pub fn work_config(settings: &Validated) -> WorkConfig {
    WorkConfig {
        lease_ms: settings.lease.lease_ms,
        heartbeat_interval_ms: settings.lease.heartbeat_interval_ms,
        grace_ms: settings.lease.grace_ms,
        reaper_interval_ms: settings.lease.reaper_interval_ms,
        max_attempts: settings.max_attempts,
        max_grid_points: settings.limits.max_grid_points,
        leases_per_worker: settings.limits.leases_per_worker,
        retry: settings.retry,
        solver_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        weights_dir: settings.weights_dir.clone(),
    }
}

/// Connects the store and returns a started coordinator (running leases got their grace).
pub async fn open(
    settings: &Validated,
    shutdown: CancellationToken,
) -> Result<Arc<Coordinator>, Error> {
    let store = Store::connect_with(&settings.database_url, &settings.pool).await?;
    info!(
        backend = store.backend(),
        "store connected, migrations applied"
    );
    let coordinator = Coordinator::new(
        store,
        work_config(settings),
        Arc::new(Metrics::new()),
        shutdown,
    );
    coordinator.start_up().await?;
    Ok(Arc::new(coordinator))
}

/// Serves gRPC on `listener` (and metrics on `metrics_listener`) with the reaper running,
/// until `shutdown` is cancelled; then stops accepting, lets in-flight calls finish, and
/// returns. Leases stay valid across the restart (the next start-up grants grace).
pub async fn run(
    settings: &Validated,
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let listeners = Listeners {
        grpc: listener,
        metrics: metrics_listener,
        dashboard: None,
    };
    run_all(settings, coordinator, listeners, shutdown).await
}

/// The ports a coordinator serves: gRPC, and optionally Prometheus metrics and the web
/// dashboard (each bound by the caller, so tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
    pub dashboard: Option<TcpListener>,
}

/// Runs like [`run`], with the dashboard ([`crate::web`]) too when `listeners.dashboard` is
/// set, behind the same tokens as gRPC; it stops with the rest.
pub async fn run_all(
    settings: &Validated,
    coordinator: Arc<Coordinator>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
        dashboard: dashboard_listener,
    } = listeners;
    let reaper = tokio::spawn(coordinator.clone().run_reaper(shutdown.clone()));
    let metrics_task = metrics_listener.map(|listener| {
        let router = metrics_router(coordinator.metrics.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_metrics(listener, router, shutdown.cancelled_owned()).await {
                warn!(%error, "metrics server stopped");
            }
        })
    });
    let dashboard_task = dashboard_listener.map(|listener| {
        let router = dashboard_router(coordinator.clone(), settings.tokens.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "dashboard serving");
            if let Err(error) = serve_dashboard(listener, router, shutdown.cancelled_owned()).await {
                warn!(%error, "dashboard server stopped");
            }
        })
    });
    let services = grpc::services(coordinator.clone(), settings.limits.max_message_bytes);
    let (router, _health) = build_router(
        settings,
        services.design,
        services.sweep,
        services.work,
        services.result,
    )
    .await
    .map_err(|error| Error::Internal(error.to_string()))?;
    info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "coordinator serving");
    let served = serve(listener, router, shutdown.clone().cancelled_owned()).await;
    shutdown.cancel();
    let _ = reaper.await;
    for task in [metrics_task, dashboard_task].into_iter().flatten() {
        let _ = task.await;
    }
    coordinator.store.close().await;
    served.map_err(|error| Error::Internal(error.to_string()))
}
