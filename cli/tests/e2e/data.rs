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
