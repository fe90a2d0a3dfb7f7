//! A design's page in a sweep: what is stored about it, its stage table and the DeepMAD
//! analysis (`deepmad_design::score::analyze_paper`), its results and training curves in the
//! sweep, its downstream results, and its canonical architecture JSON.

use axum::extract::{Extension, Path, State};
use axum::response::Html;
use deepmad_design::score::{
    analyze_paper, default_alpha, scale_count, Analysis, StageReport, DEFAULT_BETA,
};
use deepmad_design::units::format_count;
use deepmad_design::Network;

use super::html::{self, escape, facts, link, page, percent, percent_or_dash, Session};
use super::{parse_design, parse_sweep, Dashboard, PageProblem, Problem};
use crate::error::Error;
use crate::model::{DesignId, SweepId};
use crate::plot::{self, Curve};
use crate::service::Coordinator;
use crate::store::{DownstreamRecord, NewDesign, ResultRecord};

/// `GET /sweeps/{id}/designs/{design}`.
pub(super) async fn design(
    State(dashboard): State<Dashboard>,
    Extension(session): Extension<Session>,
    Path((sweep, design)): Path<(String, String)>,
) -> Result<Html<String>, PageProblem> {
    let sweep_id = parse_sweep(&sweep)?;
    let design_id = parse_design(&design)?;
    let coordinator = &dashboard.coordinator;
    let summary = coordinator.get_sweep(sweep_id).await?;
    let stored = coordinator.get_design(&design_id).await?;
    let network = Network::from_json(&stored.architecture_json).map_err(|error| {
        Problem::from(Error::Internal(format!(
            "stored design {design_id} does not parse: {error}"
        )))
    })?;
    let alpha = default_alpha(scale_count(&network));
    let analysis = analyze_paper(&network, &alpha, DEFAULT_BETA).map_err(|error| {
        Problem::from(Error::Internal(format!(
            "stored design {design_id} cannot be analyzed: {error}"
        )))
    })?;
    let results = design_results(coordinator, sweep_id, &design_id).await?;
    let curves = design_curves(coordinator, &results).await?;
    let downstream: Vec<DownstreamRecord> = coordinator
        .downstream_results(sweep_id)
        .await?
        .into_iter()
        .filter(|record| record.design_id == design_id)
        .collect();
    let short = plot::short(&design_id.0);
    let title = format!("design {short}");
    let body = format!(
        "<h1>Design <code>{short}</code></h1>\n<p>in sweep {sweep_link} \
         <span class=\"muted id\">{design_id}</span></p>\n{stored}\n\
         <h2>Stages</h2>\n{stages}\n<h2>Analysis</h2>\n{analysis}\n\
         <h2>Results in this sweep</h2>\n{results}\n<h2>Training curves</h2>\n{curves}\n\
         <h2>Downstream results</h2>\n{downstream}\n\
         <h2>Architecture</h2>\n<details><summary>canonical JSON (its SHA-256 is the design's id)\
         </summary><pre>{json}</pre></details>",
        short = escape(short),
        sweep_link = link(&format!("/sweeps/{sweep_id}"), &summary.name),
        design_id = escape(&design_id.0),
        stored = stored_facts(&stored),
        stages = stage_table(&network, &analysis),
        analysis = analysis_html(&analysis),
        results = results_table(&results),
        curves = curves_html(&title, &curves)?,
        downstream = downstream_table(&downstream),
        json = escape(&pretty_json(&stored.architecture_json)),
    );
    Ok(page(&title, session, &body))
}

/// The design's results in the sweep, by seed.
async fn design_results(
    coordinator: &Coordinator,
    sweep: SweepId,
    design: &DesignId,
) -> Result<Vec<ResultRecord>, Error> {
    let mut results: Vec<ResultRecord> = coordinator
        .export_results(sweep)
        .await?
        .into_iter()
        .filter(|record| &record.design_id == design)
        .collect();
    results.sort_by_key(|record| (record.seed, record.trial.0));
    Ok(results)
}

async fn design_curves(
    coordinator: &Coordinator,
    results: &[ResultRecord],
) -> Result<Vec<Curve>, Error> {
    let mut curves = Vec::with_capacity(results.len());
    for result in results {
        curves.push(Curve::from_history(
            &coordinator.trial_history(result.trial).await?,
        ));
    }
    Ok(curves)
}

fn stored_facts(design: &NewDesign) -> String {
    facts(&[
        ("family", escape(&design.family)),
        (
            "solved for",
            format!(
                "the {} objective, {}x{} input, {} classes (solver {})",
                escape(&design.objective_kind),
                design.resolution,
                design.resolution,
                design.num_classes,
                escape(&design.solver_version)
            ),
        ),
        ("parameters", count(design.params)),
        ("FLOPs", count(design.flops)),
        ("layers", design.layers.to_string()),
        ("effectiveness rho", format!("{:.4}", design.effectiveness)),
        ("entropy", format!("{:.3}", design.entropy)),
        ("penalty", format!("{:.3}", design.penalty)),
        ("objective", format!("{:.3}", design.objective)),
    ])
}

fn count(value: i64) -> String {
    format!(
        "{value} ({})",
        format_count(u64::try_from(value).unwrap_or(0))
    )
}

/// The stem, each stage and the head, as `deepmad analyze` shows them.
fn stage_table(network: &Network, analysis: &Analysis) -> String {
    let outline = format!(
        "{}x{}x{} input; {}",
        network.resolution,
        network.resolution,
        network.in_channels,
        network.outline()
    );
    let rows: Vec<Vec<String>> = analysis
        .stages
        .iter()
        .enumerate()
        .map(|(index, stage)| {
            let mut cells = stage.cells(index);
            cells[1] = escape(&cells[1]);
            cells.push(stage.layers.to_string());
            cells
        })
        .collect();
    let mut headers = StageReport::HEADERS.to_vec();
    headers.push("layers");
    format!(
        "<p class=\"muted\">{}</p>\n{}",
        escape(&outline),
        html::table("stages", &headers, 2, &rows,)
    )
}

/// The per-scale entropy terms and the totals (the paper's scoring, its default weights).
fn analysis_html(analysis: &Analysis) -> String {
    let rows: Vec<Vec<String>> = analysis
        .scales
        .iter()
        .enumerate()
        .map(|(index, scale)| {
            vec![
                (index + 1).to_string(),
                scale.side.to_string(),
                scale.channels.to_string(),
                format!("{:.3}", scale.log_width_sum),
                format!("{}", scale.alpha),
                format!("{:.3}", scale.entropy),
            ]
        })
        .collect();
    let totals = facts(&[
        (
            "effectiveness rho",
            format!("{:.4}", analysis.effectiveness),
        ),
        ("weighted entropy", format!("{:.3}", analysis.entropy)),
        ("depth penalty", format!("{:.3}", analysis.penalty)),
        (
            "objective",
            format!("{:.3} (beta {})", analysis.objective, analysis.beta),
        ),
    ]);
    format!(
        "<p class=\"muted\">DeepMAD's scoring (paper conventions) with the default weights: \
         alpha 1 per scale and 8 for the last, beta {DEFAULT_BETA}.</p>\n{}\n{totals}",
        html::table(
            "scales",
            &["scale", "side", "channels", "sum ln w", "alpha", "entropy"],
            1,
            &rows,
        )
    )
}

fn results_table(results: &[ResultRecord]) -> String {
    if results.is_empty() {
        return "<p class=\"muted\">No results in this sweep yet.</p>".into();
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|result| {
            let trial = result.trial.to_string();
            vec![
                format!(
                    "<a href=\"/api/trials/{trial}\"><code>{}</code></a>",
                    escape(plot::short(&trial))
                ),
                escape(&result.dataset),
                result.seed.to_string(),
                percent(result.top1),
                percent(result.top5),
                format!("{:.4}", result.test_loss),
                result.epochs.to_string(),
                format!("{:.1}", result.train_seconds),
            ]
        })
        .collect();
    html::table(
        "results",
        &[
            "trial",
            "dataset",
            "seed",
            "top-1 %",
            "top-5 %",
            "test loss",
            "epochs",
            "train s",
        ],
        2,
        &rows,
    )
}

fn curves_html(title: &str, curves: &[Curve]) -> Result<String, Problem> {
    if curves.iter().all(|curve| curve.top1_by_epoch.is_empty()) {
        return Ok("<p class=\"muted\">No per-epoch metrics yet.</p>".into());
    }
    let svg = plot::curves_chart(title, curves)
        .map_err(|error| Problem::from(Error::Internal(error.to_string())))?;
    Ok(format!(
        "<figure class=\"single\" data-chart=\"curves\">{svg}<figcaption>test top-1 per epoch, \
         one line per seed</figcaption></figure>"
    ))
}

fn downstream_table(records: &[DownstreamRecord]) -> String {
    if records.is_empty() {
        return "<p class=\"muted\">No downstream evaluations of this design in this sweep.</p>"
            .into();
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|record| {
            vec![
                escape(&record.name),
                escape(&record.kind),
                escape(&record.dataset),
                escape(record.state.as_str()),
                record.seed.to_string(),
                percent_or_dash(record.top1),
                percent_or_dash(record.top5),
                record
                    .test_loss
                    .map_or("-".to_string(), |loss| format!("{loss:.4}")),
                record
                    .epochs
                    .map_or("-".to_string(), |epochs| epochs.to_string()),
            ]
        })
        .collect();
    html::table(
        "downstream",
        &[
            "task",
            "kind",
            "dataset",
            "state",
            "seed",
            "top-1 %",
            "top-5 %",
            "test loss",
            "epochs",
        ],
        4,
        &rows,
    )
}

/// The canonical JSON indented for reading (the stored text itself if it does not parse).
fn pretty_json(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|value| serde_json::to_string_pretty(&value).ok())
        .unwrap_or_else(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_table_shows_every_stage_of_a_classic_net() {
        let network = deepmad_design::classic::by_name("resnet18", 10, 32).unwrap();
        let alpha = default_alpha(scale_count(&network));
        let analysis = analyze_paper(&network, &alpha, DEFAULT_BETA).unwrap();
        let html = stage_table(&network, &analysis);
        assert_eq!(html.matches("<tr>").count(), 1 + network.stages.len());
        assert!(
            html.contains("stem 7x7 conv stride 2 -&gt; 64 + max pool"),
            "{html}"
        );
        let html = analysis_html(&analysis);
        assert_eq!(html.matches("<tr>").count(), 1 + analysis.scales.len());
    }

    #[test]
    fn pretty_json_keeps_unparsable_text() {
        assert_eq!(pretty_json("{\"a\":1}"), "{\n  \"a\": 1\n}");
        assert_eq!(pretty_json("not json"), "not json");
    }
}
