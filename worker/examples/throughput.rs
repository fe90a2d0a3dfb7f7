//! Training throughput benchmark: images per second of forward + backward + SGD step at batch
//! 128 for a ResNet-20-sized design and an mbconv-with-SE design, on synthetic 32x32 data.
//!
//! `cargo run --release -p deepmad-worker --example throughput [-- --device cuda --steps 20]`
//! (build with `--features cuda` for a GPU). Prints one line per design; not a test.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, ModuleT, Tensor};
use deepmad_design::{count, Activation, BlockKind, Mid, Network, Stage, Stem};
use deepmad_worker::loss::soft_cross_entropy;
use deepmad_worker::model::Model;
use deepmad_worker::optim::{Sgd, SgdConfig};
use deepmad_worker::DeviceSpec;

fn stage(
    block: BlockKind,
    cin: u32,
    out: u32,
    stride: u32,
    depth: u32,
    mid: Option<Mid>,
    se: bool,
) -> Stage {
    Stage {
        block,
        in_channels: cin,
        out,
        stride,
        depth,
        kernel: 3,
        mid,
        se,
    }
}

/// He et al.'s CIFAR ResNet-20 widths and depths (16/32/64, three blocks each), with
/// projection shortcuts as the IR defines them.
fn resnet20() -> Network {
    let b = BlockKind::Basic;
    Network {
        resolution: 32,
        in_channels: 3,
        num_classes: 10,
        activation: Activation::Relu,
        stem: Stem {
            out: 16,
            kernel: 3,
            stride: 1,
            max_pool: false,
        },
        stages: vec![
            stage(b, 16, 16, 1, 3, None, false),
            stage(b, 16, 32, 2, 3, None, false),
            stage(b, 32, 64, 2, 3, None, false),
        ],
        head: None,
    }
}

/// A small EfficientNet-like design for 32x32 inputs: MBConv with SE and SiLU.
fn mbconv_se() -> Network {
    let m = BlockKind::Mbconv;
    Network {
        resolution: 32,
        in_channels: 3,
        num_classes: 10,
        activation: Activation::Silu,
        stem: Stem {
            out: 16,
            kernel: 3,
            stride: 1,
            max_pool: false,
        },
        stages: vec![
            stage(m, 16, 16, 1, 1, Some(Mid::Ratio(1)), true),
            stage(m, 16, 24, 2, 2, Some(Mid::Ratio(4)), true),
            stage(m, 24, 40, 2, 2, Some(Mid::Ratio(4)), true),
            stage(m, 40, 80, 2, 2, Some(Mid::Ratio(4)), true),
        ],
        head: Some(320),
    }
}

struct Options {
    device: DeviceSpec,
    batch: usize,
    steps: usize,
    warmup: usize,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        device: DeviceSpec::Cpu,
        batch: 128,
        steps: 10,
        warmup: 2,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--device" => options.device = value.parse()?,
            "--batch" => options.batch = value.parse()?,
            "--steps" => options.steps = value.parse()?,
            "--warmup" => options.warmup = value.parse()?,
            other => bail!("unknown flag {other} (known: --device --batch --steps --warmup)"),
        }
    }
    Ok(options)
}

fn measure(name: &str, net: &Network, options: &Options) -> anyhow::Result<()> {
    let device = options.device.open()?;
    let model = Model::build(net, 0, 0.01, &device)?;
    let config = SgdConfig {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
    };
    let mut sgd = Sgd::new(model.named_vars(), config)?;
    let side = net.resolution as usize;
    let xs = Tensor::randn(0f32, 1., (options.batch, 3, side, side), &device)?;
    let targets = Tensor::full(0.1f32, (options.batch, 10), &device)?.to_dtype(DType::F32)?;
    let mut run = |steps: usize| -> anyhow::Result<f64> {
        let start = Instant::now();
        for _ in 0..steps {
            let logits = model.forward_t(&xs, true)?;
            let loss = soft_cross_entropy(&logits, &targets)?;
            let grads = loss.backward()?;
            sgd.step(&grads, 0.1)?;
            loss.to_scalar::<f32>()?; // waits for the device
        }
        Ok(start.elapsed().as_secs_f64())
    };
    run(options.warmup)?;
    let seconds = run(options.steps)?;
    let totals = count::totals(net);
    let images = (options.steps * options.batch) as f64;
    println!(
        "{name:<10} params {:>8} MACs {:>11} batch {} device {} CANDLE_NUM_THREADS={}: {:.1} images/s ({:.3} s/step)",
        totals.params,
        totals.flops,
        options.batch,
        options.device,
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
        images / seconds,
        seconds / options.steps as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    measure("resnet20", &resnet20(), &options)?;
    measure("mbconv-se", &mbconv_se(), &options)?;
    Ok(())
}
