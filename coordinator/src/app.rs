//! The coordinator process: store, start-up grace, reaper, gRPC and metrics servers, wired
//! together and run until a shutdown token is cancelled.

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

/// Returns the work protocol's parameters from the validated settings.
pub fn work_config(settings: &Validated) -> WorkConfig {
    WorkConfig {
        lease_ms: settings.lease.lease_ms,
        heartbeat_interval_ms: settings.lease.heartbeat_interval_ms,
        grace_ms: settings.lease.grace_ms,
        reaper_interval_ms: settings.lease.reaper_interval_ms,
        max_attempts: settings.max_attempts,
        max_grid_points: settings.limits.max_grid_points,
        retry: settings.retry,
        solver_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
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
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    coordinator.store.close().await;
    served.map_err(|error| Error::Internal(error.to_string()))
}
