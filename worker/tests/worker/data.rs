//! The data loaders on files the tests write in each format (CIFAR binary, IDX plain and
//! gzipped, PNG/JPEG folders), and the dataset shipped in `data/`.

use std::io::Write;
use std::path::{Path, PathBuf};

use deepmad_worker::data::idx;
use deepmad_worker::{Dataset, DatasetKind, DatasetSpec, LoadOptions, WorkerError};

/// Options for colour formats (CIFAR).
const RGB: LoadOptions = LoadOptions {
    side: 32,
    channels: 3,
};

/// Options for the grayscale IDX files (their side is fixed by the files).
const GRAY: LoadOptions = LoadOptions {
    side: 28,
    channels: 1,
};

fn spec(kind: DatasetKind, path: &Path) -> DatasetSpec {
    DatasetSpec {
        kind,
        path: path.to_path_buf(),
    }
}

/// A CIFAR record: label bytes then 3072 pixels whose value encodes (record, channel).
fn cifar_record(labels: &[u8], record: u8) -> Vec<u8> {
    let mut bytes = labels.to_vec();
    for channel in 0..3u8 {
        bytes.extend(std::iter::repeat_n(
            record.wrapping_mul(3).wrapping_add(channel),
            1024,
        ));
    }
    bytes
}

fn write(path: PathBuf, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn cifar10_binary_batches_load_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("cifar-10-batches-bin");
    for batch in 1..=5u8 {
        let records: Vec<u8> = (0..2)
            .flat_map(|i| cifar_record(&[batch + i], batch * 2 + i))
            .collect();
        write(folder.join(format!("data_batch_{batch}.bin")), &records);
    }
    write(folder.join("test_batch.bin"), &cifar_record(&[9], 50));
    // The parent folder (where the archive was unpacked) is accepted too.
    let data = Dataset::load(&spec(DatasetKind::Cifar10, dir.path()), RGB).unwrap();
    assert_eq!((data.channels, data.side, data.num_classes), (3, 32, 10));
    assert_eq!(data.train.len(), 10);
    assert_eq!(data.test.labels, vec![9]);
    assert_eq!(data.train.labels[..4], [1, 2, 2, 3]);
    // Record 1 of batch 1 is record value 3: channel c holds 3 * 3 + c.
    let image = &data.train.images[3072..2 * 3072];
    assert_eq!((image[0], image[1024], image[2048]), (9, 10, 11));
    assert_eq!(data.content_hash.len(), 64);
}

#[test]
fn cifar100_uses_fine_labels_and_rejects_truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let train: Vec<u8> = [(3u8, 77u8), (19, 5)]
        .iter()
        .flat_map(|&(c, f)| cifar_record(&[c, f], f))
        .collect();
    write(dir.path().join("train.bin"), &train);
    write(dir.path().join("test.bin"), &cifar_record(&[0, 99], 1));
    let data = Dataset::load(&spec(DatasetKind::Cifar100, dir.path()), RGB).unwrap();
    assert_eq!(data.num_classes, 100);
    assert_eq!(data.train.labels, vec![77, 5]);
    assert_eq!(data.test.labels, vec![99]);
    write(
        dir.path().join("test.bin"),
        &cifar_record(&[0, 99], 1)[..3000],
    );
    let error = Dataset::load(&spec(DatasetKind::Cifar100, dir.path()), RGB).unwrap_err();
    assert!(
        matches!(error, WorkerError::MalformedData { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("3074-byte records"), "{error}");
}

fn write_idx(folder: &Path, gzip: bool, images: &[u8], labels: &[u8], count: u32, side: u32) {
    let files = [
        (
            "train-images-idx3-ubyte",
            idx::encode(&[count, side, side], images),
        ),
        ("train-labels-idx1-ubyte", idx::encode(&[count], labels)),
        (
            "t10k-images-idx3-ubyte",
            idx::encode(&[count, side, side], images),
        ),
        ("t10k-labels-idx1-ubyte", idx::encode(&[count], labels)),
    ];
    for (name, bytes) in files {
        if gzip {
            let file = std::fs::File::create(folder.join(format!("{name}.gz"))).unwrap();
            let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            encoder.write_all(&bytes).unwrap();
            encoder.finish().unwrap();
        } else {
            write(folder.join(name), &bytes);
        }
    }
}

#[test]
fn idx_files_load_plain_or_gzipped_with_the_same_hash() {
    let images: Vec<u8> = (0..3 * 5 * 5).map(|i| (i * 7 % 256) as u8).collect();
    let labels = [0u8, 4, 2];
    let plain = tempfile::tempdir().unwrap();
    let gzipped = tempfile::tempdir().unwrap();
    write_idx(plain.path(), false, &images, &labels, 3, 5);
    write_idx(gzipped.path(), true, &images, &labels, 3, 5);
    let a = Dataset::load(&spec(DatasetKind::Idx, plain.path()), GRAY).unwrap();
    let b = Dataset::load(&spec(DatasetKind::Idx, gzipped.path()), GRAY).unwrap();
    assert_eq!((a.channels, a.side, a.num_classes), (1, 5, 5));
    assert_eq!(a.train.images, images);
    assert_eq!(a.train.labels, vec![0, 4, 2]);
    assert_eq!(
        a.content_hash, b.content_hash,
        "the hash is of the content, not the file"
    );
    let mut changed = images.clone();
    changed[0] ^= 1;
    write_idx(plain.path(), false, &changed, &labels, 3, 5);
    let c = Dataset::load(&spec(DatasetKind::Idx, plain.path()), GRAY).unwrap();
    assert_ne!(a.content_hash, c.content_hash);
    // A design with three input channels gets the gray plane three times.
    let rgb = Dataset::load(&spec(DatasetKind::Idx, gzipped.path()), RGB).unwrap();
    assert_eq!(rgb.channels, 3);
    assert_eq!(rgb.train.images[..25], rgb.train.images[25..50]);
}

#[test]
fn idx_count_mismatch_and_missing_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), false, &[0; 2 * 4 * 4], &[1, 2, 3], 2, 4);
    let error = Dataset::load(&spec(DatasetKind::Idx, dir.path()), GRAY).unwrap_err();
    assert!(error.to_string().contains("promises"), "{error}");
    let empty = tempfile::tempdir().unwrap();
    let error = Dataset::load(&spec(DatasetKind::Idx, empty.path()), GRAY).unwrap_err();
    assert!(matches!(error, WorkerError::Io { .. }), "{error}");
    assert!(
        error.to_string().contains("train-images-idx3-ubyte"),
        "{error}"
    );
}

fn write_image(path: PathBuf, color: [u8; 3], width: u32, height: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let image = image::RgbImage::from_pixel(width, height, image::Rgb(color));
    image.save(path).unwrap();
}

#[test]
fn image_folders_load_png_and_jpeg_by_class_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_image(root.join("train/cat/a.png"), [200, 10, 10], 8, 8);
    write_image(root.join("train/cat/b.jpg"), [200, 10, 10], 16, 12);
    write_image(root.join("train/dog/a.png"), [10, 10, 200], 12, 16);
    write_image(root.join("test/dog/x.png"), [10, 10, 200], 8, 8);
    std::fs::write(root.join("train/dog/notes.txt"), "not an image").unwrap();
    let options = LoadOptions {
        side: 8,
        channels: 3,
    };
    let data = Dataset::load(&spec(DatasetKind::Folder, root), options).unwrap();
    assert_eq!((data.num_classes, data.side, data.channels), (2, 8, 3));
    assert_eq!(data.train.labels, vec![0, 0, 1]);
    assert_eq!(data.test.labels, vec![1]);
    // A solid PNG stays exactly its color, stored plane by plane (CHW).
    let first = &data.train.images[..3 * 64];
    assert_eq!((first[0], first[64], first[128]), (200, 10, 10));
    // A resized JPEG stays close to its color.
    let second = &data.train.images[3 * 64..6 * 64];
    assert!(
        second[0].abs_diff(200) < 8 && second[128].abs_diff(10) < 8,
        "{:?}",
        &second[..3]
    );
    let gray = LoadOptions {
        side: 4,
        channels: 1,
    };
    let data = Dataset::load(&spec(DatasetKind::Folder, root), gray).unwrap();
    assert_eq!(data.train.images.len(), 3 * 16);
}

#[test]
fn a_test_class_unknown_to_training_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_image(dir.path().join("train/cat/a.png"), [1, 2, 3], 4, 4);
    write_image(dir.path().join("val/bird/a.png"), [1, 2, 3], 4, 4);
    let options = LoadOptions {
        side: 4,
        channels: 3,
    };
    let error = Dataset::load(&spec(DatasetKind::Folder, dir.path()), options).unwrap_err();
    assert!(error.to_string().contains("\"bird\""), "{error}");
}

#[test]
fn specs_parse_kind_and_path() {
    let parsed: DatasetSpec = "cifar100:/data/c100".parse().unwrap();
    assert_eq!(parsed.kind, DatasetKind::Cifar100);
    assert_eq!(parsed.to_string(), "cifar100:/data/c100");
    for bad in ["cifar10", "imagenet:/x", "idx:"] {
        let error = WorkerError::from(bad.parse::<DatasetSpec>().unwrap_err());
        assert!(
            matches!(error, WorkerError::InvalidDatasetSpec { .. }),
            "{bad}: {error}"
        );
    }
}

/// The shipped subset (see data/README.md): its size, and its content hash pinned so that a
/// silent change to the data or to the loader is caught.
#[test]
fn the_shipped_mnist_subset_loads() {
    let data = Dataset::load(&crate::shipped_mnist(), GRAY).unwrap();
    assert_eq!((data.channels, data.side, data.num_classes), (1, 28, 10));
    assert_eq!((data.train.len(), data.test.len()), (10_000, 2_000));
    assert_eq!(data.content_hash, crate::SHIPPED_MNIST_HASH);
}
