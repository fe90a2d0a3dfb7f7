//! The dashboard's pages: the sweeps list, a sweep's page and the fragments its script
//! refreshes (leaderboard table, charts), and single charts as SVG files. The design page is
//! `design.rs`. Every value from the store is escaped ([`escape`]).

use std::fmt::Write as _;

use axum::extract::{Extension, Path, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use deepmad_design::units::format_count;

use super::api::{DEFAULT_ROWS, SWEEPS_SHOWN};
use super::html::{self, escape, facts, link, page, percent, percent_or_dash, Session};
use super::{parse_sweep, Dashboard, PageProblem, Problem};
use crate::analytics::{RankAgreement, SweepAnalytics};
use crate::error::Error;
use crate::model::SweepId;
use crate::plot::{self, ChartKind, Curve};
use crate::service::Coordinator;
use crate::store::{LeaderboardFilter, LeaderboardRow, SweepSummary};

/// Trials the sweep page's curves chart draws: the best by top-1.
const CURVES_SHOWN: usize = 20;

/// `GET /`: every sweep, newest first, with live progress.
pub(super) async fn sweeps(
    State(dashboard): State<Dashboard>,
    Extension(session): Extension<Session>,
) -> Result<Html<String>, PageProblem> {
    let sweeps = dashboard.coordinator.list_sweeps(SWEEPS_SHOWN).await?;
    let rows: Vec<Vec<String>> = sweeps.iter().map(sweep_row).collect();
    let list = if rows.is_empty() {
        "<p class=\"muted\">No sweeps yet: create one with <code>deepmad sweep create FILE</code> \
         or <code>deepmad run FILE</code>.</p>"
            .to_string()
    } else {
        html::table(
            "sweeps",
            &[
                "sweep",
                "progress",
                "created",
                "dataset",
                "designs",
                "best top-1 %",
            ],
            4,
            &rows,
        )
    };
    let more = if sweeps.len() >= SWEEPS_SHOWN as usize {
        format!("<p class=\"muted\">The newest {SWEEPS_SHOWN} sweeps.</p>")
    } else {
        String::new()
    };
    let body = format!(
        "<div data-sweeps-page>\n<h1>Sweeps</h1>\n\
         <p class=\"error\" data-field=\"error\" hidden></p>\n{list}\n{more}</div>"
    );
    Ok(page("sweeps", session, &body))
}

fn sweep_row(sweep: &SweepSummary) -> Vec<String> {
    let id = sweep.id.to_string();
    let best = match (&sweep.best_top1, &sweep.best_design) {
        (Some(top1), Some(design)) => {
            link(&format!("/sweeps/{id}/designs/{design}"), &percent(*top1))
        }
        _ => "-".to_string(),
    };
    vec![
        format!(
            "{} <span class=\"muted id\">{}</span>",
            link(&format!("/sweeps/{id}"), &sweep.name),
            escape(plot::short(&id))
        ),
        html::progress(&id, sweep.state.as_str(), &sweep.counts),
        escape(&html::time(sweep.created_at)),
        escape(&sweep.dataset),
        sweep.distinct_designs.to_string(),
        best,
    ]
}

/// What the script compares to tell whether the counts moved (`dashboard.js` `progressKey`).
fn progress_key(sweep: &SweepSummary) -> String {
    let counts = &sweep.counts;
    format!(
        "{}/{}/{}/{}/{}/{}",
        sweep.state, counts.queued, counts.running, counts.succeeded, counts.failed, counts.dead
    )
}

/// `GET /sweeps/{id}`: a sweep's summary, progress, leaderboard and charts.
pub(super) async fn sweep(
    State(dashboard): State<Dashboard>,
    Extension(session): Extension<Session>,
    Path(sweep): Path<String>,
) -> Result<Html<String>, PageProblem> {
    let id = parse_sweep(&sweep)?;
    let coordinator = &dashboard.coordinator;
    let summary = coordinator.get_sweep(id).await?;
    let rows = sweep_leaderboard(coordinator, id).await?;
    let charts = charts_html(coordinator, id).await?;
    let name = &summary.name;
    let best = match (&summary.best_top1, &summary.best_design) {
        (Some(top1), Some(design)) => format!(
            "{} % ({})",
            percent(*top1),
            link(
                &format!("/sweeps/{id}/designs/{design}"),
                &format!("design {}", plot::short(&design.0))
            )
        ),
        _ => "-".to_string(),
    };
    let summary_facts = facts(&[
        ("id", format!("<code>{id}</code>")),
        ("created", escape(&html::time(summary.created_at))),
        ("created by", escape(&summary.created_by)),
        ("dataset", escape(&summary.dataset)),
        (
            "grid points",
            format!(
                "{} ({} infeasible)",
                summary.grid_points, summary.infeasible_points
            ),
        ),
        ("distinct designs", summary.distinct_designs.to_string()),
        ("best mean top-1", best),
    ]);
    let body = format!(
        "<div data-sweep-page=\"{id}\" data-key=\"{key}\">\n\
         <h1>{name}</h1>\n<p class=\"error\" data-field=\"error\" hidden></p>\n{summary_facts}\n\
         <h2>Progress</h2>\n{progress}\n\
         <h2>Leaderboard</h2>\n<section data-board=\"{id}\">\n<div class=\"tools\">\
         <input type=\"search\" data-filter=\"text\" placeholder=\"filter rows\" aria-label=\"filter rows\"> \
         <select data-filter=\"family\" aria-label=\"block family\"><option value=\"\">every family</option></select> \
         <span class=\"muted\"><span data-field=\"shown\">{count}</span> of \
         <span data-field=\"rows\">{count}</span> rows shown; click a column to sort</span></div>\n\
         <div class=\"scroll\" data-fragment=\"leaderboard\">{table}</div>\n</section>\n\
         <h2>Charts</h2>\n<div data-fragment=\"charts\">{charts}</div>\n</div>",
        key = escape(&progress_key(&summary)),
        name = escape(name),
        progress = html::progress(&id.to_string(), summary.state.as_str(), &summary.counts),
        count = rows.len(),
        table = leaderboard_table(id, &rows),
    );
    Ok(page(name, session, &body))
}

async fn sweep_leaderboard(
    coordinator: &Coordinator,
    sweep: SweepId,
) -> Result<Vec<LeaderboardRow>, Error> {
    let filter = LeaderboardFilter {
        sweep: Some(sweep),
        limit: DEFAULT_ROWS,
        ..LeaderboardFilter::default()
    };
    coordinator.leaderboard(&filter).await
}

/// `GET /fragments/sweeps/{id}/leaderboard`: the leaderboard table alone.
pub(super) async fn leaderboard_fragment(
    State(dashboard): State<Dashboard>,
    Path(sweep): Path<String>,
) -> Result<Html<String>, super::JsonProblem> {
    let id = parse_sweep(&sweep)?;
    dashboard.coordinator.get_sweep(id).await?;
    let rows = sweep_leaderboard(&dashboard.coordinator, id).await?;
    Ok(Html(leaderboard_table(id, &rows)))
}

/// `GET /fragments/sweeps/{id}/charts`: the charts and the downstream agreement alone.
pub(super) async fn charts_fragment(
    State(dashboard): State<Dashboard>,
    Path(sweep): Path<String>,
) -> Result<Html<String>, super::JsonProblem> {
    let id = parse_sweep(&sweep)?;
    dashboard.coordinator.get_sweep(id).await?;
    Ok(Html(charts_html(&dashboard.coordinator, id).await?))
}

/// A header cell the script sorts by: numbers (`num`) or text.
fn sortable(label: &str, numeric: bool) -> String {
    let (kind, class) = if numeric {
        ("num", "")
    } else {
        ("text", " class=\"text\"")
    };
    format!("<th data-sort=\"{kind}\"{class}>{}</th>", escape(label))
}

/// A number cell: shown as `shown`, sorted by `value`.
fn number(value: impl std::fmt::Display, shown: &str) -> String {
    format!("<td data-value=\"{value}\">{}</td>", escape(shown))
}

/// The names of the rows' downstream tasks, in the order the rows first name them.
fn downstream_names(rows: &[LeaderboardRow]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for score in rows.iter().flat_map(|row| &row.downstream) {
        if !names.contains(&score.name) {
            names.push(score.name.clone());
        }
    }
    names
}

/// The leaderboard as a sortable table: a row per (design, dataset, recipe), best first.
fn leaderboard_table(sweep: SweepId, rows: &[LeaderboardRow]) -> String {
    let tasks = downstream_names(rows);
    let mut html = String::from("<table class=\"leaderboard\"><thead><tr>");
    let columns = [
        ("#", true),
        ("design", false),
        ("family", false),
        ("rho", true),
        ("params", true),
        ("FLOPs", true),
        ("layers", true),
        ("entropy", true),
        ("effectiveness", true),
        ("seeds", true),
        ("top-1 %", true),
        ("+- std", true),
        ("top-5 %", true),
    ];
    for (label, numeric) in columns {
        html.push_str(&sortable(label, numeric));
    }
    for task in &tasks {
        html.push_str(&sortable(&format!("{task} top-1 %"), true));
    }
    html.push_str("</tr></thead><tbody>");
    for (rank, row) in rows.iter().enumerate() {
        let design = &row.design_id.0;
        let rho = row.rho.map_or("-".to_string(), |rho| format!("{rho}"));
        write!(
            html,
            "<tr data-family=\"{family}\">{rank}<td class=\"text\"><a href=\"/sweeps/{sweep}/designs/{design_href}\"><code>{short}</code></a></td>\
             <td class=\"text\">{family}</td>{rho}{params}{flops}{layers}{entropy}{effectiveness}{seeds}{top1}{std}{top5}",
            family = escape(&row.family),
            rank = number(rank + 1, &(rank + 1).to_string()),
            design_href = escape(design),
            short = escape(plot::short(design)),
            rho = number(row.rho.unwrap_or(f64::NAN), &rho),
            params = number(row.params, &format_count(u64::try_from(row.params).unwrap_or(0))),
            flops = number(row.flops, &format_count(u64::try_from(row.flops).unwrap_or(0))),
            layers = number(row.layers, &row.layers.to_string()),
            entropy = number(row.entropy, &format!("{:.2}", row.entropy)),
            effectiveness = number(row.effectiveness, &format!("{:.3}", row.effectiveness)),
            seeds = number(row.seeds, &row.seeds.to_string()),
            top1 = number(row.top1_mean, &percent(row.top1_mean)),
            std = number(row.top1_std, &percent(row.top1_std)),
            top5 = number(row.top5_mean, &percent(row.top5_mean)),
        )
        .expect("writing to a String");
        for task in &tasks {
            let score = row.downstream.iter().find(|score| &score.name == task);
            let mean = score.map(|score| score.top1_mean);
            html.push_str(&number(mean.unwrap_or(f64::NAN), &percent_or_dash(mean)));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    if rows.is_empty() {
        html.push_str("<p class=\"muted\">No results yet: rows appear as trials finish.</p>");
    }
    html
}

/// The sweep's charts (or why there are none yet), then the downstream agreement.
async fn charts_html(coordinator: &Coordinator, sweep: SweepId) -> Result<String, Problem> {
    let analytics = coordinator.sweep_analytics(sweep).await?;
    if analytics.trials == 0 {
        return Ok(
            "<p class=\"muted\">No results yet: the charts appear when trials finish.</p>".into(),
        );
    }
    let (curves, trials) = best_curves(coordinator, sweep, CURVES_SHOWN).await?;
    let subject = format!("sweep {}", plot::short(&sweep.to_string()));
    let mut html = String::from("<div class=\"charts\">");
    for kind in ChartKind::ALL {
        let svg = draw(kind, &subject, &analytics, &curves)?;
        let caption = match kind {
            ChartKind::Rho => "top-1 against rho: each design (mean over seeds); the line is \
                               the mean over each rho's trials, +-1 standard deviation"
                .to_string(),
            ChartKind::Pareto => "top-1 against parameters, with the Pareto front".to_string(),
            ChartKind::Entropy => "top-1 against entropy; Kendall's tau in the title".to_string(),
            ChartKind::Curves => format!(
                "test top-1 per epoch of the best {} of {trials} trials",
                curves.len()
            ),
        };
        write!(
            html,
            "<figure data-chart=\"{name}\">{svg}<figcaption>{caption} \
             (<a href=\"/sweeps/{sweep}/charts/{name}.svg\">SVG</a>)</figcaption></figure>",
            name = kind.name(),
            caption = escape(&caption),
        )
        .expect("writing to a String");
    }
    html.push_str("</div>");
    html.push_str(&agreement_table(&analytics.downstream));
    Ok(html)
}

fn draw(
    kind: ChartKind,
    subject: &str,
    analytics: &SweepAnalytics,
    curves: &[Curve],
) -> Result<String, Problem> {
    let drawn = match kind {
        ChartKind::Rho => plot::rho_chart(subject, analytics),
        ChartKind::Pareto => plot::pareto_chart(subject, analytics),
        ChartKind::Entropy => plot::entropy_chart(subject, analytics),
        ChartKind::Curves => plot::curves_chart(subject, curves),
    };
    drawn.map_err(|error| Problem::from(Error::Internal(error.to_string())))
}

/// The per-epoch curves of the sweep's `limit` best trials by top-1, and how many trials
/// have results.
async fn best_curves(
    coordinator: &Coordinator,
    sweep: SweepId,
    limit: usize,
) -> Result<(Vec<Curve>, usize), Error> {
    let mut results = coordinator.export_results(sweep).await?;
    let trials = results.len();
    results.sort_by(|a, b| {
        b.top1
            .total_cmp(&a.top1)
            .then_with(|| a.trial.0.cmp(&b.trial.0))
    });
    let mut curves = Vec::new();
    for result in results.iter().take(limit) {
        let history = coordinator.trial_history(result.trial).await?;
        curves.push(Curve::from_history(&history));
    }
    Ok((curves, trials))
}

/// Whether the upstream ranking carries over to each downstream task (empty without tasks).
fn agreement_table(agreements: &[RankAgreement]) -> String {
    if agreements.is_empty() {
        return String::new();
    }
    let design = |id: &Option<String>| {
        id.as_deref().map_or("-".to_string(), |id| {
            format!("<code>{}</code>", escape(plot::short(id)))
        })
    };
    let rows: Vec<Vec<String>> = agreements
        .iter()
        .map(|agreement| {
            vec![
                escape(&agreement.name),
                escape(&agreement.kind),
                escape(&agreement.dataset),
                design(&agreement.best_upstream),
                design(&agreement.best_downstream),
                if agreement.same_best() { "yes" } else { "no" }.to_string(),
                agreement.designs.to_string(),
                agreement
                    .kendall_tau
                    .map_or("-".to_string(), |tau| format!("{tau:+.3}")),
            ]
        })
        .collect();
    format!(
        "<h2>Downstream tasks</h2>\n<p class=\"muted\">Kendall's tau of the designs' upstream \
         against downstream mean top-1: does the ranking carry over?</p>\n{}",
        html::table(
            "agreement",
            &[
                "task",
                "kind",
                "dataset",
                "best upstream",
                "best downstream",
                "same best",
                "designs",
                "Kendall tau",
            ],
            6,
            &rows,
        )
    )
}

/// `GET /sweeps/{id}/charts/{kind}.svg`: one chart as an SVG file.
pub(super) async fn chart_file(
    State(dashboard): State<Dashboard>,
    Path((sweep, file)): Path<(String, String)>,
) -> Result<Response, PageProblem> {
    let id = parse_sweep(&sweep)?;
    let kind = file
        .strip_suffix(".svg")
        .and_then(ChartKind::parse)
        .ok_or_else(|| {
            let names: Vec<&str> = ChartKind::ALL.iter().map(|kind| kind.name()).collect();
            Problem::not_found(format!(
                "no chart {file:?}: charts are {}.svg",
                names.join(".svg, ")
            ))
        })?;
    let coordinator = &dashboard.coordinator;
    coordinator.get_sweep(id).await?;
    let analytics = coordinator.sweep_analytics(id).await?;
    let curves = match kind {
        ChartKind::Curves => best_curves(coordinator, id, CURVES_SHOWN).await?.0,
        _ => Vec::new(),
    };
    let subject = format!("sweep {}", plot::short(&id.to_string()));
    let svg = draw(kind, &subject, &analytics, &curves)?;
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DesignId;
    use crate::store::DownstreamScore;

    fn row(design: &str, family: &str, top1: f64) -> LeaderboardRow {
        LeaderboardRow {
            design_id: DesignId(design.repeat(64 / design.len())),
            family: family.into(),
            dataset: "idx:<data>".into(),
            recipe_hash: "r".into(),
            params: 21_000,
            flops: 4_000_000,
            layers: 9,
            effectiveness: 0.3,
            entropy: 101.5,
            rho: Some(0.3),
            seeds: 2,
            top1_mean: top1,
            top1_std: 0.01,
            top5_mean: 0.99,
            downstream: Vec::new(),
        }
    }

    #[test]
    fn the_leaderboard_table_escapes_and_links_each_row() {
        let sweep: SweepId = "6f1c0b8e-3c1d-4d7e-9a55-0d1f2e3a4b5c".parse().unwrap();
        let html = leaderboard_table(
            sweep,
            &[row("ab", "basic", 0.91), row("cd", "mb&conv", 0.9)],
        );
        assert_eq!(html.matches("<tr data-family=").count(), 2);
        assert!(
            html.contains("<tr data-family=\"mb&amp;conv\">"),
            "the family is escaped"
        );
        assert!(html.contains(&format!("/sweeps/{sweep}/designs/{}", "ab".repeat(32))));
        assert!(html.contains("data-value=\"0.91\">91.00</td>"));
        assert!(html.contains("21.0K"));
        assert!(!html.contains("No results yet"));
        assert!(leaderboard_table(sweep, &[]).contains("No results yet"));
    }

    #[test]
    fn downstream_tasks_get_a_column_each() {
        let sweep: SweepId = "6f1c0b8e-3c1d-4d7e-9a55-0d1f2e3a4b5c".parse().unwrap();
        let mut first = row("ab", "basic", 0.91);
        first.downstream.push(DownstreamScore {
            name: "probe".into(),
            kind: "linear-probe".into(),
            dataset: "idx:x".into(),
            task_hash: "h".into(),
            seeds: 1,
            top1_mean: 0.5,
            top1_std: 0.0,
            top5_mean: 0.8,
        });
        let html = leaderboard_table(sweep, &[first, row("cd", "basic", 0.9)]);
        assert!(html.contains(">probe top-1 %</th>"));
        assert!(html.contains(">50.00</td>"));
        assert!(html.contains("data-value=\"NaN\">-</td>"), "{html}");
    }
}
