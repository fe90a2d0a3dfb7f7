//! `deepmad plot --sweep ID --kind rho|pareto|entropy|curves --out FILE.svg|FILE.png`: a
//! sweep's charts. The coordinator's `plot` module draws them (the dashboard shows the same
//! charts); this command fetches the data, and writes the SVG, or rasterizes it to a PNG of
//! the same size with resvg.
//!
//! A PNG's text needs a font: the system's fonts are loaded (fontconfig's directories, or
//! /usr/share/fonts) and the charts' generic `sans-serif` family is mapped to the first
//! installed family of [`SANS_SERIF_FAMILIES`]. Without any font the command fails rather
//! than write a chart without labels.

use std::path::Path;
use std::sync::Arc;

use deepmad_coordinator::plot::{self, Curve, PlotError};
use deepmad_proto::v1;
use resvg::tiny_skia;
use resvg::usvg::{self, fontdb};

use super::design::{write_atomically, write_bytes_atomically};
use super::remote::Remote;
use super::results::{export_rows, sweep_analytics, trial_histories};
use crate::args::{PlotArgs, PlotKind};
use crate::Failure;

/// Sans-serif families that stand in for the charts' `sans-serif`, best first. A system with
/// none of them gets the first family it has, in name order.
pub const SANS_SERIF_FAMILIES: [&str; 6] = [
    "DejaVu Sans",
    "Liberation Sans",
    "Noto Sans",
    "FreeSans",
    "Arial",
    "Helvetica",
];

/// What `--out`'s extension asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Svg,
    Png,
}

impl Format {
    fn of(path: &Path) -> Result<Format, Failure> {
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if extension.eq_ignore_ascii_case("svg") {
            Ok(Format::Svg)
        } else if extension.eq_ignore_ascii_case("png") {
            Ok(Format::Png)
        } else {
            Err(Failure::usage(format!(
                "--out {}: the file name must end in .svg or .png",
                path.display()
            )))
        }
    }
}

pub async fn run(args: &PlotArgs) -> Result<(), Failure> {
    let format = Format::of(&args.out)?;
    // Fonts first: a machine that cannot write the PNG fails before any network call.
    let fonts = match format {
        Format::Png => Some(Arc::new(chart_fonts(system_fonts())?)),
        Format::Svg => None,
    };
    let remote = Remote::connect(&args.remote).await?;
    let analytics = sweep_analytics(&remote, &args.sweep).await?;
    if analytics.trials == 0 {
        return Err(Failure::usage(format!(
            "sweep {} has no results yet: nothing to plot",
            args.sweep
        )));
    }
    let subject = format!("sweep {}", plot::short(&args.sweep));
    let svg = match args.kind {
        PlotKind::Rho => plot::rho_chart(&subject, &analytics),
        PlotKind::Pareto => plot::pareto_chart(&subject, &analytics),
        PlotKind::Entropy => plot::entropy_chart(&subject, &analytics),
        PlotKind::Curves => {
            let rows = export_rows(&remote, &args.sweep).await?;
            let histories = trial_histories(&remote, &rows).await?;
            let curves: Vec<Curve> = histories.iter().map(curve_of).collect();
            plot::curves_chart(&subject, &curves)
        }
    }
    .map_err(plot_failure)?;
    match fonts {
        None => write_atomically(&args.out, &svg),
        Some(fonts) => write_bytes_atomically(&args.out, &svg_to_png(&svg, fonts)?),
    }
}

fn plot_failure(error: PlotError) -> Failure {
    Failure {
        code: 1,
        message: error.to_string(),
    }
}

/// A trial's curve from its history on the wire.
fn curve_of(history: &v1::TrialHistoryResponse) -> Curve {
    Curve {
        trial_id: history.trial_id.clone(),
        design_id: history.design_id.clone(),
        seed: history.seed,
        top1_by_epoch: history
            .epochs
            .iter()
            .map(|e| (i32::try_from(e.epoch).unwrap_or(i32::MAX), e.top1))
            .collect(),
    }
}

/// Returns the system's fonts (the directories fontconfig names, or /usr/share/fonts).
pub fn system_fonts() -> fontdb::Database {
    let mut fonts = fontdb::Database::new();
    fonts.load_system_fonts();
    fonts
}

/// Maps the charts' `sans-serif` (and the SVG default, serif) onto an installed family.
/// Fails, exit 2, when `fonts` is empty: a PNG without its labels is no chart.
pub fn chart_fonts(mut fonts: fontdb::Database) -> Result<fontdb::Database, Failure> {
    let mut families: Vec<String> = fonts
        .faces()
        .flat_map(|face| face.families.iter().map(|(name, _)| name.clone()))
        .collect();
    families.sort();
    families.dedup();
    let chosen = SANS_SERIF_FAMILIES
        .iter()
        .find(|wanted| families.iter().any(|family| family == *wanted))
        .map(|family| family.to_string())
        .or_else(|| families.first().cloned())
        .ok_or_else(|| {
            Failure::usage(
                "no fonts found for the PNG's text (looked in fontconfig's font directories and \
                 /usr/share/fonts): install a font package such as fonts-dejavu-core \
                 (apt-get install fonts-dejavu-core), or write .svg instead",
            )
        })?;
    fonts.set_sans_serif_family(chosen.clone());
    fonts.set_serif_family(chosen);
    let query = fontdb::Query {
        families: &[fontdb::Family::SansSerif],
        ..fontdb::Query::default()
    };
    fonts.query(&query).ok_or_else(|| Failure {
        code: 1,
        message: "the chosen sans-serif font family does not resolve to a font face".into(),
    })?;
    Ok(fonts)
}

/// Rasterizes a chart's SVG to a PNG of the same pixel size, on white.
pub fn svg_to_png(svg: &str, fonts: Arc<fontdb::Database>) -> Result<Vec<u8>, Failure> {
    let internal = |what: &str, error: &dyn std::fmt::Display| Failure {
        code: 1,
        message: format!("rendering the PNG: {what}: {error}"),
    };
    let options = usvg::Options {
        font_family: plot::FONT_FAMILY.to_string(),
        fontdb: fonts,
        ..usvg::Options::default()
    };
    let tree = usvg::Tree::from_str(svg, &options)
        .map_err(|error| internal("parsing the chart's SVG", &error))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| {
        internal(
            "allocating the image",
            &format!("{}x{}", size.width(), size.height()),
        )
    })?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
        .encode_png()
        .map_err(|error| internal("encoding", &error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_chooses_the_format() {
        assert_eq!(Format::of(Path::new("a/rho.svg")).unwrap(), Format::Svg);
        assert_eq!(Format::of(Path::new("rho.PNG")).unwrap(), Format::Png);
        for bad in ["rho.jpg", "rho", "svg"] {
            let failure = Format::of(Path::new(bad)).unwrap_err();
            assert_eq!(failure.code, 2, "{bad}");
            assert!(failure.message.contains(".svg or .png"), "{bad}");
        }
    }

    #[test]
    fn without_fonts_there_is_no_png() {
        let failure = chart_fonts(fontdb::Database::new()).unwrap_err();
        assert_eq!(failure.code, 2);
        assert!(
            failure.message.contains("fonts-dejavu-core"),
            "{}",
            failure.message
        );
    }
}
