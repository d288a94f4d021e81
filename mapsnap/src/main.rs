//! The `mapsnap` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mapsnap: error: {e:#}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
