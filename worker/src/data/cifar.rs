//! CIFAR-10 and CIFAR-100, binary versions (Krizhevsky, "Learning Multiple Layers of Features
//! from Tiny Images", 2009; format as described on https://www.cs.toronto.edu/~kriz/cifar.html).
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`, records of one label
//! byte and 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32x32: already CHW).
//! CIFAR-100: `train.bin` and `test.bin`, records of a coarse label byte, a fine label byte and
//! the same 3072 pixel bytes; we train on the 100 fine labels. The path may be the folder with
//! the files or the folder the archive was unpacked in (`cifar-10-batches-bin/`,
//! `cifar-100-binary/`).

use std::path::{Path, PathBuf};

use super::{read_file, RawDataset, Split};
use crate::error::WorkerError;

/// Pixels per image: 3 channels of 32x32.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

/// Which CIFAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Cifar10,
    Cifar100,
}

impl Variant {
    fn label_bytes(self) -> usize {
        match self {
            Variant::Cifar10 => 1,
            Variant::Cifar100 => 2,
        }
    }

    fn classes(self) -> u32 {
        match self {
            Variant::Cifar10 => 10,
            Variant::Cifar100 => 100,
        }
    }

    fn archive_folder(self) -> &'static str {
        match self {
            Variant::Cifar10 => "cifar-10-batches-bin",
            Variant::Cifar100 => "cifar-100-binary",
        }
    }

    fn train_files(self) -> Vec<String> {
        match self {
            Variant::Cifar10 => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            Variant::Cifar100 => vec!["train.bin".into()],
        }
    }

    fn test_file(self) -> &'static str {
        match self {
            Variant::Cifar10 => "test_batch.bin",
            Variant::Cifar100 => "test.bin",
        }
    }
}

/// Loads both splits from `path`.
pub fn load(path: &Path, variant: Variant) -> Result<RawDataset, WorkerError> {
    let folder = resolve_folder(path, variant);
    let mut train = Split::default();
    for name in variant.train_files() {
        append_records(&folder.join(name), variant, &mut train)?;
    }
    let mut test = Split::default();
    append_records(&folder.join(variant.test_file()), variant, &mut test)?;
    Ok(RawDataset {
        channels: 3,
        side: 32,
        num_classes: variant.classes(),
        train,
        test,
    })
}

/// Returns `path/{archive folder}` when the files are there, else `path`.
fn resolve_folder(path: &Path, variant: Variant) -> PathBuf {
    let nested = path.join(variant.archive_folder());
    if nested.join(variant.test_file()).is_file() {
        nested
    } else {
        path.to_path_buf()
    }
}

/// Appends the records of one file to `split`.
fn append_records(path: &Path, variant: Variant, split: &mut Split) -> Result<(), WorkerError> {
    let bytes = read_file(path)?;
    let record = variant.label_bytes() + IMAGE_BYTES;
    if bytes.is_empty() || bytes.len() % record != 0 {
        return Err(WorkerError::MalformedData {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes is not a whole number of {record}-byte records",
                bytes.len()
            ),
        });
    }
    for chunk in bytes.chunks_exact(record) {
        // CIFAR-100's second byte is the fine label; CIFAR-10 has only one.
        let label = u32::from(chunk[variant.label_bytes() - 1]);
        if label >= variant.classes() {
            return Err(WorkerError::MalformedData {
                path: path.to_path_buf(),
                reason: format!(
                    "label {label} is out of range for {} classes",
                    variant.classes()
                ),
            });
        }
        split.labels.push(label);
        split
            .images
            .extend_from_slice(&chunk[variant.label_bytes()..]);
    }
    Ok(())
}
