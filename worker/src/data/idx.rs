//! MNIST-style IDX files (LeCun et al., "THE MNIST DATABASE of handwritten digits"): MNIST,
//! Fashion-MNIST, KMNIST and friends, plain or gzipped.
//!
//! A folder holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` (a `.` may replace the `-` before
//! `idx`, and each may end in `.gz`). The format: a big-endian magic `0x0000 08 NN` (unsigned
//! bytes, `NN` dimensions), `NN` big-endian `u32` sizes, then the data in row-major order.
//! The class count is the largest label plus one.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::{read_file, RawDataset, Split};
use crate::error::WorkerError;

/// The largest class count an IDX label file may imply (labels are bytes).
const MAX_CLASSES: u32 = 256;

/// Loads the train and test splits from the IDX files in `folder`.
pub fn load(folder: &Path) -> Result<RawDataset, WorkerError> {
    let (train, train_side) = load_split(folder, "train")?;
    let (test, test_side) = load_split(folder, "t10k")?;
    if train_side != test_side {
        return Err(WorkerError::MalformedData {
            path: folder.to_path_buf(),
            reason: format!("train images are {train_side} pixels wide, test images {test_side}"),
        });
    }
    let largest = train.labels.iter().chain(&test.labels).max().copied();
    Ok(RawDataset {
        channels: 1,
        side: train_side,
        num_classes: largest.map_or(0, |label| label + 1).min(MAX_CLASSES),
        train,
        test,
    })
}

fn load_split(folder: &Path, prefix: &str) -> Result<(Split, u32), WorkerError> {
    let images_path = find(folder, prefix, "images", 3)?;
    let labels_path = find(folder, prefix, "labels", 1)?;
    let image_bytes = decompressed(&images_path)?;
    let label_bytes = decompressed(&labels_path)?;
    let (image_dims, images) = parse(&images_path, &image_bytes, 3)?;
    let (label_dims, labels) = parse(&labels_path, &label_bytes, 1)?;
    let malformed = |reason: String| WorkerError::MalformedData {
        path: images_path.clone(),
        reason,
    };
    if image_dims[1] != image_dims[2] {
        return Err(malformed(format!(
            "images are {}x{}; only square images are supported",
            image_dims[1], image_dims[2]
        )));
    }
    if image_dims[0] != label_dims[0] {
        return Err(malformed(format!(
            "{} images but {} labels in {}",
            image_dims[0],
            label_dims[0],
            labels_path.display()
        )));
    }
    let split = Split {
        images: images.to_vec(),
        labels: labels.iter().map(|&label| u32::from(label)).collect(),
    };
    Ok((split, image_dims[1]))
}

/// Finds `{prefix}-{what}-idx{dims}-ubyte` with the usual spelling variants.
fn find(folder: &Path, prefix: &str, what: &str, dims: u32) -> Result<PathBuf, WorkerError> {
    let stems = [
        format!("{prefix}-{what}-idx{dims}-ubyte"),
        format!("{prefix}-{what}.idx{dims}-ubyte"),
    ];
    for stem in &stems {
        for suffix in ["", ".gz"] {
            let candidate = folder.join(format!("{stem}{suffix}"));
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(WorkerError::io(
        folder.join(&stems[0]),
        std::io::Error::new(std::io::ErrorKind::NotFound, "no such IDX file (nor .gz)"),
    ))
}

/// Returns the file's bytes, gunzipped when they start with the gzip magic.
fn decompressed(path: &Path) -> Result<Vec<u8>, WorkerError> {
    let bytes = read_file(path)?;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    GzDecoder::new(bytes.as_slice())
        .read_to_end(&mut out)
        .map_err(|error| WorkerError::MalformedData {
            path: path.to_path_buf(),
            reason: format!("bad gzip stream: {error}"),
        })?;
    Ok(out)
}

/// Parses an unsigned-byte IDX file of `dims` dimensions: returns the sizes and the data.
pub fn parse<'a>(
    path: &Path,
    bytes: &'a [u8],
    dims: usize,
) -> Result<(Vec<u32>, &'a [u8]), WorkerError> {
    let malformed = |reason: String| WorkerError::MalformedData {
        path: path.to_path_buf(),
        reason,
    };
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(malformed(format!(
            "{} bytes is shorter than the header",
            bytes.len()
        )));
    }
    let expected_magic = [0, 0, 0x08, dims as u8];
    if bytes[..4] != expected_magic {
        return Err(malformed(format!(
            "magic {:02x?} is not {expected_magic:02x?} (unsigned bytes, {dims} dimensions)",
            &bytes[..4]
        )));
    }
    let sizes: Vec<u32> = bytes[4..header]
        .chunks_exact(4)
        .map(|chunk| u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect();
    let count = sizes.iter().map(|&size| size as usize).product::<usize>();
    let data = &bytes[header..];
    if data.len() != count {
        return Err(malformed(format!(
            "the header promises {count} values of sizes {sizes:?}, the file has {}",
            data.len()
        )));
    }
    Ok((sizes, data))
}

/// Encodes an unsigned-byte IDX file (tests and tools write datasets with it).
pub fn encode(sizes: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 0x08, sizes.len() as u8];
    for size in sizes {
        bytes.extend_from_slice(&size.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

/// Writes a tiny synthetic MNIST-style dataset to `folder` for tests and demos: 8x8 gray
/// images of 4 classes, `train` training and `test` test images, where the class is the one
/// bright row (row `2 * class`) over a faint noise pattern. A small network learns it well
/// above chance (25%) in a few short epochs.
pub fn write_synthetic(folder: &Path, train: u32, test: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(folder)?;
    let side = 8u32;
    for (prefix, count) in [("train", train), ("t10k", test)] {
        let mut images = Vec::with_capacity((count * side * side) as usize);
        let mut labels = Vec::with_capacity(count as usize);
        for index in 0..count {
            let class = (index % 4) as u8;
            labels.push(class);
            for row in 0..side {
                for _ in 0..side {
                    let bright = row as u8 == class * 2;
                    images.push(if bright { 250 } else { (index * 7 % 40) as u8 });
                }
            }
        }
        let image_file = encode(&[count, side, side], &images);
        let label_file = encode(&[count], &labels);
        std::fs::write(
            folder.join(format!("{prefix}-images-idx3-ubyte")),
            image_file,
        )?;
        std::fs::write(
            folder.join(format!("{prefix}-labels-idx1-ubyte")),
            label_file,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_encode_writes() {
        let data: Vec<u8> = (0..2 * 3 * 3).collect();
        let bytes = encode(&[2, 3, 3], &data);
        let (sizes, parsed) = parse(Path::new("x"), &bytes, 3).unwrap();
        assert_eq!(sizes, vec![2, 3, 3]);
        assert_eq!(parsed, data.as_slice());
    }

    #[test]
    fn rejects_wrong_magic_and_truncation_with_the_reason() {
        let mut bytes = encode(&[2, 3, 3], &[0; 18]);
        let short = &bytes[..bytes.len() - 1];
        let message = parse(Path::new("x"), short, 3).unwrap_err().to_string();
        assert!(message.contains("promises 18 values"), "{message}");
        bytes[2] = 0x0d; // float data
        let message = parse(Path::new("x"), &bytes, 3).unwrap_err().to_string();
        assert!(message.contains("magic"), "{message}");
        let message = parse(Path::new("x"), &[0, 0], 1).unwrap_err().to_string();
        assert!(message.contains("shorter than the header"), "{message}");
    }
}
