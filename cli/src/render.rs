//! Human-facing text: tables sized to their content, readable in an 80-column terminal.
//! The exact output is pinned by golden files under `cli/tests/golden/`.

use std::io::{self, Write};

use deepmad_design::score::{Analysis, StageReport};
use deepmad_design::solver::{Family, Problem, Solution};
use deepmad_design::units::format_count;
use deepmad_design::Network;
use deepmad_proto::convert::family_from_proto;

/// A plain text table: the first `left` columns left-aligned, the rest (numbers) right-aligned.
struct Table {
    header: Vec<String>,
    left: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new<S: Into<String>>(header: Vec<S>, left: usize) -> Table {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            left,
            rows: Vec::new(),
        }
    }

    fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut text = String::new();
            for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
                if index > 0 {
                    text.push_str("  ");
                }
                if index < self.left {
                    text.push_str(&format!("{cell:<width$}"));
                } else {
                    text.push_str(&format!("{cell:>width$}"));
                }
            }
            text.trim_end().to_string()
        };
        writeln!(
            out,
            "{}",
            line(self.header.iter().map(String::as_str).collect())
        )?;
        for row in &self.rows {
            writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
        }
        Ok(())
    }
}

/// Writes an analysis: identity, per-stage table, per-scale entropy terms, totals.
pub fn analysis(
    out: &mut impl Write,
    title: &str,
    net: &Network,
    analysis: &Analysis,
) -> io::Result<()> {
    writeln!(
        out,
        "{title}: {} objective, {}x{} input, {} classes",
        analysis.objective_kind.name(),
        analysis.resolution,
        analysis.resolution,
        net.num_classes
    )?;
    writeln!(out, "design {}", &net.content_hash()[..16])?;
    writeln!(out, "{}", net.outline())?;
    writeln!(out)?;
    stage_table(out, analysis)?;
    writeln!(out)?;
    scale_table(out, analysis)?;
    writeln!(out)?;
    totals(out, analysis)
}

fn stage_table(out: &mut impl Write, analysis: &Analysis) -> io::Result<()> {
    let mut table = Table::new(StageReport::HEADERS.to_vec(), 2);
    for (index, stage) in analysis.stages.iter().enumerate() {
        table.rows.push(stage.cells(index));
    }
    table.write(out)
}

fn scale_table(out: &mut impl Write, analysis: &Analysis) -> io::Result<()> {
    let mut table = Table::new(
        vec!["scale", "side", "channels", "sum ln w", "alpha", "entropy"],
        1,
    );
    for (index, scale) in analysis.scales.iter().enumerate() {
        table.rows.push(vec![
            (index + 1).to_string(),
            scale.side.to_string(),
            scale.channels.to_string(),
            format!("{:.3}", scale.log_width_sum),
            format!("{}", scale.alpha),
            format!("{:.3}", scale.entropy),
        ]);
    }
    table.write(out)
}

fn totals(out: &mut impl Write, analysis: &Analysis) -> io::Result<()> {
    writeln!(
        out,
        "params {} ({})  FLOPs {} ({})  layers {}",
        format_count(analysis.params),
        analysis.params,
        format_count(analysis.flops),
        analysis.flops,
        analysis.layers
    )?;
    writeln!(
        out,
        "effectiveness rho {:.4}  entropy {:.3}  penalty {:.4} (beta {})  objective {:.3}",
        analysis.effectiveness,
        analysis.entropy,
        analysis.penalty,
        analysis.beta,
        analysis.objective
    )
}

/// Writes a solved design: the problem, the design's analysis, the solve time and certificate.
pub fn solution(
    out: &mut impl Write,
    problem: &Problem,
    solution: &Solution,
    solve_ms: f64,
) -> io::Result<()> {
    let budget = |value: Option<u64>| value.map_or("unbounded".to_string(), format_count);
    writeln!(
        out,
        "problem: {} blocks, {} objective, rho <= {}, params <= {}, FLOPs <= {}",
        problem.family.name(),
        problem.objective.name(),
        problem.rho,
        budget(problem.params),
        budget(problem.flops)
    )?;
    let title = format!("deepmad-{}", problem.family.name());
    analysis(out, &title, &solution.network, &solution.analysis)?;
    writeln!(
        out,
        "solved in {solve_ms:.0} ms ({} candidates); certificate: {} ({} neighbours checked)",
        solution.evaluations, solution.certificate.kind, solution.certificate.neighbours_checked
    )
}

/// Returns `text` with control characters escaped (`\u{1b}`, `\n`): names stored before the
/// coordinator refused them must not reach the terminal as escape sequences or line breaks.
fn printable(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

fn percent(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |v| format!("{:.2}", v * 100.0))
}

/// Returns the name of a wire family, as `--block` and `--filter block=` take it; `-` when
/// unset or unknown.
pub fn family_name(value: i32) -> &'static str {
    family_from_proto(value, "family").map_or("-", Family::name)
}

fn state_name(value: i32) -> &'static str {
    use deepmad_proto::v1::SweepState;
    match SweepState::try_from(value) {
        Ok(SweepState::Active) => "active",
        Ok(SweepState::Cancelled) => "cancelled",
        Ok(SweepState::Completed) => "completed",
        _ => "-",
    }
}

/// Writes a list of sweeps, one line each.
pub fn sweeps(out: &mut impl Write, sweeps: &[deepmad_proto::v1::SweepSummary]) -> io::Result<()> {
    let mut table = Table::new(
        vec![
            "sweep",
            "name",
            "state",
            "designs",
            "queued",
            "running",
            "done",
            "failed",
            "best top-1",
        ],
        3,
    );
    for sweep in sweeps {
        let counts = sweep.counts.unwrap_or_default();
        let name = printable(&sweep.name.chars().take(24).collect::<String>());
        table.rows.push(vec![
            short(&sweep.sweep_id).to_string(),
            name,
            state_name(sweep.state).to_string(),
            sweep.distinct_designs.to_string(),
            counts.queued.to_string(),
            counts.running.to_string(),
            counts.succeeded.to_string(),
            (counts.failed + counts.dead).to_string(),
            percent(sweep.best_top1),
        ]);
    }
    table.write(out)
}

/// Writes one sweep's summary.
pub fn sweep(out: &mut impl Write, sweep: &deepmad_proto::v1::SweepSummary) -> io::Result<()> {
    let counts = sweep.counts.unwrap_or_default();
    writeln!(
        out,
        "sweep {} ({}), {}",
        sweep.sweep_id,
        printable(&sweep.name),
        state_name(sweep.state)
    )?;
    writeln!(
        out,
        "dataset {}, created by {}",
        printable(&sweep.dataset),
        printable(&sweep.created_by)
    )?;
    writeln!(
        out,
        "grid points {} ({} infeasible), designs {}",
        sweep.grid_points, sweep.infeasible_points, sweep.distinct_designs
    )?;
    writeln!(
        out,
        "trials: queued {}, running {}, succeeded {}, failed {}, dead {}",
        counts.queued, counts.running, counts.succeeded, counts.failed, counts.dead
    )?;
    writeln!(
        out,
        "best top-1 {} ({})",
        percent(sweep.best_top1),
        sweep.best_design_id.as_deref().map_or("-", short)
    )
}

/// Writes what creating a sweep did.
pub fn sweep_created(
    out: &mut impl Write,
    created: &deepmad_proto::v1::CreateSweepResponse,
) -> io::Result<()> {
    writeln!(out, "sweep {}", created.sweep_id)?;
    writeln!(
        out,
        "grid points {}, infeasible {}, distinct designs {}",
        created.grid_points, created.infeasible_points, created.distinct_designs
    )?;
    writeln!(
        out,
        "trials: new {}, reused results {}, shared with other sweeps {}",
        created.new_trials, created.reused_results, created.shared_trials
    )?;
    if created.downstream_linked > 0 {
        writeln!(
            out,
            "downstream trials queued for reused results: {}",
            created.downstream_linked
        )?;
    }
    for point in &created.infeasible {
        writeln!(
            out,
            "infeasible point {} (rho {}): {}",
            point.index, point.rho, point.reason
        )?;
    }
    Ok(())
}

/// Returns the downstream tasks the rows name, in the order they first appear.
pub fn downstream_names(rows: &[deepmad_proto::v1::LeaderboardRow]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for score in rows.iter().flat_map(|row| &row.downstream) {
        if !names.contains(&score.name) {
            names.push(score.name.clone());
        }
    }
    names
}

/// Writes a leaderboard: best mean top-1 first, then one column per downstream task (its
/// mean top-1 over seeds).
pub fn leaderboard(
    out: &mut impl Write,
    rows: &[deepmad_proto::v1::LeaderboardRow],
) -> io::Result<()> {
    let tasks = downstream_names(rows);
    let mut headers: Vec<String> = [
        "rank", "design", "rho", "params", "FLOPs", "layers", "seeds", "top-1 %", "+-", "top-5 %",
    ]
    .iter()
    .map(|header| header.to_string())
    .collect();
    headers.extend(tasks.iter().map(|name| format!("{name} %")));
    let mut table = Table::new(headers, 2);
    for (rank, row) in rows.iter().enumerate() {
        let downstream = tasks.iter().map(|name| {
            row.downstream
                .iter()
                .find(|score| &score.name == name)
                .map_or("-".to_string(), |score| {
                    format!("{:.2}", score.top1_mean * 100.0)
                })
        });
        table.rows.push(vec![
            (rank + 1).to_string(),
            short(&row.design_id).to_string(),
            row.rho.map_or("-".to_string(), |r| format!("{r}")),
            format_count(row.params),
            format_count(row.flops),
            row.layers.to_string(),
            row.seeds.to_string(),
            format!("{:.2}", row.top1_mean * 100.0),
            format!("{:.2}", row.top1_std * 100.0),
            format!("{:.2}", row.top5_mean * 100.0),
        ]);
        table
            .rows
            .last_mut()
            .expect("a row was just pushed")
            .extend(downstream);
    }
    table.write(out)
}

/// Writes a trial's history: attempts, epochs and result.
pub fn trial(
    out: &mut impl Write,
    history: &deepmad_proto::v1::TrialHistoryResponse,
) -> io::Result<()> {
    writeln!(
        out,
        "trial {} design {} seed {} on {}",
        history.trial_id,
        short(&history.design_id),
        history.seed,
        history.dataset
    )?;
    let mut attempts = Table::new(vec!["attempt", "worker", "state", "failure"], 2);
    for attempt in &history.attempts {
        attempts.rows.push(vec![
            short(&attempt.attempt_id).to_string(),
            short(&attempt.worker_id).to_string(),
            deepmad_proto::v1::AttemptState::try_from(attempt.state).map_or_else(
                |_| attempt.state.to_string(),
                |state| {
                    state
                        .as_str_name()
                        .trim_start_matches("ATTEMPT_STATE_")
                        .to_ascii_lowercase()
                },
            ),
            attempt.failure_message.clone().unwrap_or_default(),
        ]);
    }
    attempts.write(out)?;
    let mut epochs = Table::new(
        vec![
            "epoch",
            "train loss",
            "test loss",
            "top-1 %",
            "top-5 %",
            "img/s",
        ],
        1,
    );
    for epoch in &history.epochs {
        epochs.rows.push(vec![
            epoch.epoch.to_string(),
            format!("{:.4}", epoch.train_loss),
            format!("{:.4}", epoch.test_loss),
            format!("{:.2}", epoch.top1 * 100.0),
            format!("{:.2}", epoch.top5 * 100.0),
            format!("{:.0}", epoch.images_per_second),
        ]);
    }
    epochs.write(out)?;
    if let Some(result) = &history.result {
        writeln!(
            out,
            "result: top-1 {:.2}%, top-5 {:.2}%",
            result.top1 * 100.0,
            result.top5 * 100.0
        )?;
    }
    for late in &history.late_results {
        writeln!(
            out,
            "late report from attempt {} (kept, not counted)",
            short(&late.attempt_id)
        )?;
    }
    Ok(())
}

/// Writes a sweep's analytics: accuracy against rho with Kendall's tau per rho, then the
/// designs with their Pareto marks.
pub fn analytics(
    out: &mut impl Write,
    sweep: &str,
    analytics: &deepmad_coordinator::analytics::SweepAnalytics,
) -> io::Result<()> {
    let tau = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:+.3}"));
    writeln!(
        out,
        "sweep {sweep}: {} trials, {} designs; Kendall tau (entropy vs top-1) over all designs: {}",
        analytics.trials,
        analytics.designs.len(),
        tau(analytics.kendall_tau)
    )?;
    if !analytics.by_rho.is_empty() {
        writeln!(out)?;
        let mut table = Table::new(
            vec!["rho", "designs", "trials", "top-1 %", "+-", "best %", "tau"],
            0,
        );
        for group in &analytics.by_rho {
            table.rows.push(vec![
                format!("{}", group.rho),
                group.designs.to_string(),
                group.trials.to_string(),
                percent(Some(group.top1_mean)),
                percent(Some(group.top1_std)),
                percent(Some(group.top1_best)),
                tau(group.kendall_tau),
            ]);
        }
        table.write(out)?;
    }
    writeln!(out)?;
    let mut table = Table::new(
        vec![
            "design", "front", "rho", "params", "FLOPs", "entropy", "seeds", "top-1 %", "+-",
        ],
        2,
    );
    for design in &analytics.designs {
        let front = match (design.pareto_params, design.pareto_flops) {
            (true, true) => "params+flops",
            (true, false) => "params",
            (false, true) => "flops",
            (false, false) => "",
        };
        table.rows.push(vec![
            short(&design.design_id).to_string(),
            front.to_string(),
            design.rho.map_or("-".to_string(), |rho| format!("{rho}")),
            format_count(design.params),
            format_count(design.flops),
            format!("{:.1}", design.entropy),
            design.seeds.to_string(),
            percent(Some(design.top1_mean)),
            percent(Some(design.top1_std)),
        ]);
    }
    table.write(out)?;
    writeln!(
        out,
        "front: on the Pareto front of accuracy against parameters and/or FLOPs"
    )?;
    if !analytics.downstream.is_empty() {
        writeln!(out)?;
        let mut table = Table::new(
            vec![
                "downstream task",
                "dataset",
                "designs",
                "tau",
                "best upstream",
                "best downstream",
            ],
            0,
        );
        for agreement in &analytics.downstream {
            let best = |design: &Option<String>| {
                design
                    .as_deref()
                    .map_or("-".to_string(), |id| short(id).to_string())
            };
            table.rows.push(vec![
                format!("{} ({})", agreement.name, agreement.kind),
                agreement.dataset.clone(),
                agreement.designs.to_string(),
                tau(agreement.kendall_tau),
                best(&agreement.best_upstream),
                best(&agreement.best_downstream),
            ]);
        }
        table.write(out)?;
        writeln!(
            out,
            "tau: Kendall's tau-b of upstream against downstream mean top-1 over the designs with both"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 24 (item 9): a name stored before control characters were refused is printed
    /// escaped, by `sweep list` and `sweep show`.
    #[test]
    fn sweep_names_print_with_control_characters_escaped() {
        let summary = deepmad_proto::v1::SweepSummary {
            sweep_id: "0123456789abcdef".into(),
            name: "evil\u{1b}[2Jname\nx".into(),
            ..Default::default()
        };
        let mut out = Vec::new();
        sweeps(&mut out, std::slice::from_ref(&summary)).unwrap();
        sweep(&mut out, &summary).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert_eq!(text.matches("evil\\u{1b}[2Jname\\nx").count(), 2, "{text}");
    }
}
