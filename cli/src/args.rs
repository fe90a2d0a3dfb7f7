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
