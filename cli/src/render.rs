//! Human-facing text: tables sized to their content, readable in an 80-column terminal.
//! The exact output is pinned by golden files under `cli/tests/golden/`.

use std::io::{self, Write};

use deepmad_design::score::Analysis;
use deepmad_design::solver::{Problem, Solution};
use deepmad_design::units::format_count;
use deepmad_design::Network;

/// A plain text table: the first `left` columns left-aligned, the rest (numbers) right-aligned.
struct Table {
    header: Vec<&'static str>,
    left: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: Vec<&'static str>, left: usize) -> Table {
        Table {
            header,
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
        writeln!(out, "{}", line(self.header.clone()))?;
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
    let pool = if net.stem.max_pool { " + max pool" } else { "" };
    let head = net
        .head
        .map_or(String::new(), |h| format!(", head 1x1 conv -> {h}"));
    writeln!(
        out,
        "stem {k}x{k} conv stride {} -> {}{pool}{head}, classifier {} -> {}",
        net.stem.stride,
        net.stem.out,
        net.final_channels(),
        net.num_classes,
        k = net.stem.kernel
    )?;
    writeln!(out)?;
    stage_table(out, analysis)?;
    writeln!(out)?;
    scale_table(out, analysis)?;
    writeln!(out)?;
    totals(out, analysis)
}

fn stage_table(out: &mut impl Write, analysis: &Analysis) -> io::Result<()> {
    let mut table = Table::new(
        vec![
            "stage", "block", "in", "out", "mid", "k", "s", "depth", "side", "params", "FLOPs",
        ],
        2,
    );
    for (index, stage) in analysis.stages.iter().enumerate() {
        let block = if stage.se {
            format!("{}+se", stage.block)
        } else {
            stage.block.clone()
        };
        table.rows.push(vec![
            (index + 1).to_string(),
            block,
            stage.in_channels.to_string(),
            stage.out.to_string(),
            stage.mid.map_or("-".to_string(), |mid| mid.to_string()),
            stage.kernel.to_string(),
            stage.stride.to_string(),
            stage.depth.to_string(),
            stage.side.to_string(),
            format_count(stage.params),
            format_count(stage.flops),
        ]);
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
