//! `deepmad bench DESIGN...`: training throughput (forward, backward and SGD step, fp32) of
//! designs on one device, with deepmad's kernels, candle's stock ones, or both; and
//! `deepmad bench --check`: deepmad's convolutions against candle's on that device.
//!
//! DESIGN is a deepmad architecture JSON file (`deepmad design --format json`; the reference
//! networks are in `bench/designs/`) or a built-in network (1000 classes at 224x224). Data are
//! synthetic, so this measures the training step alone; `bench/compare.py` runs it next to
//! PyTorch on the same networks and prints the ratio.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use deepmad_design::{classic, Network};
use deepmad_kernels::{parity, Kernels};
use deepmad_worker::nn::loss::soft_cross_entropy;
use deepmad_worker::train::optim::{Sgd, SgdConfig};
use deepmad_worker::{DeviceSpec, Model};
use serde::Serialize;

use crate::args::BenchArgs;
use crate::Failure;

/// One measurement, printed as a JSON line with `--json` (the fields `bench/compare.py`
/// joins with PyTorch's).
#[derive(Debug, Serialize)]
struct Measurement {
    framework: &'static str,
    kernels: String,
    design: String,
    params: u64,
    device: String,
    threads: usize,
    batch: usize,
    mode: &'static str,
    steps: usize,
    /// Whether the timed loop waited for the device after every step (`--sync-each-step`).
    sync_each_step: bool,
    images_per_s: f64,
    s_per_step: f64,
    /// Milliseconds per step in forward + loss, backward, and optimizer step, measured over
    /// the same number of extra steps with the device synchronised between phases.
    forward_ms: f64,
    backward_ms: f64,
    optimizer_ms: f64,
    /// Milliseconds per step the host spends issuing the step's work, before it waits for the
    /// device. On CUDA, close to `s_per_step` means the step is bound by the host (launches,
    /// allocations, autograd), not by the device.
    host_ms: f64,
}

pub fn run(args: &BenchArgs, out: &mut impl Write) -> Result<(), Failure> {
    let spec = args
        .device
        .parse::<DeviceSpec>()
        .map_err(|error| Failure::usage(format!("--device: {error}")))?;
    if let Some(threads) = args.threads {
        // candle reads this once, when its CPU thread pool starts (nothing has run yet).
        std::env::set_var("CANDLE_NUM_THREADS", threads.max(1).to_string());
    }
    let device = spec.open().map_err(|error| {
        let hint = if DeviceSpec::cuda_compiled() {
            ""
        } else {
            " (this build has no CUDA: rebuild with --features cuda)"
        };
        Failure::usage(format!("--device: {error}{hint}"))
    })?;
    if args.check {
        return check(&device, &spec, out);
    }
    if args.designs.is_empty() {
        return Err(Failure::usage(
            "DESIGN: name at least one design file or built-in network (or pass --check)",
        ));
    }
    let kernel_sets: Vec<Kernels> = match args.kernels.trim().to_ascii_lowercase().as_str() {
        "both" => vec![Kernels::Stock, Kernels::Deepmad],
        other => vec![other
            .parse::<Kernels>()
            .map_err(|error| Failure::usage(format!("--kernels: {error} (or both)")))?],
    };
    if args.batch.contains(&0) || args.steps == 0 {
        return Err(Failure::usage("--batch and --steps must be positive"));
    }
    let designs = args
        .designs
        .iter()
        .map(|design| load_design(design))
        .collect::<Result<Vec<_>, _>>()?;
    for (name, network) in &designs {
        for &batch in &args.batch {
            for &kernel_set in &kernel_sets {
                // Restored on every way out of this scope, an error too.
                let _kernels = deepmad_kernels::scoped(kernel_set);
                let measured = measure(name, network, &device, &spec, batch, args, kernel_set)
                    .map_err(|error| Failure {
                        code: 1,
                        message: format!("{name} at batch {batch} ({kernel_set}): {error}"),
                    })?;
                if args.json {
                    let line = serde_json::to_string(&measured).expect("plain fields serialize");
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "{:<14} {:>9} params  batch {:>4}  {:<8} {:<8} {:>10.1} images/s  {:.4} s/step  (forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms; host {:.1} ms)",
                        measured.design,
                        measured.params,
                        measured.batch,
                        measured.device,
                        measured.kernels,
                        measured.images_per_s,
                        measured.s_per_step,
                        measured.forward_ms,
                        measured.backward_ms,
                        measured.optimizer_ms,
                        measured.host_ms
                    )?;
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// A design file's stem and network, or a built-in network at ImageNet's shape.
fn load_design(design: &str) -> Result<(String, Network), Failure> {
    let path = Path::new(design);
    if path.is_file() {
        let text = std::fs::read_to_string(path)
            .map_err(|error| Failure::usage(format!("DESIGN: cannot read {design}: {error}")))?;
        let network = Network::from_json(&text)
            .map_err(|error| Failure::usage(format!("DESIGN {design}: {error}")))?;
        let name = path.file_stem().map_or(design.to_string(), |stem| {
            stem.to_string_lossy().into_owned()
        });
        return Ok((name, network));
    }
    match classic::by_name(design, 1000, 224) {
        Ok(network) => Ok((design.to_string(), network)),
        Err(_) => Err(Failure::usage(format!(
            "DESIGN: {design:?} is neither a file nor a built-in network ({})",
            classic::NAMES.join(", ")
        ))),
    }
}

fn measure(
    name: &str,
    network: &Network,
    device: &Device,
    spec: &DeviceSpec,
    batch: usize,
    args: &BenchArgs,
    kernel_set: Kernels,
) -> anyhow::Result<Measurement> {
    let model = Model::build(network, 0, 0.01, device)?;
    let config = SgdConfig {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
    };
    let mut sgd = Sgd::new(model.named_vars(), config)?;
    let side = network.resolution as usize;
    let channels = network.in_channels as usize;
    let classes = network.num_classes as usize;
    let xs = Tensor::randn(0f32, 1., (batch, channels, side, side), device)?;
    let targets =
        Tensor::full(1.0 / classes as f32, (batch, classes), device)?.to_dtype(DType::F32)?;
    // (total seconds, seconds the host spent before waiting for the device)
    let mut steps = |count: usize| -> anyhow::Result<(f64, f64)> {
        device.synchronize()?;
        let start = Instant::now();
        let mut host = 0f64;
        let mut last_loss = None;
        for _ in 0..count {
            let issued = Instant::now();
            let logits = model.forward_t(&xs, true)?;
            let loss = soft_cross_entropy(&logits, &targets)?;
            let grads = loss.backward()?;
            sgd.step(&grads, 0.1)?;
            host += issued.elapsed().as_secs_f64();
            if args.sync_each_step {
                loss.to_scalar::<f32>()?; // waits for the device
            }
            last_loss = Some(loss);
        }
        if let Some(loss) = last_loss {
            let loss = loss.to_scalar::<f32>()?; // waits for the device
            anyhow::ensure!(loss.is_finite(), "the last loss is {loss} (not finite)");
        }
        Ok((start.elapsed().as_secs_f64(), host))
    };
    steps(args.warmup)?;
    let (seconds, host_seconds) = steps(args.steps)?;
    let mut phases = [0f64; 3];
    for _ in 0..args.steps {
        let start = Instant::now();
        let logits = model.forward_t(&xs, true)?;
        let loss = soft_cross_entropy(&logits, &targets)?;
        loss.to_scalar::<f32>()?;
        let forward = Instant::now();
        let grads = loss.backward()?;
        device.synchronize()?;
        let backward = Instant::now();
        sgd.step(&grads, 0.1)?;
        device.synchronize()?;
        phases[0] += (forward - start).as_secs_f64();
        phases[1] += (backward - forward).as_secs_f64();
        phases[2] += backward.elapsed().as_secs_f64();
    }
    let per_step_ms = |total: f64| total * 1000.0 / args.steps as f64;
    Ok(Measurement {
        framework: "candle",
        kernels: kernel_set.to_string(),
        design: name.to_string(),
        params: model.param_count(),
        device: spec.to_string(),
        threads: if device.is_cpu() {
            candle_core::utils::get_num_threads()
        } else {
            0
        },
        batch,
        mode: "fp32",
        steps: args.steps,
        sync_each_step: args.sync_each_step,
        images_per_s: (args.steps * batch) as f64 / seconds,
        s_per_step: seconds / args.steps as f64,
        forward_ms: per_step_ms(phases[0]),
        backward_ms: per_step_ms(phases[1]),
        optimizer_ms: per_step_ms(phases[2]),
        host_ms: per_step_ms(host_seconds),
    })
}

fn check(device: &Device, spec: &DeviceSpec, out: &mut impl Write) -> Result<(), Failure> {
    let rows = parity::check(device).map_err(|error| Failure {
        code: 1,
        message: format!("kernel check on {spec}: {error}"),
    })?;
    let tolerance = parity::check_tolerance(device);
    writeln!(
        out,
        "deepmad kernels on {spec} vs candle's stock ops on the CPU (max |difference| / max |reference|, tolerance {tolerance:e}):"
    )?;
    let mut failed = 0;
    for row in &rows {
        let verdict = if row.worst() < tolerance {
            "ok"
        } else {
            failed += 1;
            "FAIL"
        };
        let errors: Vec<String> = row
            .errors
            .iter()
            .map(|(what, error)| format!("{what} {error:.2e}"))
            .collect();
        writeln!(out, "  {:<40} {}  {verdict}", row.case, errors.join("  "))?;
    }
    if failed > 0 {
        return Err(Failure {
            code: 1,
            message: format!("{failed} of {} kernel checks failed on {spec}", rows.len()),
        });
    }
    writeln!(out, "all {} checks passed", rows.len())?;
    Ok(())
}
