//! Where a dataset lies, written `KIND:PATH` ([`DatasetSpec`]): `cifar10` and `cifar100` (the
//! binary versions), `idx` (MNIST-style IDX files) and `folder` (one sub-folder per class).
//!
//! Only the name lives here, with its parsing: the worker loads the files
//! (`deepmad_worker::data`). It is in this crate because a training [`crate::recipe::Recipe`]
//! may name its dataset, and the coordinator checks recipes without the worker.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::DesignError;

/// The on-disk formats the worker reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    Cifar10,
    Cifar100,
    Idx,
    Folder,
}

impl DatasetKind {
    /// The names `KIND:PATH` accepts.
    pub const NAMES: [&'static str; 4] = ["cifar10", "cifar100", "idx", "folder"];

    /// Returns the lowercase name used in specs.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Idx => "idx",
            DatasetKind::Folder => "folder",
        }
    }
}

/// A dataset named by kind and path, written `KIND:PATH` (`cifar100:/data/cifar-100-binary`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DatasetSpec {
    pub kind: DatasetKind,
    pub path: PathBuf,
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.kind.name(), self.path.display())
    }
}

impl FromStr for DatasetSpec {
    type Err = DesignError;

    fn from_str(text: &str) -> Result<DatasetSpec, DesignError> {
        let invalid = |reason: String| DesignError::InvalidDatasetSpec {
            spec: text.to_string(),
            reason,
        };
        let (kind, path) = text.split_once(':').ok_or_else(|| {
            invalid("expected KIND:PATH, for example idx:data/mnist-subset".into())
        })?;
        let kind = match kind.to_ascii_lowercase().as_str() {
            "cifar10" => DatasetKind::Cifar10,
            "cifar100" => DatasetKind::Cifar100,
            "idx" | "mnist" => DatasetKind::Idx,
            "folder" => DatasetKind::Folder,
            other => {
                let known = DatasetKind::NAMES.join(", ");
                return Err(invalid(format!("unknown kind {other:?} (known: {known})")));
            }
        };
        if path.is_empty() {
            return Err(invalid("the path is empty".into()));
        }
        Ok(DatasetSpec {
            kind,
            path: PathBuf::from(path),
        })
    }
}

impl Serialize for DatasetSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DatasetSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<DatasetSpec, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
