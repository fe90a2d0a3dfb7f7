//! The tests' data: a tiny MNIST-style dataset (8x8 grayscale, 4 classes, the class is the
//! bright row, as in `worker/tests/client.rs`) and sweep files over it.

use std::path::Path;

use deepmad_worker::data::idx;

/// Writes `train` training and `test` test images in IDX format to `folder`.
pub fn write_dataset(folder: &Path, train: u32, test: u32) {
    idx::write_synthetic(folder, train, test).expect("writing the dataset");
}

/// What a test's sweep looks like: basic blocks, tiny budgets, 8x8 images, 4 classes.
#[derive(Clone, Debug)]
pub struct SweepShape<'a> {
    pub name: &'a str,
    pub seeds: &'a [u32],
    pub rho: &'a [f64],
    /// Parameter budgets, in human units (`10K`).
    pub params: &'a [&'a str],
    pub epochs: u32,
    pub batch_size: u32,
    pub eval_batch_size: u32,
}

impl Default for SweepShape<'_> {
    fn default() -> Self {
        SweepShape {
            name: "e2e",
            seeds: &[0],
            rho: &[0.5],
            params: &["10K"],
            epochs: 2,
            batch_size: 32,
            eval_batch_size: 256,
        }
    }
}

/// Returns a sweep file (TOML) over the dataset in `data`.
pub fn sweep_toml(data: &Path, shape: &SweepShape<'_>) -> String {
    let list = |values: Vec<String>| values.join(", ");
    format!(
        "name = \"{name}\"\n\
         dataset = \"idx:{data}\"\n\
         seeds = [{seeds}]\n\
         [grid]\n\
         block = [\"basic\"]\n\
         rho = [{rho}]\n\
         budget = [{budgets}]\n\
         resolution = 8\n\
         num_classes = 4\n\
         in_channels = 1\n\
         [recipe]\n\
         epochs = {epochs}\n\
         warmup_epochs = 0\n\
         cooldown_epochs = 0\n\
         batch_size = {batch}\n\
         eval_batch_size = {eval_batch}\n\
         lr = 0.05\n\
         mixup_alpha = 0.0\n\
         random_erase_prob = 0.0\n\
         hflip_prob = 0.0\n\
         crop_padding = 0\n",
        name = shape.name,
        data = data.display(),
        seeds = list(shape.seeds.iter().map(u32::to_string).collect()),
        rho = list(shape.rho.iter().map(|rho| format!("{rho:?}")).collect()),
        budgets = list(
            shape
                .params
                .iter()
                .map(|params| format!("{{ params = \"{params}\" }}"))
                .collect()
        ),
        epochs = shape.epochs,
        batch = shape.batch_size,
        eval_batch = shape.eval_batch_size,
    )
}

/// Writes a second task in IDX format to `folder`: 8x8 grayscale images of 2 classes, the
/// left or the right half bright (a downstream dataset with its own classes).
pub fn write_halves_dataset(folder: &Path, train: u32, test: u32) {
    std::fs::create_dir_all(folder).expect("creating the dataset folder");
    let side = 8u32;
    let idx = |dims: &[u32], data: &[u8]| {
        let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
        for dim in dims {
            bytes.extend_from_slice(&dim.to_be_bytes());
        }
        bytes.extend_from_slice(data);
        bytes
    };
    for (prefix, count) in [("train", train), ("t10k", test)] {
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for index in 0..count {
            let class = (index % 2) as u8;
            labels.push(class);
            for _row in 0..side {
                for column in 0..side {
                    let bright = (column < side / 2) == (class == 0);
                    images.push(if bright { 240 } else { (index * 11 % 50) as u8 });
                }
            }
        }
        let images = idx(&[count, side, side], &images);
        let labels = idx(&[count], &labels);
        std::fs::write(folder.join(format!("{prefix}-images-idx3-ubyte")), images)
            .expect("writing images");
        std::fs::write(folder.join(format!("{prefix}-labels-idx1-ubyte")), labels)
            .expect("writing labels");
    }
}
