//! deepmad's kernels against candle's stock ops: every row of the parity harness
//! (`deepmad_kernels::parity::check`, which `deepmad bench --check` prints) within its device's
//! tolerance.

use candle_core::Device;
use deepmad_kernels::parity::{check, check_tolerance};

fn assert_parity(device: &Device) {
    let tolerance = check_tolerance(device);
    let rows = check(device).expect("the parity harness runs");
    assert!(rows.len() > 20, "every op is compared: {} rows", rows.len());
    for row in rows {
        assert!(row.worst() < tolerance, "{}: {:?}", row.case, row.errors);
    }
}

#[test]
fn deepmad_kernels_match_candle_on_the_cpu() {
    assert_parity(&Device::Cpu);
}

/// Runs only in a `cuda` build on a machine with a GPU (`deepmad bench --check --device cuda`
/// runs the same comparison from the release binary).
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_match_candle() {
    let device = Device::new_cuda(0).expect("a CUDA device (this test needs a GPU)");
    deepmad_kernels::prepare_device(&device).expect("deepmad's CUDA kernels compile");
    assert_parity(&device);
}
