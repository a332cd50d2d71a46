//! The `keystile` binary: parses the command line and wires the pieces.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keystile::admin::{ADMIN_SCOPE, Admin, KeySpec};
use keystile::client::{self, KeysArgs};
use keystile::clock::Clock;
use keystile::config::{EX_USAGE, ServeArgs, ServeConfig, StoreChoice};
use keystile::key::Env;
use keystile::server;
use keystile::store::KeyStore;
use keystile::store::memory::MemoryStore;
use keystile::store::redis::RedisStore;
use keystile::verify::Engine;

#[derive(Parser)]
#[command(name = "keystile", version, about = "API-key verification sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Serve(Box<ServeArgs>),
    /// Manage keys through KeyAdmin.
    Keys(Box<KeysArgs>),
    /// Load a server and report throughput, latency percentiles and errors.
    Bench(Box<keystile::loadgen::BenchArgs>),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a `serve` configuration without serving.
    Check(Box<ServeArgs>),
}

fn main() -> ExitCode {
    if let Some(path) = config_file_arg()
        && let Err(errors) = keystile::config::apply_file(&path)
    {
        return config_errors(&errors);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match args.validate() {
            Ok(config) => serve(config),
            Err(errors) => config_errors(&errors),
        },
        Command::Config { command: ConfigCommand::Check(args) } => match args.validate() {
            Ok(config) => {
                println!("configuration ok: {}", config.summary());
                ExitCode::SUCCESS
            }
            Err(errors) => config_errors(&errors),
        },
        Command::Bench(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
            match runtime.block_on(keystile::loadgen::run(*args)) {
                Ok(reports) if reports.iter().all(|r| r.errors == 0) => ExitCode::SUCCESS,
                Ok(_) => {
                    eprintln!("error: some requests failed");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EX_USAGE as u8)
                }
            }
        }
        Command::Keys(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
            match runtime.block_on(client::run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}", e.message);
                    ExitCode::from(e.code as u8)
                }
            }
        }
    }
}

/// `--config FILE` of `serve` or `config check`, or `KEYSTILE_CONFIG`.
fn config_file_arg() -> Option<std::path::PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    if !matches!(args.get(1).map(String::as_str), Some("serve" | "config")) {
        return None;
    }
    for (i, a) in args.iter().enumerate() {
        if a == "--config" {
            return args.get(i + 1).map(Into::into);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.into());
        }
    }
    std::env::var_os("KEYSTILE_CONFIG").map(Into::into)
}

fn config_errors(errors: &[String]) -> ExitCode {
    eprintln!(
        "keystile: invalid configuration ({} problem{}):",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for e in errors {
        eprintln!("  - {e}");
    }
    ExitCode::from(EX_USAGE as u8)
}

fn serve(config: ServeConfig) -> ExitCode {
    let workers = config.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(config, workers)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "keystile stopped");
            eprintln!("keystile: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ServeConfig, workers: usize) -> Result<(), Box<dyn std::error::Error>> {
    let telemetry = keystile::telemetry::init(config.log_format)?;
    tracing::info!(workers, config = %config.summary(), "starting keystile {}", env!("CARGO_PKG_VERSION"));
    if let Some(addr) = config.metrics_listen {
        keystile::metrics::install(addr)?;
        tracing::info!(%addr, "serving metrics");
    }
    let store: Arc<dyn KeyStore> = match &config.store {
        StoreChoice::Memory => Arc::new(MemoryStore::new()),
        StoreChoice::Redis { url, namespace } => Arc::new(RedisStore::open(url, namespace, Duration::from_secs(1))?),
    };
    let engine = Arc::new(Engine::new(config.engine.clone(), store, Clock::system()));
    if config.dev {
        if config.pepper_generated {
            tracing::warn!("dev mode: the pepper is random, keys stop verifying when this process ends");
        }
        let env = if config.engine.format.accepts_env(Env::Live) { Env::Live } else { Env::Test };
        let minted = Admin::new(engine.clone())
            .create(KeySpec {
                name: "dev admin".into(),
                env: env.to_string(),
                scopes: vec![ADMIN_SCOPE.into()],
                ..Default::default()
            })
            .await
            .map_err(|e| format!("could not mint the dev admin key: {e}"))?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "KEYSTILE_ADMIN_KEY={}", minted.key.expose())?;
        out.flush()?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    server::serve(engine, config.server.clone(), listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
