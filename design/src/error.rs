//! The one error type of the design crate.

/// Everything that can go wrong when building, reading, scoring or solving a design.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DesignError {
    /// A structural rule of the IR is broken; `location` is a path such as `stages[2].kernel`.
    #[error("invalid network: {location} {reason}")]
    InvalidNetwork { location: String, reason: String },

    /// A file or string could not be parsed; `location` says where (line/column or block index).
    #[error("malformed {format} at {location}: {reason}")]
    Malformed {
        format: &'static str,
        location: String,
        reason: String,
    },

    /// A training recipe value is out of range or of the wrong type, or the key is unknown;
    /// `key` is the recipe's key (`epochs`, `lr`).
    #[error("invalid recipe: {key} {reason}")]
    InvalidRecipe { key: String, reason: String },

    /// A recipe is not valid TOML or not a table; `location` says where.
    #[error("malformed recipe {location}: {reason}")]
    MalformedRecipe { location: String, reason: String },

    /// A `KIND:PATH` dataset spec could not be parsed.
    #[error("invalid dataset {spec:?}: {reason}")]
    InvalidDatasetSpec { spec: String, reason: String },

    /// A named built-in network does not exist.
    #[error("unknown network {name:?} (known: {known})")]
    UnknownNetwork { name: String, known: String },

    /// A solver or scoring input is out of range; `field` names the input.
    #[error("invalid {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },

    /// The network cannot be expressed in the requested format or scored by that objective.
    #[error("{what} cannot be expressed as {target}: {reason}")]
    Unsupported {
        what: String,
        target: &'static str,
        reason: String,
    },

    /// No design in the search space meets the constraints. `constraint` names the one that
    /// cannot be met and `detail` says what the space can reach instead.
    #[error("infeasible: the {constraint} budget {budget} cannot be met: {detail}")]
    Infeasible {
        constraint: &'static str,
        budget: String,
        detail: String,
    },
}
