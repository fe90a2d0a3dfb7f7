//! The outbox: completions the coordinator has not acknowledged, kept in `work_dir/pending/`
//! (temp file, then rename) and reported at the next registration (the next start, or a
//! coordinator that forgot the worker) before leasing.

use std::path::{Path, PathBuf};

use deepmad_design::digest;
use deepmad_proto::v1;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Client, ClientConfig};

/// A report the coordinator has not acknowledged yet, as kept on disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PendingReport {
    attempt_id: String,
    lease_token: String,
    metrics_json: String,
}

fn pending_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("pending")
}

/// Writes an undelivered completion to disk (temp file, then rename).
pub(super) fn keep_pending(work_dir: &Path, request: &v1::CompleteRequest) {
    let metrics = request
        .metrics
        .as_ref()
        .map(prost::Message::encode_to_vec)
        .unwrap_or_default();
    let report = PendingReport {
        attempt_id: request.attempt_id.clone(),
        lease_token: request.lease_token.clone(),
        metrics_json: digest::hex(&metrics),
    };
    let dir = pending_dir(work_dir);
    let stem = match super::id_file_stem(&request.attempt_id, "attempt_id") {
        Ok(stem) => stem,
        Err(error) => {
            warn!(%error, "undelivered result not kept: its attempt id is no file name");
            return;
        }
    };
    let path = dir.join(format!("{stem}.json"));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let temporary = path.with_extension("tmp");
        std::fs::write(
            &temporary,
            serde_json::to_vec(&report).expect("reports serialize"),
        )?;
        std::fs::rename(&temporary, &path)
    };
    match write() {
        Ok(()) => {
            warn!(path = %path.display(), "result kept on disk; it is reported at the next start")
        }
        Err(error) => warn!(%error, "could not keep the undelivered result on disk"),
    }
}

/// Reports results kept on disk (by an earlier run, or for an attempt a coordinator did not
/// know); called at every registration, and each file is removed once acknowledged.
pub(super) async fn deliver_pending(
    client: &mut Client,
    config: &ClientConfig,
    shutdown: &CancellationToken,
) {
    let Ok(entries) = std::fs::read_dir(pending_dir(&config.work_dir)) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if shutdown.is_cancelled() || path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(request) = std::fs::read(&path)
            .ok()
            .and_then(|bytes| pending_request(&bytes))
        else {
            warn!(path = %path.display(), "unreadable pending result left in place");
            continue;
        };
        match super::within(config.call_timeout, client.complete(request)).await {
            Ok(response) => {
                info!(path = %path.display(), outcome = response.into_inner().outcome, "pending result reported");
                let _ = std::fs::remove_file(&path);
            }
            Err(status) => warn!(%status, "pending result still not delivered"),
        }
    }
}

fn pending_request(bytes: &[u8]) -> Option<v1::CompleteRequest> {
    let report: PendingReport = serde_json::from_slice(bytes).ok()?;
    let metrics =
        <v1::FinalMetrics as prost::Message>::decode(hex_decode(&report.metrics_json)?.as_slice())
            .ok()?;
    Some(v1::CompleteRequest {
        attempt_id: report.attempt_id,
        lease_token: report.lease_token,
        metrics: Some(metrics),
    })
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect()
}
