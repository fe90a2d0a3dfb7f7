//! The heartbeat task of a running trial: reports progress and new epochs, and stops training
//! when the coordinator says the lease is lost or the sweep was cancelled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepmad_proto::v1;
use tracing::warn;

use super::Client;
use crate::train::control::CancellationFlag;

/// The heartbeat task of one attempt and what it shares with the training thread: the
/// progress to report, the flag it cancels, and why it did.
pub(super) struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    pub(super) shared: Arc<Mutex<Shared>>,
    pub(super) flag: CancellationFlag,
    cause: Arc<Mutex<StopCause>>,
}

impl Heartbeat {
    /// Starts heartbeating `attempt` every `every`, each call given at most `call_timeout`.
    pub(super) fn start(
        client: Client,
        attempt: &str,
        token: &str,
        timing: (Duration, Duration),
    ) -> Heartbeat {
        Heartbeat::resume(client, attempt, token, timing, None)
    }

    /// Starts heartbeating with `progress` as the last progress to report: after training,
    /// to keep the lease through the weights upload and until the completion is acknowledged
    /// (issue 24: a slow upload let the lease expire and the finished work was discarded).
    pub(super) fn resume(
        client: Client,
        attempt: &str,
        token: &str,
        (every, call_timeout): (Duration, Duration),
        progress: Option<v1::Progress>,
    ) -> Heartbeat {
        let shared = Arc::new(Mutex::new(Shared {
            progress,
            epochs: Vec::new(),
        }));
        let flag = CancellationFlag::new();
        let cause = Arc::new(Mutex::new(StopCause::None));
        let task = tokio::spawn(heartbeat_loop(
            client,
            attempt.to_string(),
            token.to_string(),
            shared.clone(),
            flag.clone(),
            cause.clone(),
            (every, call_timeout),
        ));
        Heartbeat {
            task,
            shared,
            flag,
            cause,
        }
    }

    /// Stops heartbeating; returns why the task stopped training, if it did, and what it had
    /// not reported yet: the last progress and the epochs the coordinator has not stored.
    pub(super) fn stop(self) -> Unreported {
        self.task.abort();
        let cause = *self.cause.lock().expect("no panics while holding the lock");
        let mut shared = self
            .shared
            .lock()
            .expect("no panics while holding the lock");
        Unreported {
            cause,
            progress: shared.progress,
            epochs: std::mem::take(&mut shared.epochs),
        }
    }
}

/// What [`Heartbeat::stop`] returns.
pub(super) struct Unreported {
    pub(super) cause: StopCause,
    pub(super) progress: Option<v1::Progress>,
    pub(super) epochs: Vec<v1::EpochMetrics>,
}

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

async fn heartbeat_loop(
    mut client: Client,
    attempt: String,
    token: String,
    shared: Arc<Mutex<Shared>>,
    flag: CancellationFlag,
    cause: Arc<Mutex<StopCause>>,
    (every, call_timeout): (Duration, Duration),
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
        match super::within(call_timeout, client.heartbeat(request)).await {
            Ok(response) => {
                // Epochs the coordinator stored need not be sent again.
                // Bounded: the epochs may have been taken meanwhile (the task is being stopped).
                let mut shared = shared.lock().expect("no panics while holding the lock");
                let sent = epochs.len().min(shared.epochs.len());
                shared.epochs.drain(..sent);
                drop(shared);
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
            // The coordinator does not know this attempt (its database was restored from a
            // backup taken before the lease): no heartbeat or result of it can ever be
            // accepted, so training stops as if the lease were lost, keeping its checkpoint.
            Err(status) if status.code() == tonic::Code::NotFound => {
                warn!(%attempt, %status, "coordinator does not know this attempt; training stops");
                *cause.lock().expect("no panics while holding the lock") = StopCause::LeaseLost;
                flag.cancel();
                return;
            }
            Err(status) => warn!(%status, "heartbeat failed; the lease runs on until it expires"),
        }
    }
}
