//! Raw command-line arguments, as clap parses them. Validation into domain types happens in
//! the command modules, so every message can name the flag at fault.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// deepmad: design CNNs by mathematics (DeepMAD), then learn which designs win.
#[derive(Debug, Parser)]
#[command(name = "deepmad", version, about, propagate_version = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Analyzes a built-in network or an architecture file (deepmad JSON or TinyNAS).
    Analyze(AnalyzeArgs),
    /// Solves DeepMAD's mathematical program for one budget and prints the design.
    Design(DesignArgs),
    /// Runs a sweep start to finish in this process: an embedded coordinator (SQLite) and
    /// local workers; prints the leaderboard. Run it again to resume.
    Run(RunArgs),
    /// Runs the coordinator: sweeps, leases and results over gRPC.
    Coordinator(CoordinatorArgs),
    /// Runs a worker: leases trials from a coordinator and trains them on one device.
    Worker(WorkerArgs),
    /// Trains one network on one dataset, without a coordinator, with a progress bar.
    Train(TrainArgs),
    /// Writes a design as a PyTorch module, a TinyNAS structure or deepmad JSON.
    Export(ExportArgs),
    /// Measures training throughput of designs on a device (deepmad's kernels vs candle's), or
    /// checks deepmad's convolutions against candle's with --check.
    Bench(BenchArgs),
    /// Creates, lists, shows, cancels, watches or retries sweeps on a coordinator.
    Sweep {
        #[command(subcommand)]
        command: SweepCommand,
    },
    /// Prints the leaderboard of a sweep or of all sweeps.
    Leaderboard(LeaderboardArgs),
    /// Exports a sweep's per-trial results (CSV or JSON).
    Results(ResultsArgs),
    /// Shows a trial's history.
    Trial(TrialShowArgs),
    /// A sweep's analytics: accuracy vs rho, Pareto fronts, Kendall tau of entropy vs accuracy.
    Analytics(AnalyticsArgs),
    /// Draws a sweep's chart as SVG or PNG: rho, pareto, entropy or curves.
    Plot(PlotArgs),
    /// Acts on a sweep's trials: `deepmad trials retry --sweep ID`.
    Trials {
        #[command(subcommand)]
        command: TrialsCommand,
    },
}

/// Where the coordinator is and how to authenticate.
#[derive(Debug, clap::Args)]
pub struct RemoteArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "DEEPMAD_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// Bearer token (a client token from the coordinator's configuration).
    #[arg(long, env = "DEEPMAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed an https:// coordinator's certificate (default: the
    /// system's trusted roots).
    #[arg(long, env = "DEEPMAD_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// A TOML settings file (see docs/configuration in the README).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:50051.
    #[arg(long)]
    pub listen: Option<String>,
    /// Database URL: postgres://... or sqlite://FILE (default sqlite://deepmad.db).
    #[arg(long)]
    pub database: Option<String>,
    /// Loads and validates the settings, prints them, and exits.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The sweep file (TOML; see examples/sweep.toml).
    pub spec: PathBuf,
    /// Where results are kept: sqlite://FILE or postgres://... The same command with the same
    /// database resumes the sweep.
    #[arg(long, default_value = "sqlite://deepmad.db")]
    pub database: String,
    /// auto (every CUDA device of a CUDA build, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Local workers [default: one per device].
    #[arg(long)]
    pub workers: Option<u32>,
    /// Checkpoints and undelivered results of the local workers.
    #[arg(long, default_value = ".deepmad-run")]
    pub work_dir: PathBuf,
    /// Threads of candle's CPU kernels (sets CANDLE_NUM_THREADS).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Leaderboard rows printed at the end.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Leaderboard format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: TableFormat,
    /// Serves the web dashboard on this address while the run lasts, and prints its URL: a
    /// loopback IP:PORT such as 127.0.0.1:8080 (port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub dashboard: Option<String>,
}

/// Worker settings: flags (or their environment variables) override the `--config` file.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// A TOML settings file (keys as the flags, with underscores; see worker/src/client/settings.rs).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The coordinator's URL [default: http://127.0.0.1:50051].
    #[arg(long, env = "DEEPMAD_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Bearer token (a worker token from the coordinator's configuration).
    #[arg(long, env = "DEEPMAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed an https:// coordinator's certificate (default: the
    /// system's trusted roots).
    #[arg(long, env = "DEEPMAD_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature) [default: cpu].
    #[arg(long, env = "DEEPMAD_DEVICE")]
    pub device: Option<String>,
    /// A name for logs and the coordinator's worker list (default: the host and device).
    #[arg(long, env = "DEEPMAD_WORKER_NAME")]
    pub name: Option<String>,
    /// Where checkpoints and undelivered results are kept [default: .deepmad-worker/<name>].
    #[arg(long, env = "DEEPMAD_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Stops after this many trials.
    #[arg(long)]
    pub max_trials: Option<u32>,
    /// Threads of candle's CPU kernels (sets CANDLE_NUM_THREADS).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Loads and validates the settings, prints them, and exits without connecting.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// A built-in network (resnet18, resnet34, resnet50, mobilenet_v2, efficientnet_b0) or a
    /// deepmad architecture JSON file (`deepmad design --format json`).
    pub design: String,
    /// The dataset as KIND:PATH, KIND one of cifar10, cifar100, idx, folder (default: the
    /// recipe's `dataset`), e.g. idx:data/mnist-subset.
    #[arg(long)]
    pub dataset: Option<String>,
    /// A TOML recipe (default: the paper's Table 12, CIFAR-100 column); see worker/recipes/.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Overrides the recipe's number of (cosine) epochs.
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint file: resumed from when it exists, written after every epoch and on Ctrl-C.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Threads of candle's CPU kernels (sets CANDLE_NUM_THREADS; 1 is fastest on a busy
    /// machine, see worker/README.md).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prints the result (every epoch's metrics, hashes) as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// The sweep to draw.
    #[arg(long)]
    pub sweep: String,
    /// rho: top-1 vs rho; pareto: top-1 vs parameters with the front; entropy: top-1 vs
    /// entropy with Kendall's tau; curves: test top-1 per epoch of every trial.
    #[arg(long, value_enum)]
    pub kind: PlotKind,
    /// The file to write (atomically): FILE.svg, or FILE.png (the same chart rasterized; its
    /// text needs an installed font such as Debian's fonts-dejavu-core).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Which chart `deepmad plot` draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlotKind {
    Rho,
    Pareto,
    Entropy,
    Curves,
}

#[derive(Debug, clap::Args)]
pub struct AnalyticsArgs {
    /// The sweep to analyze.
    #[arg(long)]
    pub sweep: String,
    /// table, or json (csv is taken as json: the result is nested).
    #[arg(long, value_enum, default_value = "table")]
    pub format: TableFormat,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A built-in network, a deepmad architecture JSON file, or a TinyNAS structure file
    /// (holding one network).
    pub design: String,
    /// pytorch: a self-contained Python file with an nn.Module (no deepmad needed); tinynas:
    /// the paper code's structure; json: deepmad's canonical architecture JSON.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Input resolution (default: the file's own; 224 for built-in and TinyNAS networks).
    #[arg(long)]
    pub resolution: Option<u32>,
    /// Classes of the classifier (default: the file's own; 1000 for built-in and TinyNAS).
    #[arg(long)]
    pub num_classes: Option<u32>,
    /// Writes to this file (atomically) instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What `deepmad export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Pytorch,
    Tinynas,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// deepmad architecture JSON files (bench/designs/ has the reference networks) or built-in
    /// networks (1000 classes, 224x224).
    pub designs: Vec<String>,
    /// cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub batch: Vec<usize>,
    /// Timed training steps per measurement.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (allocations, cuDNN plans, caches).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// deepmad (the default), stock (candle's own ops) or both.
    #[arg(long, default_value = "deepmad")]
    pub kernels: String,
    /// Threads of candle's CPU kernels (sets CANDLE_NUM_THREADS).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Wait for the device after every step (reading the loss), as a training loop that logs
    /// every loss does; by default the timed loop waits once at its end, as
    /// bench/torch_bench.py does (its --sync-each-step is this flag's twin).
    #[arg(long)]
    pub sync_each_step: bool,
    /// Instead of timing: compares deepmad's convolutions on the device with candle's on the
    /// CPU, forward and gradients, on the shapes the block families use; exits 1 on a mismatch.
    #[arg(long)]
    pub check: bool,
    /// One JSON object per measurement (what bench/compare.py reads).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SweepCommand {
    /// Creates a sweep from a TOML file (see examples/sweep.toml).
    Create(SweepCreateArgs),
    /// Lists sweeps, newest first.
    List(SweepListArgs),
    /// Shows one sweep.
    Show(SweepIdArgs),
    /// Cancels a sweep: its running trials stop at their next heartbeat.
    Cancel(SweepIdArgs),
    /// Shows live progress until the sweep finishes.
    Watch(SweepIdArgs),
    /// Requeues a sweep's failed and dead trials (the same as `deepmad trials retry`).
    Retry(SweepIdArgs),
}

#[derive(Debug, Subcommand)]
pub enum TrialsCommand {
    /// Requeues a sweep's failed and dead trials.
    Retry(TrialsRetryArgs),
}

#[derive(Debug, clap::Args)]
pub struct TrialsRetryArgs {
    /// The sweep whose failed and dead trials to requeue.
    #[arg(long)]
    pub sweep: String,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
pub struct SweepCreateArgs {
    pub file: PathBuf,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
pub struct SweepListArgs {
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
pub struct SweepIdArgs {
    /// The sweep's id.
    pub sweep: String,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TableFormat {
    Table,
    Json,
    Csv,
}

#[derive(Debug, clap::Args)]
pub struct LeaderboardArgs {
    /// Only this sweep (default: all sweeps).
    #[arg(long)]
    pub sweep: Option<String>,
    /// Only this dataset (`KIND:PATH` as the sweep named it).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Only this block family.
    #[arg(long)]
    pub block: Option<String>,
    #[arg(long)]
    pub min_params: Option<String>,
    #[arg(long)]
    pub max_params: Option<String>,
    /// Only designs of at most this many FLOPs (multiply-accumulates, e.g. `1.8G`): with
    /// `--max-params` and `--dataset`, the best design for a budget across all sweeps.
    #[arg(long)]
    pub max_flops: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[arg(long, value_enum, default_value = "table")]
    pub format: TableFormat,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
pub struct ResultsArgs {
    /// The sweep whose results to export.
    #[arg(long)]
    pub sweep: String,
    /// Keeps rows where KEY OP VALUE holds (repeatable, all must hold), e.g. `top1>=0.9`,
    /// `block=basic`, `params<2M`, `rho!=0.5`. Keys: the columns of the CSV.
    #[arg(long)]
    pub filter: Vec<String>,
    /// Exports every kept trial's per-epoch curve (epoch, losses, top-1/5, images/s, learning
    /// rate) instead of its final result.
    #[arg(long, conflicts_with = "downstream")]
    pub curves: bool,
    /// Exports the sweep's downstream evaluations (one row per trial and task, with its
    /// state and, once finished, its metrics) instead of the training results.
    #[arg(long, conflicts_with = "filter")]
    pub downstream: bool,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: TableFormat,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
pub struct TrialShowArgs {
    /// The trial's id.
    pub trial: String,
    /// table (attempts and epochs), json (the whole history) or csv (the per-epoch curve).
    #[arg(long, value_enum, default_value = "table")]
    pub format: TableFormat,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObjectiveArg {
    Paper,
    Tinynas,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Table,
    Json,
    Tinynas,
}

/// Scoring options shared by `analyze` and `design`.
#[derive(Debug, clap::Args)]
pub struct ScoringArgs {
    /// Scoring convention: the paper's Sec. 4, or the paper's official code (TinyNAS).
    #[arg(long, value_enum, default_value = "paper")]
    pub objective: ObjectiveArg,
    /// Weights of the down-sampling scales, comma-separated (default 1,...,1,8).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub alpha: Option<Vec<String>>,
    /// Weight of the depth-uniformity penalty.
    #[arg(long, default_value = "10", allow_hyphen_values = true)]
    pub beta: String,
}

#[derive(Debug, clap::Args)]
pub struct AnalyzeArgs {
    /// A built-in network (resnet18, resnet34, resnet50, mobilenet_v2, efficientnet_b0) or a
    /// file: deepmad architecture JSON, or a TinyNAS structure (Python literal or JSON).
    pub network: String,
    /// Input resolution (built-in networks and TinyNAS FLOPs; default 224).
    #[arg(long)]
    pub resolution: Option<u32>,
    /// Classes of the classifier (built-in networks and TinyNAS imports; default 1000).
    #[arg(long)]
    pub num_classes: Option<u32>,
    #[command(flatten)]
    pub scoring: ScoringArgs,
    /// Prints JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DesignArgs {
    /// Block family: basic, bottleneck, mbconv or mbconv-se.
    #[arg(long)]
    pub block: String,
    /// Parameter budget, e.g. 11.7M.
    #[arg(long)]
    pub params: Option<String>,
    /// FLOPs (multiply-accumulate) budget, e.g. 1.8G.
    #[arg(long)]
    pub flops: Option<String>,
    /// Effectiveness bound rho0.
    #[arg(long, allow_hyphen_values = true)]
    pub rho: String,
    #[command(flatten)]
    pub scoring: ScoringArgs,
    /// Input resolution.
    #[arg(long, default_value_t = 224)]
    pub resolution: u32,
    /// Classes of the classifier.
    #[arg(long, default_value_t = 1000)]
    pub num_classes: u32,
    /// Largest number of main-path layers.
    #[arg(long)]
    pub max_layers: Option<u32>,
    /// Strides of the stages, comma-separated (default: the family's search space).
    #[arg(long, value_delimiter = ',')]
    pub strides: Option<Vec<u32>>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: FormatArg,
    /// Also writes the design's canonical JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}
