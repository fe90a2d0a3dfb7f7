//! The `deepmad` binary: parses the command line and hands it to [`deepmad::run`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = deepmad::args::Args::parse();
    let mut stdout = std::io::stdout().lock();
    match deepmad::run(args, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}
