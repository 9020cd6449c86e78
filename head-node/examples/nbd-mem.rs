//! Serves one in-memory, thin-provisioned volume over NBD.
//!
//! ```text
//! cargo run -p head-node --example nbd-mem -- --size 5G --name vol [--listen 127.0.0.1:0]
//!     [--metrics 127.0.0.1:0]
//! ```
//!
//! Prints `NBD_PORT=<port>` (and `METRICS_PORT=<port>` with `--metrics`) on stdout once
//! listening, then serves until SIGINT or SIGTERM. Used by the real-client tests and to run
//! `../shared/acceptance/nbd-clients.sh` by hand.

use std::io::Write as _;
use std::sync::Arc;

use anyhow::{Context, bail};
use head_node::nbd::{MemExports, MemVolume, NbdServer, ServerConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

struct Args {
    listen: String,
    size: u64,
    name: String,
    metrics: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        listen: "127.0.0.1:0".into(),
        size: 1 << 30,
        name: "vol".into(),
        metrics: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen = value()?,
            "--size" => args.size = value()?.parse::<common::ByteSize>()?.bytes(),
            "--name" => args.name = value()?,
            "--metrics" => args.metrics = Some(value()?),
            "-h" | "--help" => {
                println!(
                    "usage: nbd-mem [--listen ADDR] [--size SIZE] [--name NAME] [--metrics ADDR]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::logging::init("nbd-mem");
    let args = parse_args()?;
    let registry = common::metrics::new_registry();
    let exports = Arc::new(MemExports::new());
    exports.add(Arc::new(
        MemVolume::new(args.name.clone(), args.size)
            .with_description(format!("in-memory volume {}", args.name)),
    ));
    let server = NbdServer::new(exports, ServerConfig::default(), &registry)?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let port = listener.local_addr()?.port();
    let mut out = std::io::stdout().lock();
    writeln!(out, "NBD_PORT={port}")?;
    if let Some(addr) = &args.metrics {
        let ml = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        writeln!(out, "METRICS_PORT={}", ml.local_addr()?.port())?;
        let router = common::metrics::router(registry.clone());
        tokio::spawn(common::metrics::serve(ml, router, std::future::pending()));
    }
    out.flush()?;
    drop(out);
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    server.serve(listener, shutdown).await?;
    Ok(())
}
