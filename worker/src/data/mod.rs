//! Datasets: what people have on disk, loaded into memory as 8-bit images.
//!
//! A dataset is named `KIND:PATH` ([`DatasetSpec`]): `cifar10` and `cifar100` (the binary
//! versions), `idx` (MNIST-style IDX files, optionally gzipped: MNIST, Fashion-MNIST) and
//! `folder` (one sub-folder per class of PNG/JPEG files). Every kind loads into the same
//! [`Dataset`]: a train and a test [`Split`] of `channels x side x side` bytes per image, plus
//! a content hash over the decoded images and labels, which is what results record.
//!
//! Training turns images into batches: `train::augment` and `train::prefetch`.

pub mod cifar;
pub mod folder;
pub mod idx;

use std::path::Path;

use crate::error::WorkerError;

/// The dataset's name lives in the design crate, beside the recipe that may carry it.
pub use deepmad_design::dataset::{DatasetKind, DatasetSpec};

/// Images and labels of one split: image `i` is `images[i * len .. (i + 1) * len]` with
/// `len = channels * side * side`, channel-major (CHW), one byte per value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u32>,
}

impl Split {
    /// Returns the number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Returns true when the split has no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Returns the first `count` images (all when there are fewer), for quick runs and tests.
    pub fn truncated(&self, count: usize) -> Split {
        let count = count.min(self.len());
        let image_len = self.images.len() / self.len().max(1);
        Split {
            images: self.images[..count * image_len].to_vec(),
            labels: self.labels[..count].to_vec(),
        }
    }
}

/// What the design expects of the images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Side that folder images are resized and center-cropped to (the design's resolution);
    /// the binary formats keep their own side.
    pub side: u32,
    /// 1 (grayscale) or 3 (RGB): grayscale data is replicated into three channels (as
    /// torchvision's `Grayscale(num_output_channels=3)`), colour data converted to luma.
    pub channels: u32,
}

/// A loaded dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub spec: DatasetSpec,
    pub channels: u32,
    pub side: u32,
    pub num_classes: u32,
    pub train: Split,
    pub test: Split,
    /// Per-channel mean and standard deviation of the training pixels, in [0, 1] units.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// SHA-256 (hex) over the shape and the decoded images and labels of both splits.
    pub content_hash: String,
}

impl Dataset {
    /// Loads `spec`; errors are deterministic for malformed files, retryable for I/O.
    pub fn load(spec: &DatasetSpec, options: LoadOptions) -> Result<Dataset, WorkerError> {
        let raw = match spec.kind {
            DatasetKind::Cifar10 => cifar::load(&spec.path, cifar::Variant::Cifar10)?,
            DatasetKind::Cifar100 => cifar::load(&spec.path, cifar::Variant::Cifar100)?,
            DatasetKind::Idx => idx::load(&spec.path)?,
            DatasetKind::Folder => folder::load(&spec.path, options)?,
        };
        Dataset::from_splits(spec.clone(), convert_channels(raw, options.channels)?)
    }

    /// Builds a dataset from decoded splits: checks them, computes statistics and the hash.
    pub fn from_splits(spec: DatasetSpec, raw: RawDataset) -> Result<Dataset, WorkerError> {
        let malformed = |reason: String| WorkerError::MalformedData {
            path: spec.path.clone(),
            reason,
        };
        let image_len = (raw.channels * raw.side * raw.side) as usize;
        for (name, split) in [("train", &raw.train), ("test", &raw.test)] {
            if split.is_empty() {
                return Err(malformed(format!("the {name} split has no images")));
            }
            if split.images.len() != split.len() * image_len {
                return Err(malformed(format!(
                    "the {name} split's images and labels disagree"
                )));
            }
            if let Some(label) = split.labels.iter().find(|&&l| l >= raw.num_classes) {
                return Err(malformed(format!(
                    "{name} label {label} is not below the class count {}",
                    raw.num_classes
                )));
            }
        }
        let (mean, std) = channel_statistics(&raw.train.images, raw.channels as usize, image_len);
        let content_hash = content_hash(&raw);
        Ok(Dataset {
            spec,
            channels: raw.channels,
            side: raw.side,
            num_classes: raw.num_classes,
            train: raw.train,
            test: raw.test,
            mean,
            std,
            content_hash,
        })
    }

    /// Returns the dataset cut to its first `train` and `test` images (quick runs, tests);
    /// statistics and hash are those of the smaller dataset.
    pub fn truncated(&self, train: usize, test: usize) -> Result<Dataset, WorkerError> {
        let raw = RawDataset {
            channels: self.channels,
            side: self.side,
            num_classes: self.num_classes,
            train: self.train.truncated(train),
            test: self.test.truncated(test),
        };
        Dataset::from_splits(self.spec.clone(), raw)
    }

    /// Returns the bytes of one image.
    pub fn image_len(&self) -> usize {
        (self.channels * self.side * self.side) as usize
    }
}

/// What a format loader returns, before statistics and hashing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDataset {
    pub channels: u32,
    pub side: u32,
    pub num_classes: u32,
    pub train: Split,
    pub test: Split,
}

/// Converts the images of `raw` to `channels` channels (see [`LoadOptions::channels`]).
fn convert_channels(raw: RawDataset, channels: u32) -> Result<RawDataset, WorkerError> {
    let convert: fn(&[u8]) -> Vec<u8> = match (raw.channels, channels) {
        (from, to) if from == to => return Ok(raw),
        (1, 3) => |image| image.repeat(3),
        (3, 1) => luma,
        (from, to) => {
            return Err(WorkerError::Incompatible {
                reason: format!("cannot turn {from}-channel images into {to}-channel ones"),
            })
        }
    };
    let image_len = (raw.channels * raw.side * raw.side) as usize;
    let split = |split: Split| Split {
        images: split
            .images
            .chunks_exact(image_len)
            .flat_map(convert)
            .collect(),
        labels: split.labels,
    };
    Ok(RawDataset {
        channels,
        train: split(raw.train),
        test: split(raw.test),
        ..raw
    })
}

/// Returns the luma plane of a CHW RGB image: ITU-R 601-2, `L = (299 R + 587 G + 114 B) / 1000`
/// rounded, as PIL's `convert("L")`.
fn luma(image: &[u8]) -> Vec<u8> {
    let plane = image.len() / 3;
    (0..plane)
        .map(|pixel| {
            let [r, g, b] = [0, 1, 2].map(|channel| u32::from(image[channel * plane + pixel]));
            ((299 * r + 587 * g + 114 * b + 500) / 1000) as u8
        })
        .collect()
}

/// Returns the per-channel mean and standard deviation of CHW images, in [0, 1] units.
/// Sums are exact integers, so the statistics do not depend on summation order.
fn channel_statistics(images: &[u8], channels: usize, image_len: usize) -> (Vec<f32>, Vec<f32>) {
    let plane = image_len / channels;
    let mut sums = vec![(0u64, 0u64); channels];
    for image in images.chunks_exact(image_len) {
        for (channel, values) in image.chunks_exact(plane).enumerate() {
            for &value in values {
                sums[channel].0 += u64::from(value);
                sums[channel].1 += u64::from(value) * u64::from(value);
            }
        }
    }
    let count = (images.len() / channels).max(1) as f64;
    sums.iter()
        .map(|&(sum, squares)| {
            let mean = sum as f64 / count / 255.0;
            let variance = squares as f64 / count / (255.0 * 255.0) - mean * mean;
            // A constant channel would divide by zero when normalising.
            (mean as f32, variance.max(1e-6).sqrt() as f32)
        })
        .unzip()
}

/// SHA-256 over `channels, side, classes`, then each split's length, images and labels.
fn content_hash(raw: &RawDataset) -> String {
    let mut hasher = deepmad_design::digest::Sha256Hex::new();
    for value in [raw.channels, raw.side, raw.num_classes] {
        hasher.update(value.to_le_bytes());
    }
    for split in [&raw.train, &raw.test] {
        hasher.update((split.len() as u64).to_le_bytes());
        hasher.update(&split.images);
        for label in &split.labels {
            hasher.update(label.to_le_bytes());
        }
    }
    hasher.finish()
}

/// Reads a whole file, naming it on failure.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, WorkerError> {
    std::fs::read(path).map_err(|source| WorkerError::io(path, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(channels: u32, images: Vec<u8>) -> RawDataset {
        let split = Split {
            images,
            labels: vec![0],
        };
        RawDataset {
            channels,
            side: 1,
            num_classes: 1,
            train: split.clone(),
            test: split,
        }
    }

    #[test]
    fn grayscale_is_replicated_and_colour_becomes_luma() {
        let gray = convert_channels(raw(1, vec![7]), 3).unwrap();
        assert_eq!(
            (gray.channels, gray.train.images.clone()),
            (3, vec![7, 7, 7])
        );
        // 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2.
        let colour = convert_channels(raw(3, vec![200, 100, 50]), 1).unwrap();
        assert_eq!((colour.channels, colour.test.images), (1, vec![124]));
        let error = convert_channels(raw(1, vec![7]), 4).unwrap_err();
        assert!(error.to_string().contains("4-channel"), "{error}");
    }
}
