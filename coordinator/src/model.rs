//! The coordinator's domain types: ids, states and the records the store reads and writes.
//!
//! The logical data model (`docs/architecture.md`, "Data model"; the tables: `docs/schema.md`):
//! a **design** (identity: the content hash of its canonical JSON), a **sweep** (the user's
//! request), its **grid points** (one solver problem each), **trials** (design, recipe, dataset,
//! seed; unique on that key so a result is reused across sweeps), **attempts** (one lease of a
//! trial by one worker, fenced by a lease token), **results** (per-epoch metrics and final
//! metrics), **workers** (one row per process incarnation).

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Returns a fresh random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(text).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A sweep.
    SweepId
);
uuid_id!(
    /// A trial: one (design, recipe, dataset, seed) to train.
    TrialId
);
uuid_id!(
    /// One lease of a trial by one worker.
    AttemptId
);
uuid_id!(
    /// One worker process incarnation (fresh at every start).
    WorkerId
);
uuid_id!(
    /// The fencing token of a lease: only its holder may heartbeat or complete.
    LeaseToken
);

/// A design's identity: the SHA-256 (hex) of its canonical JSON.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DesignId(pub String);

impl fmt::Display for DesignId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Defines a string-backed state enum with its database spelling.
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Returns the spelling stored in the database and shown to people.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the database spelling.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// Where a sweep is.
    SweepState {
        Active => "active",
        Cancelled => "cancelled",
        Completed => "completed",
    }
);

text_enum!(
    /// Where a trial is. `Dead` trials exhausted their retries; `Failed` ones failed
    /// deterministically; both can be requeued by `deepmad trials retry`.
    TrialState {
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Dead => "dead",
    }
);

text_enum!(
    /// How an attempt ended.
    AttemptState {
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Expired => "expired",
        Cancelled => "cancelled",
    }
);

text_enum!(
    /// Why an attempt failed. A deterministic failure (invalid design, bad data) counts
    /// against the retry limit; a retryable one (CUDA out of memory, lost device) and a lost
    /// worker (expired lease) do not count, but are retried with backoff.
    FailureClass {
        Deterministic => "deterministic",
        Retryable => "retryable",
        Lost => "lost",
    }
);
