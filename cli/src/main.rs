//! The `deepmad` binary: parses the command line, sets up logging and signal handling, and
//! hands the command to [`deepmad::run`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    deepmad_kernels::heap::keep_freed_memory();
    let args = deepmad::args::Args::parse();
    // `run` draws progress bars: the services' routine logs would tear them.
    let default_filter = match args.command {
        deepmad::args::Command::Run(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let shutdown = CancellationToken::new();
    runtime.spawn(cancel_on_signal(shutdown.clone()));
    let mut stdout = std::io::stdout().lock();
    match runtime.block_on(deepmad::run(args, &mut stdout, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; a second signal exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => return,
        };
    for _ in 0..2 {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        if shutdown.is_cancelled() {
            std::process::exit(130);
        }
        shutdown.cancel();
    }
}
