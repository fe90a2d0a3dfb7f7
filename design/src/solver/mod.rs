//! The MP solver of Sec. 4.3 and, for benchmarks and tests, the paper code's evolutionary
//! baseline.
//!
//! [`solve`] takes a [`Problem`] and returns the best [`Solution`] it finds: a validated
//! [`Network`], its analysis under the problem's objective, and a [`Certificate`] saying what
//! was proven about it.

mod problem;

pub use problem::{scale_count, Family, Problem, SearchSpace};

use serde::Serialize;

use crate::arch::Network;
use crate::score::Analysis;

/// What the solver can vouch for about its answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Certificate {
    /// `"local-optimum"`: no move of the named neighbourhood improves the objective.
    pub kind: &'static str,
    /// The neighbourhood that was checked exhaustively around the answer.
    pub neighbourhood: String,
    /// How many neighbours were checked.
    pub neighbours_checked: u64,
    /// A proven upper bound on the objective, when the method gives one.
    pub upper_bound: Option<f64>,
}

/// The solver's answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Solution {
    pub network: Network,
    pub analysis: Analysis,
    pub certificate: Certificate,
    /// Candidate designs evaluated.
    pub evaluations: u64,
}
