//! `stockade`: the Stockade admin CLI.

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

/// Stockade: a replicated network block store.
#[derive(Debug, Parser)]
#[command(name = "stockade", version, about)]
struct Cli {
    #[command(flatten)]
    opts: tools::cli::AdminOpts,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a whole cluster on this machine (sleds and head nodes on loopback).
    Up(tools::up::UpArgs),
    /// Watch metric series and report pairs that move together (correlated events).
    Events(Box<tools::events::EventsArgs>),
    #[command(flatten)]
    Admin(tools::cli::AdminCommand),
    /// Print a shell completion script: `stockade completions bash > /etc/bash_completion.d/stockade`.
    Completions(tools::cli::CompletionsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Up(a) => {
            if let Err(e) = a.check() {
                Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, e)
                    .exit();
            }
            tools::up::run(a, &cli.opts.data_dir)
        }
        Cmd::Events(a) => tools::events::run(*a),
        Cmd::Admin(c) => return ExitCode::from(tools::cli::main(&cli.opts, c)),
        Cmd::Completions(a) => tools::cli::completions(a.shell, &mut Cli::command())
            .write(&mut std::io::stdout().lock())
            .map_err(anyhow::Error::from),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
