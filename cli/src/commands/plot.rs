//! `deepmad plot --sweep ID --kind rho|pareto|entropy|curves --out FILE.svg`: a sweep's charts,
//! drawn with plotters' SVG backend.
//! - `rho`: top-1 against rho, each design a point, the mean over each rho's trials with a
//!   +-1 standard deviation bar (the paper's Fig. 2);
//! - `pareto`: top-1 against parameters, the Pareto front drawn as a line;
//! - `entropy`: top-1 against the design's entropy, Kendall's tau in the title (Fig. 3);
//! - `curves`: every trial's test top-1 per epoch.
//!
//! Only SVG is written: PNG needs a font rasterizer, which this build leaves out to stay free of
//! system font libraries.

use std::ops::Range;
use std::path::Path;

use deepmad_coordinator::analytics::SweepAnalytics;
use deepmad_proto::v1;
use plotters::prelude::*;

use super::design::write_atomically;
use super::remote::Remote;
use super::results::{export_rows, sweep_analytics, trial_histories};
use crate::args::{PlotArgs, PlotKind};
use crate::Failure;

const SIZE: (u32, u32) = (900, 560);

pub async fn run(args: &PlotArgs) -> Result<(), Failure> {
    let extension = args.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !extension.eq_ignore_ascii_case("svg") {
        return Err(Failure::usage(format!(
            "--out {}: only .svg files are written (PNG needs a font rasterizer this build leaves out)",
            args.out.display()
        )));
    }
    let remote = Remote::connect(&args.remote).await?;
    let analytics = sweep_analytics(&remote, &args.sweep).await?;
    if analytics.trials == 0 {
        return Err(Failure::usage(format!(
            "sweep {} has no results yet: nothing to plot",
            args.sweep
        )));
    }
    let title_sweep = &args.sweep[..args.sweep.len().min(8)];
    let mut svg = String::new();
    let drawn = match args.kind {
        PlotKind::Rho => rho_chart(&mut svg, title_sweep, &analytics),
        PlotKind::Pareto => pareto_chart(&mut svg, title_sweep, &analytics),
        PlotKind::Entropy => entropy_chart(&mut svg, title_sweep, &analytics),
        PlotKind::Curves => {
            let rows = export_rows(&remote, &args.sweep).await?;
            let histories = trial_histories(&remote, &rows).await?;
            curves_chart(&mut svg, title_sweep, &histories)
        }
    };
    drawn.map_err(|error| Failure {
        code: 1,
        message: format!("drawing the chart: {error}"),
    })?;
    write_atomically(Path::new(&args.out), &svg)
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

/// A chart with this module's look: caption, margins and label areas.
type Chart<'a, 'b, X, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>;

fn chart_on<'a, 'b, X, Y>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: String,
    x: X,
    y: Y,
) -> Result<Chart<'a, 'b, X::CoordDescType, Y::CoordDescType>, Box<dyn std::error::Error>>
where
    X: plotters::coord::ranged1d::AsRangedCoord,
    Y: plotters::coord::ranged1d::AsRangedCoord,
{
    Ok(ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x, y)?)
}

/// Draws the legend box in the lower right and writes the chart out.
fn finish<'a, 'b: 'a, X, Y>(
    root: &DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    chart: &mut Chart<'a, 'b, X, Y>,
) -> Drawn
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// `values` widened by 5% on each side (and by 1 around a single value).
fn padded(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    if hi - lo < 1e-12 {
        return lo - 1.0..hi + 1.0;
    }
    let margin = (hi - lo) * 0.05;
    lo - margin..hi + margin
}

fn percent_range(values: impl Iterator<Item = f64>) -> Range<f64> {
    let range = padded(values.map(|v| v * 100.0));
    range.start.max(0.0)..range.end.min(100.0)
}

fn rho_chart(svg: &mut String, sweep: &str, analytics: &SweepAnalytics) -> Drawn {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let points: Vec<(f64, f64)> = analytics
        .designs
        .iter()
        .filter_map(|d| d.rho.map(|rho| (rho, d.top1_mean * 100.0)))
        .collect();
    let y = percent_range(
        analytics.designs.iter().map(|d| d.top1_mean).chain(
            analytics
                .by_rho
                .iter()
                .flat_map(|g| [g.top1_mean - g.top1_std, g.top1_mean + g.top1_std]),
        ),
    );
    let mut chart = chart_on(
        &root,
        format!("sweep {sweep}: top-1 against rho"),
        padded(points.iter().map(|p| p.0)),
        y,
    )?;
    chart
        .configure_mesh()
        .x_desc("effectiveness bound rho")
        .y_desc("top-1 %")
        .draw()?;
    chart
        .draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, 4, BLUE.mix(0.6).filled())),
        )?
        .label("design (mean over seeds)")
        .legend(|(x, y)| Circle::new((x, y), 4, BLUE.mix(0.6).filled()));
    let means: Vec<(f64, f64)> = analytics
        .by_rho
        .iter()
        .map(|g| (g.rho, g.top1_mean * 100.0))
        .collect();
    chart
        .draw_series(LineSeries::new(means, RED.stroke_width(2)))?
        .label("mean over trials, +-1 std")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart.draw_series(analytics.by_rho.iter().map(|g| {
        let (lo, hi) = (g.top1_mean - g.top1_std, g.top1_mean + g.top1_std);
        PathElement::new(vec![(g.rho, lo * 100.0), (g.rho, hi * 100.0)], RED)
    }))?;
    finish(&root, &mut chart)
}

fn pareto_chart(svg: &mut String, sweep: &str, analytics: &SweepAnalytics) -> Drawn {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let x = padded(analytics.designs.iter().map(|d| d.params as f64));
    let x = x.start.max(0.0)..x.end;
    let y = percent_range(analytics.designs.iter().map(|d| d.top1_mean));
    let mut chart = chart_on(
        &root,
        format!("sweep {sweep}: top-1 against parameters"),
        x,
        y,
    )?;
    chart
        .configure_mesh()
        .x_desc("parameters")
        .x_label_formatter(&|value| deepmad_design::units::format_count(value.round() as u64))
        .y_desc("top-1 %")
        .draw()?;
    chart
        .draw_series(analytics.designs.iter().map(|d| {
            Circle::new(
                (d.params as f64, d.top1_mean * 100.0),
                4,
                BLUE.mix(0.6).filled(),
            )
        }))?
        .label("design (mean over seeds)")
        .legend(|(x, y)| Circle::new((x, y), 4, BLUE.mix(0.6).filled()));
    let mut front: Vec<(f64, f64)> = analytics
        .designs
        .iter()
        .filter(|d| d.pareto_params)
        .map(|d| (d.params as f64, d.top1_mean * 100.0))
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(front, RED.stroke_width(2)))?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    finish(&root, &mut chart)
}

fn entropy_chart(svg: &mut String, sweep: &str, analytics: &SweepAnalytics) -> Drawn {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let tau = analytics
        .kendall_tau
        .map_or("n/a".to_string(), |tau| format!("{tau:+.3}"));
    let mut chart = chart_on(
        &root,
        format!("sweep {sweep}: top-1 against entropy (Kendall tau {tau})"),
        padded(analytics.designs.iter().map(|d| d.entropy)),
        percent_range(analytics.designs.iter().map(|d| d.top1_mean)),
    )?;
    chart
        .configure_mesh()
        .x_desc("network entropy (DeepMAD score)")
        .y_desc("top-1 %")
        .draw()?;
    chart
        .draw_series(
            analytics
                .designs
                .iter()
                .map(|d| Circle::new((d.entropy, d.top1_mean * 100.0), 4, BLUE.mix(0.6).filled())),
        )?
        .label("design (mean over seeds)")
        .legend(|(x, y)| Circle::new((x, y), 4, BLUE.mix(0.6).filled()));
    finish(&root, &mut chart)
}

fn curves_chart(svg: &mut String, sweep: &str, histories: &[v1::TrialHistoryResponse]) -> Drawn {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let epochs = histories
        .iter()
        .flat_map(|h| h.epochs.iter().map(|e| f64::from(e.epoch)))
        .fold(1.0, f64::max);
    let y = percent_range(
        histories
            .iter()
            .flat_map(|h| h.epochs.iter().map(|e| e.top1)),
    );
    let mut chart = chart_on(
        &root,
        format!("sweep {sweep}: test top-1 per epoch"),
        0.0..epochs + 0.5,
        y,
    )?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("top-1 %")
        .draw()?;
    // Labels for the first ten trials; more would hide the chart.
    for (index, history) in histories.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let points: Vec<(f64, f64)> = history
            .epochs
            .iter()
            .map(|e| (f64::from(e.epoch), e.top1 * 100.0))
            .collect();
        let series = chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
        if index < 10 {
            let label = format!(
                "trial {} (design {}, seed {})",
                &history.trial_id[..history.trial_id.len().min(8)],
                &history.design_id[..history.design_id.len().min(8)],
                history.seed
            );
            series
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    finish(&root, &mut chart)
}

#[cfg(test)]
mod tests {
    use deepmad_coordinator::analytics::{analyze, Observation};

    use super::*;

    /// A chart drawn from a sweep's analytics into an SVG string.
    type AnalyticsChart = fn(&mut String, &str, &SweepAnalytics) -> Drawn;

    fn analytics() -> SweepAnalytics {
        let mut observations = Vec::new();
        for (index, rho) in [0.1, 0.5, 2.0].into_iter().enumerate() {
            for design in 0..3u64 {
                for seed in 0..2u64 {
                    observations.push(Observation {
                        design_id: format!("d{index}{design}"),
                        rho: Some(rho),
                        params: 20_000 + 5_000 * design + 1_000 * index as u64,
                        flops: 4_000_000,
                        entropy: 100.0 + 10.0 * design as f64 + index as f64,
                        top1: 0.9 + 0.01 * design as f64 - 0.005 * index as f64
                            + 0.002 * seed as f64,
                    });
                }
            }
        }
        analyze(&observations)
    }

    /// Each chart is an SVG with a caption, labelled axes and its marks; with
    /// `DEEPMAD_PLOT_DIR` set the charts are also written there to look at.
    #[test]
    fn charts_have_axes_labels_and_marks() {
        let analytics = analytics();
        let charts: [(&str, AnalyticsChart, &str); 3] = [
            ("rho", rho_chart, "<circle"),
            ("pareto", pareto_chart, "<polyline"),
            ("entropy", entropy_chart, "Kendall tau +"),
        ];
        for (name, draw, mark) in charts {
            let mut svg = String::new();
            draw(&mut svg, "abcdef12", &analytics).unwrap();
            assert!(svg.starts_with("<svg"), "{name}");
            assert!(svg.contains("sweep abcdef12"), "{name}: caption");
            assert!(svg.contains("top-1 %"), "{name}: y label");
            assert!(svg.contains(mark), "{name}: {mark}");
            if let Ok(dir) = std::env::var("DEEPMAD_PLOT_DIR") {
                std::fs::write(Path::new(&dir).join(format!("{name}.svg")), &svg).unwrap();
            }
        }
    }
}
