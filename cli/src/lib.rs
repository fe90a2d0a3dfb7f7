//! deepmad's command-line front end: [`run`] executes one parsed [`args::Args`].
//!
//! Commands live in `commands/`, human-facing tables in `render.rs`. Every failure carries its
//! exit code: 2 for bad input (the message names what is wrong), 1 for anything else.
#![forbid(unsafe_code)]

pub mod args;
mod commands;
mod filter;
mod render;

use std::io::Write;

use deepmad_design::DesignError;
use tokio_util::sync::CancellationToken;

/// Why a command failed, and the exit code to leave with.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Returns a bad-input failure (exit code 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<DesignError> for Failure {
    fn from(error: DesignError) -> Failure {
        // Every design error is a statement about the user's input or budgets.
        Failure::usage(error.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Failure {
        Failure {
            code: 1,
            message: format!("cannot write output: {error}"),
        }
    }
}

/// Runs one command, writing its output to `out`. Long-running commands stop when `shutdown`
/// is cancelled (the binary cancels it on SIGINT and SIGTERM).
pub async fn run(
    args: args::Args,
    out: &mut impl Write,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    use args::Command;
    match args.command {
        Command::Analyze(analyze) => commands::analyze::run(&analyze, out),
        Command::Design(design) => commands::design::run(&design, out),
        Command::Run(run) => commands::run::run(&run, out, shutdown).await,
        Command::Coordinator(coordinator) => {
            commands::coordinator::run(&coordinator, out, shutdown).await
        }
        Command::Worker(worker) => commands::worker::run(&worker, out, shutdown).await,
        Command::Train(train) => commands::train::run(&train, out, shutdown).await,
        Command::Bench(bench) => commands::bench::run(&bench, out),
        Command::Export(export) => commands::export::run(&export, out),
        Command::Sweep { command } => commands::sweep::run(&command, out).await,
        Command::Leaderboard(leaderboard) => {
            commands::results::leaderboard(&leaderboard, out).await
        }
        Command::Results(results) => commands::results::results(&results, out).await,
        Command::Trial(trial) => commands::results::trial(&trial, out).await,
        Command::Analytics(analytics) => commands::results::analytics(&analytics, out).await,
        Command::Plot(plot) => commands::plot::run(&plot).await,
        Command::Trials {
            command: args::TrialsCommand::Retry(retry),
        } => commands::sweep::retry(&retry.sweep, &retry.remote, out).await,
    }
}
