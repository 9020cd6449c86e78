//! `bench-report`: puts the results `bench/sled.sh` wrote (fio and sled-load JSON files in one
//! directory) side by side, with the ratio sled/fio for each workload.

use anyhow::Context;
use bench::report::{Row, collect, render_markdown, render_text, standard_comparisons};
use clap::Parser;
use std::path::PathBuf;

/// Compares sled-load results with fio's, read from the files `bench/sled.sh` writes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory holding `fio-*.json` and `sled-*.json`.
    #[arg(long)]
    dir: PathBuf,
    /// Queue depths to show.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32])]
    qd: Vec<usize>,
    /// Print a Markdown table (for bench/README.md) instead of aligned text.
    #[arg(long, conflicts_with = "json")]
    markdown: bool,
    /// Print the rows as JSON.
    #[arg(long)]
    json: bool,
    /// The queue depth the target applies to.
    #[arg(long, default_value_t = 32)]
    target_qd: usize,
    /// The target ratio sled/fio IOPS at --target-qd (reported, never enforced).
    #[arg(long, default_value_t = 0.7)]
    target: f64,
}

fn summary(rows: &[Row], qd: usize, target: f64) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| r.qd == qd) {
        if let Some(x) = r.ratio {
            let verdict = if x >= target { "meets" } else { "below" };
            let best = match (r.pairs, r.best_ratio) {
                (2.., Some(b)) => format!(", best/best {b:.2}×"),
                _ => String::new(),
            };
            out.push_str(&format!(
                "{} {} QD{} vs {}: {x:.2}×{best} ({verdict} the {target}× target)\n",
                r.durability, r.pattern, r.qd, r.baseline
            ));
        }
    }
    out
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-report: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if !args.dir.is_dir() {
        anyhow::bail!("{} is not a directory", args.dir.display());
    }
    let rows = collect(&args.dir, &standard_comparisons(&args.qd))
        .with_context(|| format!("reading results in {}", args.dir.display()))?;
    if args.json {
        bench::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&rows)?))?;
        return Ok(());
    }
    let mut out = if args.markdown {
        render_markdown(&rows)
    } else {
        render_text(&rows)
    };
    let s = summary(&rows, args.target_qd, args.target);
    if !s.is_empty() {
        out.push('\n');
        out.push_str(&s);
    }
    bench::print_stdout(&out)?;
    Ok(())
}
