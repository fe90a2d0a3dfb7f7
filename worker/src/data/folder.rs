//! Image folder trees, as torchvision's `ImageFolder`: `PATH/train/<class>/<image>` and
//! `PATH/test/<class>/<image>` (or `PATH/val/...`), PNG or JPEG.
//!
//! Classes are the sub-folders of `train/` in name order (label 0 is the first); the test
//! split may lack a class but not add one. Images are decoded, converted to grayscale or RGB,
//! scaled so the shorter side is the target side and center-cropped to a square (`image`'s
//! `resize_to_fill`, triangle filter). Files are read in name order, so a tree always loads
//! into the same bytes.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::{read_file, LoadOptions, RawDataset, Split};
use crate::error::WorkerError;

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Loads both splits of the tree at `root`.
pub fn load(root: &Path, options: LoadOptions) -> Result<RawDataset, WorkerError> {
    if options.channels != 1 && options.channels != 3 {
        return Err(WorkerError::Incompatible {
            reason: format!(
                "image folders load as 1 or 3 channels, the design wants {}",
                options.channels
            ),
        });
    }
    let train_root = root.join("train");
    let classes = sorted_entries(&train_root, true)?;
    if classes.is_empty() {
        return Err(WorkerError::MalformedData {
            path: train_root,
            reason: "has no class folders".into(),
        });
    }
    let class_names: Vec<String> = classes.iter().map(|path| file_name(path)).collect();
    let train = load_split(&train_root, &class_names, options)?;
    let test_root = ["test", "val"]
        .iter()
        .map(|name| root.join(name))
        .find(|path| path.is_dir())
        .ok_or_else(|| WorkerError::MalformedData {
            path: root.to_path_buf(),
            reason: "has no test/ or val/ folder".into(),
        })?;
    let test = load_split(&test_root, &class_names, options)?;
    Ok(RawDataset {
        channels: options.channels,
        side: options.side,
        num_classes: class_names.len() as u32,
        train,
        test,
    })
}

fn load_split(root: &Path, classes: &[String], options: LoadOptions) -> Result<Split, WorkerError> {
    let mut split = Split::default();
    for class_folder in sorted_entries(root, true)? {
        let name = file_name(&class_folder);
        let label = classes
            .iter()
            .position(|class| *class == name)
            .ok_or_else(|| WorkerError::MalformedData {
                path: class_folder.clone(),
                reason: format!("class {name:?} is not among the training classes"),
            })?;
        for file in sorted_entries(&class_folder, false)? {
            if !has_image_extension(&file) {
                continue;
            }
            let pixels = decode(&file, options)?;
            split.images.extend_from_slice(&pixels);
            split.labels.push(label as u32);
        }
    }
    Ok(split)
}

/// Decodes one image into `channels x side x side` bytes (CHW).
fn decode(path: &Path, options: LoadOptions) -> Result<Vec<u8>, WorkerError> {
    let bytes = read_file(path)?;
    let image = image::load_from_memory(&bytes).map_err(|error| WorkerError::MalformedData {
        path: path.to_path_buf(),
        reason: format!("cannot decode image: {error}"),
    })?;
    let side = options.side;
    let image = if image.width() == side && image.height() == side {
        image
    } else {
        image.resize_to_fill(side, side, FilterType::Triangle)
    };
    if options.channels == 1 {
        return Ok(image.to_luma8().into_raw());
    }
    // RGB comes interleaved (HWC); the model reads planes (CHW).
    let interleaved = image.to_rgb8().into_raw();
    let plane = (side * side) as usize;
    let mut planar = vec![0u8; 3 * plane];
    for (pixel, rgb) in interleaved.chunks_exact(3).enumerate() {
        for (channel, &value) in rgb.iter().enumerate() {
            planar[channel * plane + pixel] = value;
        }
    }
    Ok(planar)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| EXTENSIONS.contains(&extension.to_ascii_lowercase().as_str()))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Returns the sub-folders (`folders`) or files of `dir`, sorted by name.
fn sorted_entries(dir: &Path, folders: bool) -> Result<Vec<PathBuf>, WorkerError> {
    let entries = std::fs::read_dir(dir).map_err(|source| WorkerError::io(dir, source))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| WorkerError::io(dir, source))?.path();
        if path.is_dir() == folders {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}
