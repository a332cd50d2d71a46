//! The `keystile` binary: parses the command line and wires the pieces.
//! Configuration is validated before any port is bound (README,
//! "Configuration"); the engine is wired by [`keystile::app::App`].

mod cli;

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use keystile::app::App;
use keystile::clock::Clock;
use keystile::config::{EX_USAGE, ServeArgs, ServeConfig};
use keystile::server::{self, RuntimeKind};

/// mimalloc rather than the system allocator: every call's tasks and
/// futures are allocated and freed, many of them above the size glibc
/// serves from its per-thread cache (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// No transparent huge pages for this process, whatever the kernel's
/// default: mimalloc's arenas in huge pages hold about twice the idle RSS
/// SPEC allows (BENCHMARKS.md, "Allocator"). mimalloc is built not to ask
/// for them; this also refuses those a kernel set to `always` would give.
#[cfg(target_os = "linux")]
fn no_huge_pages() {
    // SAFETY: prctl with integer arguments; it changes a flag of the
    // process and no memory of ours. A kernel without it returns an error,
    // which changes nothing.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(not(target_os = "linux"))]
fn no_huge_pages() {}

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
    Keys(Box<cli::keys::KeysArgs>),
    /// Manage tenants' named limits through KeyAdmin.
    Tenants(Box<cli::tenants::TenantsArgs>),
    /// Admin mutations, newest first (who, what, when).
    Audit(Box<cli::audit::AuditArgs>),
    /// Exchange an API key for a short-lived token.
    Token(Box<cli::token::TokenArgs>),
    /// Rotate or list the token signing keys (straight in Redis).
    SigningKeys(Box<cli::token::SigningKeysArgs>),
    /// Ask a server whether a key may do something; prints the verdict and
    /// its headers (exit 0 whatever the verdict).
    Verify(Box<cli::verify::VerifyArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Load a server and report throughput, latency percentiles and errors.
    Bench(Box<cli::bench::BenchArgs>),
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
    no_huge_pages();
    let (cli, file_errors) = match parse() {
        Ok(parsed) => parsed,
        Err(exit) => return exit,
    };
    // The file's problems and the flags' are reported together.
    let validate = |args: &ServeArgs| match (args.validate(), file_errors.is_empty()) {
        (Ok(config), true) => Ok(config),
        (Ok(_), false) => Err(file_errors.clone()),
        (Err(errors), _) => Err(file_errors.iter().cloned().chain(errors).collect::<Vec<_>>()),
    };
    match cli.command {
        Command::Serve(ref args) => match validate(args) {
            Ok(config) => serve(config),
            Err(errors) => config_errors(&errors),
        },
        Command::Config { command: ConfigCommand::Check(ref args) } => match validate(args) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("warning: {warning}");
                }
                println!("configuration ok: {}", config.summary());
                ExitCode::SUCCESS
            }
            Err(errors) => config_errors(&errors),
        },
        Command::Bench(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
            match runtime.block_on(cli::bench::run(*args)) {
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
        Command::Keys(args) => client(cli::keys::run(*args)),
        Command::Tenants(args) => client(cli::tenants::run(*args)),
        Command::Token(args) => client(cli::token::run(*args)),
        Command::Audit(args) => client(cli::audit::run(*args)),
        Command::SigningKeys(args) => client(cli::token::signing_keys(*args)),
        Command::Verify(args) => client(cli::verify::run(*args)),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "keystile", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
    }
}

/// Runs a client command and turns its failure into its exit code.
fn client(command: impl std::future::Future<Output = Result<(), cli::CliError>>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code as u8)
        }
    }
}

/// Parses the command line; for `serve` and `config check` with a settings
/// file, parses it again with the file's settings added beneath the flags
/// and variables (see `keystile::config::file_args`). Help and version
/// exit 0; every other parse error exits 64 (README, "Exit codes").
/// The problems of the settings file come back beside the parsed command,
/// so that they are reported together with those of the flags.
fn parse() -> Result<(Cli, Vec<String>), ExitCode> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let matches = Cli::command().try_get_matches_from(&argv).map_err(clap_exit)?;
    let cli = Cli::from_arg_matches(&matches).map_err(clap_exit)?;
    let (args, sub) = match (&cli.command, matches.subcommand()) {
        (Command::Serve(args), Some((_, sub))) => (args, sub),
        (Command::Config { command: ConfigCommand::Check(args) }, Some((_, m))) => {
            (args, m.subcommand().map(|(_, sub)| sub).expect("config has a subcommand"))
        }
        _ => return Ok((cli, Vec::new())),
    };
    let Some(path) = args.config.clone() else { return Ok((cli, Vec::new())) };
    let extra = match keystile::config::file_args(&path, sub) {
        Ok(extra) => extra,
        Err(errors) => return Ok((cli, errors)),
    };
    if extra.is_empty() {
        return Ok((cli, Vec::new()));
    }
    let argv = argv.into_iter().chain(extra.into_iter().map(OsString::from));
    match Cli::try_parse_from(argv) {
        Ok(with_file) => Ok((with_file, Vec::new())),
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
            Ok((cli, vec![format!("config file {}: {first}", path.display())]))
        }
    }
}

/// Prints clap's message; help and version are not errors.
fn clap_exit(e: clap::Error) -> ExitCode {
    let _ = e.print();
    match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(EX_USAGE as u8),
    }
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

fn serve(mut config: ServeConfig) -> ExitCode {
    let workers = config.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = match config.runtime {
        RuntimeKind::PerCore => {
            // This thread is the first core; server::serve starts the others.
            config.server.cores = workers;
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        RuntimeKind::WorkStealing => {
            tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
        }
    }
    .expect("a tokio runtime");
    match runtime.block_on(run(config, workers)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, on stderr, whatever the log format, with its causes.
            eprintln!("keystile: {}", cli::chain(&*e));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ServeConfig, workers: usize) -> Result<(), Box<dyn std::error::Error>> {
    let telemetry = keystile::telemetry::init(config.log_format)?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    tracing::info!(workers, runtime = ?config.runtime, config = %config.summary(), "starting keystile {}", env!("CARGO_PKG_VERSION"));
    if let Some(addr) = config.metrics_listen {
        keystile::metrics::install(addr)?;
        tracing::info!(%addr, "serving metrics");
    }
    let store = config.store.open()?;
    let app = Arc::new(App::build(config.engine.clone(), store, Clock::system()));
    // Bound first: a port that is taken fails before any key is minted.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, tls = config.server.tls.is_some(), "listening");
    let http = match config.http_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            tracing::info!(addr = %l.local_addr()?, "HTTP listener (token exchange, JWKS)");
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the HTTP listener speaks plaintext: keep it on the pod network or behind a TLS-terminating proxy");
            }
            Some(l)
        }
        None => None,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    });
    let http_task = http.map(|l| {
        let (app, stop, timeout) = (app.clone(), stop.clone(), config.server.request_timeout);
        tokio::spawn(async move {
            if let Err(e) = keystile::http::serve(app, l, timeout, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "the HTTP listener failed");
            }
        })
    });
    if config.dev {
        if config.pepper_generated {
            tracing::warn!("dev mode: the pepper is random, keys stop verifying when this process ends");
        }
        let minted =
            app.mint_admin_key("dev admin").await.map_err(|e| format!("could not mint the dev admin key: {e}"))?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "KEYSTILE_ADMIN_KEY={}", minted.key.expose())?;
        out.flush()?;
    }
    server::serve(app, config.server.clone(), listener, stop.cancelled_owned())
        .await
        .map_err(|e| e as Box<dyn std::error::Error>)?;
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(config.server.shutdown_grace, t).await;
    }
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
