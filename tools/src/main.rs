//! `stockade`: the Stockade admin CLI.

use clap::{Parser, Subcommand};

/// Stockade: a replicated network block store.
#[derive(Debug, Parser)]
#[command(name = "stockade", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a whole cluster on this machine (sleds and head nodes on loopback).
    Up(tools::up::UpArgs),
    /// Watch metric series and report pairs that move together (correlated events).
    Events(Box<tools::events::EventsArgs>),
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Up(a) => tools::up::run(a),
        Cmd::Events(a) => tools::events::run(*a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
