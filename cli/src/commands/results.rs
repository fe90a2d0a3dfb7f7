//! `deepmad leaderboard`, `deepmad results` and `deepmad trials show`: reading results.

use std::io::Write;

use deepmad_proto::v1;

use super::remote::{status_failure, Remote};
use crate::args::{AnalyticsArgs, LeaderboardArgs, ResultsArgs, TableFormat, TrialShowArgs};
use crate::filter::Filter;
use crate::render::{self, family_name};
use crate::Failure;

pub async fn leaderboard(args: &LeaderboardArgs, out: &mut impl Write) -> Result<(), Failure> {
    let family = match &args.block {
        None => 0,
        Some(name) => {
            let family = deepmad_design::solver::Family::parse(name)?;
            v1::Family::from(family) as i32
        }
    };
    let request = v1::LeaderboardRequest {
        sweep_id: args.sweep.clone(),
        dataset: args.dataset.clone(),
        family,
        min_params: super::parse_budget("min-params", args.min_params.as_ref())?,
        max_params: super::parse_budget("max-params", args.max_params.as_ref())?,
        max_flops: super::parse_budget("max-flops", args.max_flops.as_ref())?,
        limit: args.limit,
    };
    let remote = Remote::connect(&args.remote).await?;
    let rows = remote
        .results()
        .leaderboard(request)
        .await
        .map_err(status_failure)?
        .into_inner()
        .rows;
    match args.format {
        TableFormat::Table => render::leaderboard(out, &rows)?,
        TableFormat::Json => {
            let values: Vec<_> = rows.iter().map(leaderboard_json).collect();
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&values).expect("JSON serializes")
            )?;
        }
        TableFormat::Csv => {
            let tasks = render::downstream_names(&rows);
            let task_columns: String = tasks
                .iter()
                .map(|name| format!(",{}", csv_field(&format!("{name}_top1_mean"))))
                .collect();
            writeln!(out, "design_id,family,dataset,recipe_hash,params,flops,layers,effectiveness,entropy,rho,seeds,top1_mean,top1_std,top5_mean{task_columns}")?;
            for row in &rows {
                let task_values: String = tasks
                    .iter()
                    .map(|name| {
                        let value = row.downstream.iter().find(|score| &score.name == name);
                        format!(
                            ",{}",
                            value.map_or(String::new(), |s| s.top1_mean.to_string())
                        )
                    })
                    .collect();
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{}{task_values}",
                    row.design_id,
                    family_name(row.family),
                    csv_field(&row.dataset),
                    row.recipe_hash,
                    row.params,
                    row.flops,
                    row.layers,
                    row.effectiveness,
                    row.entropy,
                    row.rho.map_or(String::new(), |r| r.to_string()),
                    row.seeds,
                    row.top1_mean,
                    row.top1_std,
                    row.top5_mean
                )?;
            }
        }
    }
    Ok(())
}

fn leaderboard_json(row: &v1::LeaderboardRow) -> serde_json::Value {
    serde_json::json!({
        "design_id": row.design_id, "family": family_name(row.family), "dataset": row.dataset,
        "recipe_hash": row.recipe_hash, "params": row.params, "flops": row.flops, "layers": row.layers,
        "effectiveness": row.effectiveness, "entropy": row.entropy, "rho": row.rho, "seeds": row.seeds,
        "top1_mean": row.top1_mean, "top1_std": row.top1_std, "top5_mean": row.top5_mean,
        "downstream": row.downstream.iter().map(|score| serde_json::json!({
            "name": score.name, "task": score.task, "dataset": score.dataset,
            "seeds": score.seeds, "top1_mean": score.top1_mean, "top1_std": score.top1_std,
            "top5_mean": score.top5_mean,
        })).collect::<Vec<_>>(),
    })
}

/// Quotes a CSV field when it holds a comma, a quote or a newline.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

pub async fn results(args: &ResultsArgs, out: &mut impl Write) -> Result<(), Failure> {
    let filters = args
        .filter
        .iter()
        .map(|text| Filter::parse(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::usage)?;
    let remote = Remote::connect(&args.remote).await?;
    if args.downstream {
        return downstream(&remote, &args.sweep, args.format, out).await;
    }
    let rows: Vec<v1::ResultRow> = export_rows(&remote, &args.sweep)
        .await?
        .into_iter()
        .filter(|row| filters.iter().all(|filter| filter.accepts(row)))
        .collect();
    if args.curves {
        return curves(&remote, &rows, args.format, out).await;
    }
    match args.format {
        TableFormat::Json => {
            let values: Vec<_> = rows.iter().map(result_json).collect();
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&values).expect("JSON serializes")
            )?;
        }
        TableFormat::Csv | TableFormat::Table => {
            writeln!(out, "trial_id,design_id,family,dataset,recipe_hash,seed,rho,params,flops,layers,effectiveness,entropy,top1,top5,test_loss,train_seconds,epochs")?;
            for row in &rows {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    row.trial_id,
                    row.design_id,
                    family_name(row.family),
                    csv_field(&row.dataset),
                    row.recipe_hash,
                    row.seed,
                    row.rho.map_or(String::new(), |r| r.to_string()),
                    row.params,
                    row.flops,
                    row.layers,
                    row.effectiveness,
                    row.entropy,
                    row.top1,
                    row.top5,
                    row.test_loss,
                    row.train_seconds,
                    row.epochs
                )?;
            }
        }
    }
    Ok(())
}

/// `deepmad results --downstream`: the sweep's downstream trials, CSV or JSON.
async fn downstream(
    remote: &Remote,
    sweep: &str,
    format: TableFormat,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let rows: Vec<v1::DownstreamRow> = export(remote, sweep).await?.1;
    let state = |row: &v1::DownstreamRow| {
        v1::TrialState::try_from(row.state).map_or_else(
            |_| "-".to_string(),
            |state| {
                state
                    .as_str_name()
                    .trim_start_matches("TRIAL_STATE_")
                    .to_ascii_lowercase()
            },
        )
    };
    let number = |value: Option<f64>| value.map_or(String::new(), |v| v.to_string());
    match format {
        TableFormat::Json => {
            let values: Vec<_> = rows
                .iter()
                .map(|row| {
                    serde_json::json!({
                        "trial_id": row.trial_id, "parent_trial_id": row.parent_trial_id,
                        "design_id": row.design_id, "seed": row.seed, "name": row.name,
                        "task": row.task, "dataset": row.dataset, "state": state(row),
                        "top1": row.top1, "top5": row.top5, "test_loss": row.test_loss,
                        "epochs": row.epochs, "upstream_dataset": row.upstream_dataset,
                        "upstream_recipe_hash": row.upstream_recipe_hash,
                    })
                })
                .collect();
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&values).expect("JSON serializes")
            )?;
        }
        TableFormat::Csv | TableFormat::Table => {
            writeln!(out, "trial_id,parent_trial_id,design_id,seed,name,task,dataset,state,top1,top5,test_loss,epochs")?;
            for row in &rows {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{}",
                    row.trial_id,
                    row.parent_trial_id,
                    row.design_id,
                    row.seed,
                    csv_field(&row.name),
                    row.task,
                    csv_field(&row.dataset),
                    state(row),
                    number(row.top1),
                    number(row.top5),
                    number(row.test_loss),
                    row.epochs.map_or(String::new(), |e| e.to_string()),
                )?;
            }
        }
    }
    Ok(())
}

/// Every result row of a sweep, from the streaming export.
pub(crate) async fn export_rows(
    remote: &Remote,
    sweep: &str,
) -> Result<Vec<v1::ResultRow>, Failure> {
    Ok(export(remote, sweep).await?.0)
}

/// A sweep's whole export: training results and downstream trials.
async fn export(
    remote: &Remote,
    sweep: &str,
) -> Result<(Vec<v1::ResultRow>, Vec<v1::DownstreamRow>), Failure> {
    let request = v1::ExportResultsRequest {
        sweep_id: sweep.to_string(),
    };
    let mut stream = remote
        .results()
        .export_results(request)
        .await
        .map_err(status_failure)?
        .into_inner();
    let (mut rows, mut downstream) = (Vec::new(), Vec::new());
    while let Some(chunk) = stream.message().await.map_err(status_failure)? {
        rows.extend(chunk.rows);
        downstream.extend(chunk.downstream);
    }
    Ok((rows, downstream))
}

/// `deepmad analytics --sweep ID`: accuracy against rho, Pareto fronts and Kendall's tau of
/// entropy against accuracy, computed by the coordinator (`SweepAnalytics`).
pub async fn analytics(args: &AnalyticsArgs, out: &mut impl Write) -> Result<(), Failure> {
    let remote = Remote::connect(&args.remote).await?;
    let analytics = sweep_analytics(&remote, &args.sweep).await?;
    match args.format {
        TableFormat::Json | TableFormat::Csv => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&analytics).expect("JSON serializes")
        )?,
        TableFormat::Table => render::analytics(out, &args.sweep, &analytics)?,
    }
    Ok(())
}

/// A sweep's analytics from the coordinator.
pub(crate) async fn sweep_analytics(
    remote: &Remote,
    sweep: &str,
) -> Result<deepmad_coordinator::analytics::SweepAnalytics, Failure> {
    let request = v1::SweepAnalyticsRequest {
        sweep_id: sweep.to_string(),
    };
    let response = remote
        .results()
        .sweep_analytics(request)
        .await
        .map_err(status_failure)?
        .into_inner();
    Ok(deepmad_coordinator::analytics::SweepAnalytics::from(
        &response,
    ))
}

fn result_json(row: &v1::ResultRow) -> serde_json::Value {
    serde_json::json!({
        "trial_id": row.trial_id, "design_id": row.design_id, "family": family_name(row.family),
        "dataset": row.dataset, "recipe_hash": row.recipe_hash, "seed": row.seed, "rho": row.rho,
        "params": row.params, "flops": row.flops, "layers": row.layers, "effectiveness": row.effectiveness,
        "entropy": row.entropy, "top1": row.top1, "top5": row.top5, "test_loss": row.test_loss,
        "train_seconds": row.train_seconds, "epochs": row.epochs,
    })
}

/// One trial's history from the coordinator.
async fn trial_history(remote: &Remote, trial: &str) -> Result<v1::TrialHistoryResponse, Failure> {
    let request = v1::TrialHistoryRequest {
        trial_id: trial.to_string(),
    };
    Ok(remote
        .results()
        .trial_history(request)
        .await
        .map_err(status_failure)?
        .into_inner())
}

/// The histories of `rows`' trials, one request each.
pub(crate) async fn trial_histories(
    remote: &Remote,
    rows: &[v1::ResultRow],
) -> Result<Vec<v1::TrialHistoryResponse>, Failure> {
    let mut histories = Vec::with_capacity(rows.len());
    for row in rows {
        histories.push(trial_history(remote, &row.trial_id).await?);
    }
    Ok(histories)
}

pub async fn trial(args: &TrialShowArgs, out: &mut impl Write) -> Result<(), Failure> {
    let remote = Remote::connect(&args.remote).await?;
    let history = trial_history(&remote, &args.trial).await?;
    match args.format {
        TableFormat::Table => render::trial(out, &history)?,
        TableFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&history_json(&history)).expect("JSON serializes")
        )?,
        TableFormat::Csv => {
            writeln!(out, "{CURVE_HEADER}")?;
            write_curve_rows(out, &history)?;
        }
    }
    Ok(())
}

/// The columns of a per-epoch curve in CSV.
const CURVE_HEADER: &str =
    "trial_id,design_id,seed,epoch,train_loss,test_loss,top1,top5,images_per_second,learning_rate";

fn write_curve_rows(
    out: &mut impl Write,
    history: &v1::TrialHistoryResponse,
) -> std::io::Result<()> {
    for epoch in &history.epochs {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{}",
            history.trial_id,
            history.design_id,
            history.seed,
            epoch.epoch,
            epoch.train_loss,
            epoch.test_loss,
            epoch.top1,
            epoch.top5,
            epoch.images_per_second,
            epoch.learning_rate
        )?;
    }
    Ok(())
}

fn epoch_json(epoch: &v1::EpochMetrics) -> serde_json::Value {
    serde_json::json!({
        "epoch": epoch.epoch, "train_loss": epoch.train_loss, "test_loss": epoch.test_loss,
        "top1": epoch.top1, "top5": epoch.top5, "images_per_second": epoch.images_per_second,
        "learning_rate": epoch.learning_rate,
    })
}

fn history_json(history: &v1::TrialHistoryResponse) -> serde_json::Value {
    let state = v1::TrialState::try_from(history.state).map_or_else(
        |_| history.state.to_string(),
        |state| {
            state
                .as_str_name()
                .trim_start_matches("TRIAL_STATE_")
                .to_ascii_lowercase()
        },
    );
    let attempts: Vec<_> = history
        .attempts
        .iter()
        .map(|attempt| {
            serde_json::json!({
                "attempt_id": attempt.attempt_id, "worker_id": attempt.worker_id,
                "state": v1::AttemptState::try_from(attempt.state).map_or_else(
                    |_| attempt.state.to_string(),
                    |state| state.as_str_name().trim_start_matches("ATTEMPT_STATE_").to_ascii_lowercase(),
                ),
                "failure_message": attempt.failure_message,
            })
        })
        .collect();
    serde_json::json!({
        "trial_id": history.trial_id, "design_id": history.design_id,
        "dataset": history.dataset, "seed": history.seed, "state": state,
        "attempts": attempts,
        "epochs": history.epochs.iter().map(epoch_json).collect::<Vec<_>>(),
        "result": history.result.as_ref().map(|result| serde_json::json!({
            "top1": result.top1, "top5": result.top5, "test_loss": result.test_loss,
            "train_seconds": result.train_seconds, "epochs": result.epochs,
        })),
        "late_results": history.late_results.len(),
    })
}

/// Every trial's per-epoch curve (`deepmad results --curves`), one history request per trial.
async fn curves(
    remote: &Remote,
    rows: &[v1::ResultRow],
    format: TableFormat,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let histories = trial_histories(remote, rows).await?;
    match format {
        TableFormat::Json => {
            let values: Vec<_> = histories
                .iter()
                .map(|history| {
                    serde_json::json!({
                        "trial_id": history.trial_id, "design_id": history.design_id,
                        "seed": history.seed,
                        "epochs": history.epochs.iter().map(epoch_json).collect::<Vec<_>>(),
                    })
                })
                .collect();
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&values).expect("JSON serializes")
            )?;
        }
        TableFormat::Csv | TableFormat::Table => {
            writeln!(out, "{CURVE_HEADER}")?;
            for history in &histories {
                write_curve_rows(out, history)?;
            }
        }
    }
    Ok(())
}
