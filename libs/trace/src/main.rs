//! `mesh-trace`: print one trace from the local sink's file as a tree, or
//! run the sink (`mesh-trace sink`), the OTLP/gRPC endpoint the local stack
//! exports to. See the crate docs of `mesh_trace`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mesh_trace::{sink, tree};

/// Print one trace of the local stack as a tree with durations.
///
/// Examples: `mesh-trace --last`, `mesh-trace 4bf92f3577b34da6a3ce929d0e0e4736`,
/// `mesh-trace 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`, `mesh-trace --list`.
#[derive(Debug, Parser)]
#[command(name = "mesh-trace", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// The trace id: 32 hex digits, as logs show it in `trace_id`, or a whole
    /// `traceresponse` / `traceparent` value (`00-<trace id>-<span id>-01`,
    /// as every mesh answer carries it; `grpcurl -v` prints it).
    #[arg(required_unless_present_any = ["last", "list"], conflicts_with_all = ["last", "list"])]
    trace_id: Option<String>,
    /// The trace that started last.
    #[arg(long, conflicts_with = "list")]
    last: bool,
    /// List the traces in the file (oldest first): id, spans, duration, root.
    #[arg(long)]
    list: bool,
    /// How long to wait for a trace id that is not in the file yet, in
    /// seconds: services export spans in batches (every
    /// `OTEL_BSP_SCHEDULE_DELAY` ms: 5000 by default, 500 under up.sh), so a
    /// call answered a moment ago may not have reached the sink.
    #[arg(long, default_value_t = 6.0, value_name = "SECONDS")]
    wait: f64,
    /// The sink's span file (deploy/local/up.sh sets MESH_TRACE_FILE in .local/env).
    #[arg(long, env = "MESH_TRACE_FILE")]
    file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the OTLP/gRPC trace sink: every span received is appended to FILE
    /// as one JSON line. Prints `listening on ADDR` once bound.
    Sink {
        /// Where to listen (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:4317")]
        listen: SocketAddr,
        /// The span file.
        #[arg(long, env = "MESH_TRACE_FILE")]
        file: PathBuf,
        /// Past this size (bytes) the file is renamed to FILE.1 and a new one started.
        #[arg(long, default_value_t = sink::DEFAULT_MAX_BYTES)]
        max_bytes: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Sink { listen, file, max_bytes }) => run_sink(listen, file, max_bytes).await,
        None => show(&cli),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh-trace: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run_sink(listen: SocketAddr, file: PathBuf, max_bytes: u64) -> anyhow::Result<ExitCode> {
    let listener = sink::bind(listen).await?;
    println!("listening on {} writing {}", listener.local_addr()?, file.display());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    sink::serve(listener, &file, max_bytes, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

fn show(cli: &Cli) -> anyhow::Result<ExitCode> {
    let Some(file) = &cli.file else {
        anyhow::bail!(
            "no span file: pass --file or set MESH_TRACE_FILE (source the env file deploy/local/up.sh names)"
        );
    };
    let mut spans = tree::load(file)?;
    if cli.list {
        for t in tree::traces(&spans) {
            println!(
                "{}  {:>4} spans  {:>10.3} ms  {}",
                t.trace_id,
                t.spans,
                t.duration_nanos as f64 / 1e6,
                t.root
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let id = match (&cli.trace_id, cli.last) {
        (Some(id), _) => tree::trace_id_of(id),
        (None, _) => match tree::last(&spans) {
            Some(id) => id,
            None => anyhow::bail!("{} holds no spans yet", file.display()),
        },
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs_f64(cli.wait.max(0.0));
    let mut found = tree::render(&spans, &id);
    while found.is_none() && cli.trace_id.is_some() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(200));
        spans = tree::load(file)?;
        found = tree::render(&spans, &id);
    }
    match found {
        Some(text) => {
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!(
                "mesh-trace: no span of trace {id} in {} after waiting {} s (try --list)",
                file.display(),
                cli.wait
            );
            Ok(ExitCode::from(1))
        }
    }
}
