//! The heartbeat task of a running trial: reports progress and new epochs, and stops training
//! when the coordinator says the lease is lost or the sweep was cancelled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepmad_proto::v1;
use tracing::warn;

use super::Client;
use crate::train::control::CancellationFlag;

/// Progress shared between the training thread and the heartbeat task.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) progress: Option<v1::Progress>,
    pub(super) epochs: Vec<v1::EpochMetrics>,
}

/// Why the heartbeat task asked training to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StopCause {
    None,
    LeaseLost,
    Cancelled,
}

pub(super) async fn heartbeat_loop(
    mut client: Client,
    attempt: String,
    token: String,
    shared: Arc<Mutex<Shared>>,
    flag: CancellationFlag,
    cause: Arc<Mutex<StopCause>>,
    every: Duration,
) {
    use v1::heartbeat_response::Directive;
    loop {
        tokio::time::sleep(every).await;
        let (progress, epochs) = {
            let shared = shared.lock().expect("no panics while holding the lock");
            (shared.progress, shared.epochs.clone())
        };
        let request = v1::HeartbeatRequest {
            attempt_id: attempt.clone(),
            lease_token: token.clone(),
            progress,
            epochs: epochs.clone(),
        };
        match client.heartbeat(request).await {
            Ok(response) => {
                // Epochs the coordinator stored need not be sent again.
                shared
                    .lock()
                    .expect("no panics while holding the lock")
                    .epochs
                    .drain(..epochs.len());
                let directive = response.into_inner().directive;
                let stop = match Directive::try_from(directive) {
                    Ok(Directive::StopLeaseLost) => StopCause::LeaseLost,
                    Ok(Directive::StopCancelled) => StopCause::Cancelled,
                    _ => StopCause::None,
                };
                if stop != StopCause::None {
                    *cause.lock().expect("no panics while holding the lock") = stop;
                    flag.cancel();
                    return;
                }
            }
            Err(status) => warn!(%status, "heartbeat failed; the lease runs on until it expires"),
        }
    }
}
