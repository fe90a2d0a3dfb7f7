//! The `deepmad` binary: parses the command line, sets up logging and signal handling, and
//! hands the command to [`deepmad::run`].

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    keep_freed_memory();
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

/// Training frees and reallocates the same activation-sized buffers (megabytes) every step.
/// glibc serves large blocks with fresh `mmap`s and unmaps them on free, so each step faulted in
/// zeroed pages again. On the 2-core development machine ResNet-20 training ran at 105-110
/// images/s at batch 128 with glibc's defaults, and at 156-168 with the heap keeping them; at
/// batch 512, whose buffers exceed glibc's largest mmap threshold (32 MiB), it ran at 99 images/s
/// until mmap was turned off for allocations altogether, and then at 175. Here: no
/// allocation is served by its own mmap (the heap grows instead, and freed blocks are reused),
/// and the heap's top is never trimmed. Memory is kept at its peak, as GPU frameworks' caching
/// allocators do.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // mallopt is a plain libc call with integer arguments, before any thread.
fn keep_freed_memory() {
    // Safety: called first thing in main, before other threads exist; mallopt only sets
    // allocator parameters (a rejected value leaves the default, which is only slower).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

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
