//! The worker's integration tests: one test binary (ripgrep's layout), one module per concern.

mod data;
mod model;
mod nets;
mod train;

use std::sync::Once;

use candle_core::Device;
use deepmad_worker::{DatasetKind, DatasetSpec};

/// Returns the CPU device with candle's CPU thread pool limited to the calling thread.
///
/// candle's pool spins at a barrier after every operation. On CI's two cores, shared with the
/// loader thread and a second test thread, a worker that is not scheduled stalls everyone:
/// measured on this project's 2-core machine, training ran at 96 images/s with the default
/// pool and 333 images/s single-threaded (same results, bit for bit). The variable is read
/// once, when the pool starts, so every test that runs candle operations calls this first.
pub fn cpu() -> Device {
    static LIMIT_THREADS: Once = Once::new();
    LIMIT_THREADS.call_once(|| std::env::set_var("CANDLE_NUM_THREADS", "1"));
    Device::Cpu
}

/// SHA-256 of the decoded shipped MNIST subset (recorded when it was made; see data/README.md).
pub const SHIPPED_MNIST_HASH: &str =
    "d567356dcd75b3461c54aed50daca37e41d12b9ad1ff6c7a2590612888a8d765";

/// The real dataset shipped in the repository's `data/` folder.
pub fn shipped_mnist() -> DatasetSpec {
    DatasetSpec {
        kind: DatasetKind::Idx,
        path: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist-subset"),
    }
}
