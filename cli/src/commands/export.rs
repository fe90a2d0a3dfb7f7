//! `deepmad export DESIGN --format pytorch|tinynas|json [--out FILE]`: a design in a form other
//! tools take. DESIGN is what `deepmad analyze` takes: a built-in network, a deepmad
//! architecture JSON file, or a TinyNAS structure (which must then hold exactly one network).
//!
//! - `pytorch`: a self-contained Python file defining the network as an `nn.Module`, layer for
//!   layer the worker's model, with its checkpoint's parameter names (`templates/pytorch_export.py`);
//! - `tinynas`: the paper code's structure literal;
//! - `json`: deepmad's canonical architecture JSON (its content hash is the design's identity).

use std::io::Write;

use deepmad_design::analyze::{analyze_source, Options};
use deepmad_design::score::ObjectiveKind;
use deepmad_design::tinynas::TinyNet;
use deepmad_design::{count, Network};

use super::analyze::load;
use super::design::write_atomically;
use crate::args::{ExportArgs, ExportFormat};
use crate::Failure;

const PYTORCH_TEMPLATE: &str = include_str!("../../templates/pytorch_export.py");

pub fn run(args: &ExportArgs, out: &mut impl Write) -> Result<(), Failure> {
    let network = load_one(args)?;
    let text = match args.format {
        ExportFormat::Pytorch => pytorch(&args.design, &network),
        ExportFormat::Tinynas => {
            format!("{}\n", TinyNet::from_network(&network)?.to_python_literal())
        }
        ExportFormat::Json => format!("{}\n", network.canonical_json()),
    };
    match &args.out {
        Some(path) => write_atomically(path, &text),
        None => Ok(write!(out, "{text}")?),
    }
}

/// The one network DESIGN names, with `--resolution` / `--num-classes` applied.
fn load_one(args: &ExportArgs) -> Result<Network, Failure> {
    let (source, path) = load(&args.design)?;
    let options = Options {
        resolution: args.resolution,
        num_classes: args.num_classes,
        objective: ObjectiveKind::Paper,
        alpha: None,
        beta: 0.0,
    };
    let mut networks = analyze_source(&source, &options).map_err(|error| match path {
        Some(path) => Failure::usage(format!("{}: {error}", path.display())),
        None => Failure::from(error),
    })?;
    if networks.len() != 1 {
        return Err(Failure::usage(format!(
            "DESIGN {}: holds {} networks; export one at a time",
            args.design,
            networks.len()
        )));
    }
    Ok(networks.remove(0).0)
}

/// The PyTorch module file for `network`.
fn pytorch(name: &str, network: &Network) -> String {
    let hash = network.content_hash();
    let totals = count::totals(network);
    let title = format!(
        "{name}: a deepmad design as a PyTorch module (design {hash}, {} parameters, {} MACs at {}x{}).",
        totals.params, totals.flops, network.resolution, network.resolution
    );
    PYTORCH_TEMPLATE
        .replace("__TITLE__", &title)
        .replace("__VERSION__", env!("CARGO_PKG_VERSION"))
        .replace("__DESIGN__", &network.canonical_json())
        .replace("__HASH__", &hash)
        .replace("__PARAMS__", &totals.params.to_string())
}
