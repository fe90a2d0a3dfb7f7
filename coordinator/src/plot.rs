//! A sweep's charts as SVG text, drawn with plotters: pure functions from a sweep's
//! [`SweepAnalytics`] or its trials' per-epoch [`Curve`]s to an SVG string. `deepmad plot`
//! writes them to files (or rasterizes them to PNG); the dashboard (`web/`) inlines them.
//!
//! - [`rho_chart`]: top-1 against rho, each design a point, the mean over each rho's trials
//!   with a +-1 standard deviation bar (the paper's Fig. 2);
//! - [`pareto_chart`]: top-1 against parameters, the Pareto front drawn as a line;
//! - [`entropy_chart`]: top-1 against the design's entropy, Kendall's tau in the title (Fig. 3);
//! - [`curves_chart`]: test top-1 per epoch of each trial.
//!
//! Every chart is [`CHART_SIZE`] pixels with a `viewBox`, so a page can scale it. Text is in
//! the generic `sans-serif` family.

use std::ops::Range;

use plotters::prelude::*;

use crate::analytics::SweepAnalytics;
use crate::store::TrialHistory;

/// Width and height of every chart, in pixels.
pub const CHART_SIZE: (u32, u32) = (900, 560);

/// The font family of every chart's text, as the SVG names it.
pub const FONT_FAMILY: &str = "sans-serif";

/// Font size of tick labels and legends (axis descriptions are 2 larger): legible when a
/// page shows the chart at two-thirds of its size.
const LABEL_SIZE: u32 = 15;

/// Curves with a legend entry; more would hide the chart.
const LEGEND_CURVES: usize = 10;

/// Plotters could not draw a chart (a bug: the charts draw into a string).
#[derive(Debug, thiserror::Error)]
#[error("drawing the {chart} chart: {reason}")]
pub struct PlotError {
    pub chart: &'static str,
    pub reason: String,
}

/// The charts of a sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChartKind {
    Rho,
    Pareto,
    Entropy,
    Curves,
}

impl ChartKind {
    /// Every chart, in the order pages show them.
    pub const ALL: [ChartKind; 4] = [
        ChartKind::Rho,
        ChartKind::Pareto,
        ChartKind::Entropy,
        ChartKind::Curves,
    ];

    /// Returns the lowercase name used on the command line and in URLs.
    pub fn name(self) -> &'static str {
        match self {
            ChartKind::Rho => "rho",
            ChartKind::Pareto => "pareto",
            ChartKind::Entropy => "entropy",
            ChartKind::Curves => "curves",
        }
    }

    /// Parses [`ChartKind::name`].
    pub fn parse(name: &str) -> Option<ChartKind> {
        ChartKind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// One trial's test top-1 per epoch, and what its legend entry says.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    pub trial_id: String,
    pub design_id: String,
    pub seed: i64,
    /// `(epoch, top-1 in [0, 1])`, by epoch.
    pub top1_by_epoch: Vec<(i32, f64)>,
}

impl Curve {
    /// Returns the curve of a trial's history.
    pub fn from_history(history: &TrialHistory) -> Curve {
        Curve {
            trial_id: history.trial.to_string(),
            design_id: history.design_id.to_string(),
            seed: history.seed,
            top1_by_epoch: history.epochs.iter().map(|e| (e.epoch, e.top1)).collect(),
        }
    }
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Runs `draw` on a white [`CHART_SIZE`] canvas and returns the SVG it drew.
fn draw_svg(
    chart: &'static str,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Drawn,
) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        let drawn = root
            .fill(&WHITE)
            .map_err(Into::into)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(Into::into));
        drawn.map_err(|error| PlotError {
            chart,
            reason: error.to_string(),
        })?;
    }
    Ok(svg)
}

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
        .caption(caption, (FONT_FAMILY, 24))
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?)
}

/// Draws the legend box in the lower right.
fn legend<'a, 'b: 'a, X, Y>(chart: &mut Chart<'a, 'b, X, Y>) -> Drawn
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .label_font((FONT_FAMILY, LABEL_SIZE))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}

/// `values` widened by 5% on each side (and by 1 around a single value).
fn padded(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
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

/// The padded range of accuracies in [0, 1], as percentages within 0..100.
fn percent_range(values: impl Iterator<Item = f64>) -> Range<f64> {
    let range = padded(values.map(|v| v * 100.0));
    let (start, end) = (range.start.max(0.0), range.end.min(100.0));
    if end > start {
        start..end
    } else {
        0.0..100.0
    }
}

fn design_marker(point: (f64, f64)) -> Circle<(f64, f64), i32> {
    Circle::new(point, 4, BLUE.mix(0.6).filled())
}

/// Top-1 against rho (Fig. 2): a point per design, the mean per rho with +-1 std.
pub fn rho_chart(subject: &str, analytics: &SweepAnalytics) -> Result<String, PlotError> {
    draw_svg("rho", |root| {
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
            root,
            format!("{subject}: top-1 against rho"),
            padded(points.iter().map(|p| p.0)),
            y,
        )?;
        chart
            .configure_mesh()
            .x_desc("effectiveness bound rho")
            .y_desc("top-1 %")
            .label_style((FONT_FAMILY, LABEL_SIZE))
            .axis_desc_style((FONT_FAMILY, LABEL_SIZE + 2))
            .draw()?;
        chart
            .draw_series(points.iter().map(|&p| design_marker(p)))?
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
        legend(&mut chart)
    })
}

/// Top-1 against parameters, with the Pareto front of fewest parameters for the most accuracy.
pub fn pareto_chart(subject: &str, analytics: &SweepAnalytics) -> Result<String, PlotError> {
    draw_svg("pareto", |root| {
        let x = padded(analytics.designs.iter().map(|d| d.params as f64));
        let x = x.start.max(0.0)..x.end;
        let y = percent_range(analytics.designs.iter().map(|d| d.top1_mean));
        let mut chart = chart_on(root, format!("{subject}: top-1 against parameters"), x, y)?;
        chart
            .configure_mesh()
            .x_desc("parameters")
            .x_label_formatter(&|value| deepmad_design::units::format_count(value.round() as u64))
            .y_desc("top-1 %")
            .label_style((FONT_FAMILY, LABEL_SIZE))
            .axis_desc_style((FONT_FAMILY, LABEL_SIZE + 2))
            .draw()?;
        chart
            .draw_series(
                analytics
                    .designs
                    .iter()
                    .map(|d| design_marker((d.params as f64, d.top1_mean * 100.0))),
            )?
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
        legend(&mut chart)
    })
}

/// Top-1 against the design's entropy (Fig. 3), Kendall's tau in the caption.
pub fn entropy_chart(subject: &str, analytics: &SweepAnalytics) -> Result<String, PlotError> {
    draw_svg("entropy", |root| {
        let tau = analytics
            .kendall_tau
            .map_or("n/a".to_string(), |tau| format!("{tau:+.3}"));
        let mut chart = chart_on(
            root,
            format!("{subject}: top-1 against entropy (Kendall tau {tau})"),
            padded(analytics.designs.iter().map(|d| d.entropy)),
            percent_range(analytics.designs.iter().map(|d| d.top1_mean)),
        )?;
        chart
            .configure_mesh()
            .x_desc("network entropy (DeepMAD score)")
            .y_desc("top-1 %")
            .label_style((FONT_FAMILY, LABEL_SIZE))
            .axis_desc_style((FONT_FAMILY, LABEL_SIZE + 2))
            .draw()?;
        chart
            .draw_series(
                analytics
                    .designs
                    .iter()
                    .map(|d| design_marker((d.entropy, d.top1_mean * 100.0))),
            )?
            .label("design (mean over seeds)")
            .legend(|(x, y)| Circle::new((x, y), 4, BLUE.mix(0.6).filled()));
        legend(&mut chart)
    })
}

/// Test top-1 per epoch, a line per trial; the first [`LEGEND_CURVES`] are in the legend.
pub fn curves_chart(subject: &str, curves: &[Curve]) -> Result<String, PlotError> {
    draw_svg("curves", |root| {
        let epochs = curves
            .iter()
            .flat_map(|c| c.top1_by_epoch.iter().map(|&(epoch, _)| f64::from(epoch)))
            .fold(1.0, f64::max);
        let y = percent_range(
            curves
                .iter()
                .flat_map(|c| c.top1_by_epoch.iter().map(|&(_, top1)| top1)),
        );
        let mut chart = chart_on(
            root,
            format!("{subject}: test top-1 per epoch"),
            0.0..epochs + 0.5,
            y,
        )?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("top-1 %")
            .label_style((FONT_FAMILY, LABEL_SIZE))
            .axis_desc_style((FONT_FAMILY, LABEL_SIZE + 2))
            .draw()?;
        for (index, curve) in curves.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            let points: Vec<(f64, f64)> = curve
                .top1_by_epoch
                .iter()
                .map(|&(epoch, top1)| (f64::from(epoch), top1 * 100.0))
                .collect();
            let series = chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
            if index < LEGEND_CURVES {
                let label = format!(
                    "trial {} (design {}, seed {})",
                    short(&curve.trial_id),
                    short(&curve.design_id),
                    curve.seed
                );
                series
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
        }
        legend(&mut chart)
    })
}

/// The first eight characters of an id, as people read them.
pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::{analyze, Observation};

    /// A chart drawn from a sweep's analytics.
    type AnalyticsChart = fn(&str, &SweepAnalytics) -> Result<String, PlotError>;

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

    fn assert_chart(name: &str, svg: &str, mark: &str) {
        assert!(svg.starts_with("<svg"), "{name}");
        assert!(svg.contains("viewBox=\"0 0 900 560\""), "{name}: scalable");
        assert!(svg.contains("sweep abcdef12"), "{name}: caption");
        assert!(svg.contains("top-1 %"), "{name}: y label");
        assert!(
            svg.contains(&format!("font-family=\"{FONT_FAMILY}\"")),
            "{name}"
        );
        assert!(svg.contains(mark), "{name}: {mark}");
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
            let svg = draw("sweep abcdef12", &analytics).unwrap();
            assert_chart(name, &svg, mark);
            if let Ok(dir) = std::env::var("DEEPMAD_PLOT_DIR") {
                std::fs::write(std::path::Path::new(&dir).join(format!("{name}.svg")), &svg)
                    .unwrap();
            }
        }
    }

    #[test]
    fn curves_have_a_line_and_a_legend_entry_per_trial() {
        let curves: Vec<Curve> = (0..3)
            .map(|index| Curve {
                trial_id: format!("{index}1234567-trial"),
                design_id: format!("{index}abcdef0-design"),
                seed: index,
                top1_by_epoch: vec![(1, 0.5), (2, 0.7 + 0.01 * index as f64), (3, 0.8)],
            })
            .collect();
        let svg = curves_chart("sweep abcdef12", &curves).unwrap();
        assert_chart("curves", &svg, "<polyline");
        for index in 0..3 {
            let label = format!("trial {index}1234567 (design {index}abcdef0, seed {index})");
            assert!(svg.contains(&label), "{label}");
        }
    }

    #[test]
    fn empty_and_degenerate_data_still_draw() {
        let empty = analyze(&[]);
        assert!(rho_chart("sweep abcdef12", &empty).is_ok());
        assert!(pareto_chart("sweep abcdef12", &empty).is_ok());
        assert!(curves_chart("sweep abcdef12", &[]).is_ok());
        let flat = Curve {
            trial_id: "t".into(),
            design_id: "d".into(),
            seed: 0,
            top1_by_epoch: vec![(1, 1.0), (2, 1.0)],
        };
        assert!(curves_chart("sweep abcdef12", &[flat]).is_ok());
    }

    #[test]
    fn caption_text_is_escaped() {
        let svg = curves_chart("<b>&</b>", &[]).unwrap();
        assert!(!svg.contains("<b>"), "{svg}");
        assert!(svg.contains("&lt;b&gt;&amp;&lt;/b&gt;"));
    }

    #[test]
    fn kinds_parse_their_names() {
        for kind in ChartKind::ALL {
            assert_eq!(ChartKind::parse(kind.name()), Some(kind));
        }
        assert_eq!(ChartKind::parse("pie"), None);
    }
}
