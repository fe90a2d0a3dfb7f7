use candle_core::Device;
use deepmad_design::{Activation, BlockKind, Network, Stage, Stem};
use deepmad_worker::*;
use std::sync::Arc;
struct Print;
impl TrainHooks for Print {
    fn on_step(&mut self, p: &StepProgress) -> Control {
        if p.position.global_step % 50 == 0 {
            println!(
                "step {} loss {:.4} lr {:.4} {:.0} img/s",
                p.position.global_step, p.loss, p.lr, p.images_per_second
            );
        }
        Control::Continue
    }
    fn on_epoch(&mut self, m: &EpochMetrics) -> Control {
        println!("{m:?}");
        Control::Continue
    }
}
fn basic(cin: u32, out: u32, stride: u32) -> Stage {
    Stage {
        block: BlockKind::Basic,
        in_channels: cin,
        out,
        stride,
        depth: 1,
        kernel: 3,
        mid: None,
        se: false,
    }
}
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let lr: f64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(0.1);
    let epochs: u32 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(2);
    let smoothing: f64 = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(0.1);
    let batch: u32 = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(64);
    let ntrain: usize = args.get(5).map(|s| s.parse().unwrap()).unwrap_or(4000);
    let data = Dataset::load(
        &"idx:data/mnist-subset".parse()?,
        LoadOptions {
            side: 28,
            channels: 1,
        },
    )?;
    let data = Arc::new(data.truncated(ntrain, 2000)?);
    let network = Network {
        resolution: 28,
        in_channels: 1,
        num_classes: 10,
        activation: Activation::Relu,
        stem: Stem {
            out: 8,
            kernel: 3,
            stride: std::env::var("STEM_STRIDE")
                .map(|s| s.parse().unwrap())
                .unwrap_or(1),
            max_pool: false,
        },
        stages: vec![basic(8, 8, 1), basic(8, 16, 2), basic(16, 32, 2)],
        head: None,
    };
    let recipe = Recipe {
        epochs,
        warmup_epochs: 0,
        batch_size: batch,
        eval_batch_size: 500,
        lr,
        bn_momentum: 0.1,
        mixup_alpha: 0.0,
        hflip_prob: 0.0,
        random_erase_prob: 0.0,
        crop_padding: 2,
        label_smoothing: smoothing,
        ..Recipe::default()
    };
    let mut t = Trainer::new(
        TrialSpec {
            network,
            recipe,
            seed: 0,
        },
        data,
        TrainerOptions::new(Device::Cpu),
    )?;
    let out = t.run(&mut Print, &CancellationFlag::new())?;
    if let TrainOutcome::Completed(r) = out {
        println!("final {:?}", r.final_test);
    }
    Ok(())
}
