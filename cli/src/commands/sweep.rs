//! `deepmad sweep create|list|show|cancel|watch|retry`: sweeps on a coordinator.

use std::io::Write;

use deepmad_coordinator::convert::sweep_spec_to_proto;
use deepmad_coordinator::sweep::SweepSpec;
use deepmad_proto::v1;

use super::remote::{status_failure, Remote};
use crate::args::{RemoteArgs, SweepCommand, SweepIdArgs};
use crate::{render, Failure};

pub async fn run(command: &SweepCommand, out: &mut impl Write) -> Result<(), Failure> {
    match command {
        SweepCommand::Create(args) => create(args, out).await,
        SweepCommand::List(args) => {
            let remote = Remote::connect(&args.remote).await?;
            let request = v1::ListSweepsRequest { limit: args.limit };
            let response = remote
                .sweeps()
                .list_sweeps(request)
                .await
                .map_err(status_failure)?;
            render::sweeps(out, &response.into_inner().sweeps)?;
            Ok(())
        }
        SweepCommand::Show(args) => {
            let summary = get(args).await?;
            render::sweep(out, &summary)?;
            Ok(())
        }
        SweepCommand::Cancel(args) => {
            let remote = Remote::connect(&args.remote).await?;
            let request = v1::CancelSweepRequest {
                sweep_id: args.sweep.clone(),
            };
            let summary = remote
                .sweeps()
                .cancel_sweep(request)
                .await
                .map_err(status_failure)?;
            render::sweep(out, &summary.into_inner())?;
            Ok(())
        }
        SweepCommand::Watch(args) => watch(args, out).await,
        SweepCommand::Retry(args) => retry(&args.sweep, &args.remote, out).await,
    }
}

/// Requeues a sweep's failed and dead trials (`sweep retry ID`, `trials retry --sweep ID`).
pub async fn retry(sweep: &str, remote: &RemoteArgs, out: &mut impl Write) -> Result<(), Failure> {
    let remote = Remote::connect(remote).await?;
    let request = v1::RetryTrialsRequest {
        sweep_id: sweep.to_string(),
    };
    let response = remote
        .sweeps()
        .retry_trials(request)
        .await
        .map_err(status_failure)?;
    writeln!(
        out,
        "requeued {} failed or dead trials",
        response.into_inner().requeued
    )?;
    Ok(())
}

async fn get(args: &SweepIdArgs) -> Result<v1::SweepSummary, Failure> {
    let remote = Remote::connect(&args.remote).await?;
    let request = v1::GetSweepRequest {
        sweep_id: args.sweep.clone(),
    };
    let summary = remote
        .sweeps()
        .get_sweep(request)
        .await
        .map_err(status_failure)?;
    Ok(summary.into_inner())
}

async fn create(args: &crate::args::SweepCreateArgs, out: &mut impl Write) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|error| Failure::usage(format!("cannot read {}: {error}", args.file.display())))?;
    let in_file = |error: deepmad_coordinator::error::Error| {
        Failure::usage(format!("{}: {error}", args.file.display()))
    };
    let spec = SweepSpec::from_toml(&text).map_err(in_file)?;
    // The coordinator checks again; checking here refuses a bad file before connecting.
    spec.validate_fields().map_err(in_file)?;
    let wire = sweep_spec_to_proto(&spec).map_err(in_file)?;
    let remote = Remote::connect(&args.remote).await?;
    let request = v1::CreateSweepRequest { spec: Some(wire) };
    let response = remote
        .sweeps()
        .create_sweep(request)
        .await
        .map_err(status_failure)?;
    render::sweep_created(out, &response.into_inner())?;
    Ok(())
}

async fn watch(args: &SweepIdArgs, out: &mut impl Write) -> Result<(), Failure> {
    let remote = Remote::connect(&args.remote).await?;
    let request = v1::WatchSweepRequest {
        sweep_id: args.sweep.clone(),
    };
    let mut stream = remote
        .sweeps()
        .watch_sweep(request)
        .await
        .map_err(status_failure)?
        .into_inner();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} trials done  {msg}  [{elapsed_precise}, eta {eta}]",
        )
        .expect("the template is valid"),
    );
    let mut last = None;
    while let Some(message) = stream.message().await.map_err(status_failure)? {
        let Some(summary) = message.sweep else {
            continue;
        };
        let counts = summary.counts.unwrap_or_default();
        let done = counts.succeeded + counts.failed + counts.dead;
        bar.set_length(u64::from(done + counts.queued + counts.running));
        bar.set_position(u64::from(done));
        let best = summary
            .best_top1
            .map_or("-".to_string(), |b| format!("{:.2}%", b * 100.0));
        bar.set_message(format!(
            "running {}  failed {}  best top-1 {best}",
            counts.running,
            counts.failed + counts.dead
        ));
        last = Some(summary);
    }
    bar.finish();
    if let Some(summary) = last {
        render::sweep(out, &summary)?;
    }
    Ok(())
}
