//! One module per subcommand, plus the option parsing they share.

pub mod analyze;
pub mod bench;
pub mod coordinator;
pub mod design;
pub mod export;
pub mod plot;
pub mod remote;
pub mod results;
pub mod run;
pub mod sweep;
pub mod train;
pub mod worker;

use deepmad_design::score::ObjectiveKind;
use deepmad_design::units::parse_count;

use crate::args::{ObjectiveArg, ScoringArgs};
use crate::Failure;

/// Validated scoring options.
pub struct Scoring {
    pub objective: ObjectiveKind,
    pub alpha: Option<Vec<f64>>,
    pub beta: f64,
}

impl Scoring {
    /// Validates `--objective`, `--alpha` and `--beta`, naming the flag on failure.
    pub fn from_args(args: &ScoringArgs) -> Result<Scoring, Failure> {
        let objective = match args.objective {
            ObjectiveArg::Paper => ObjectiveKind::Paper,
            ObjectiveArg::Tinynas => ObjectiveKind::Tinynas,
        };
        let alpha = match &args.alpha {
            None => None,
            Some(values) => Some(
                values
                    .iter()
                    .map(|value| parse_weight("--alpha", value))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let beta = parse_weight("--beta", &args.beta)?;
        Ok(Scoring {
            objective,
            alpha,
            beta,
        })
    }
}

/// Parses a finite, non-negative number.
fn parse_weight(flag: &str, text: &str) -> Result<f64, Failure> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err(Failure::usage(format!(
            "{flag}: expected a finite non-negative number, got {text:?}"
        ))),
    }
}

/// Parses an optional budget with human units, naming the flag on failure.
pub fn parse_budget(flag: &'static str, text: Option<&String>) -> Result<Option<u64>, Failure> {
    text.map(|text| parse_count(flag, text))
        .transpose()
        .map_err(Failure::from)
}
