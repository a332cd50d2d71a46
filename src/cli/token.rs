//! `keystile token exchange` (try the two-step flow against a server) and
//! `keystile signing-keys rotate|list` (the deployment's token signing keys,
//! straight in Redis, like `keys bootstrap`). README, "Token exchange".

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{self, Format};
use super::{CliError, ServerArgs, exit};
use keystile::proto;
use keystile::proto::token_exchange_client::TokenExchangeClient;

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Exchange an API key (KEYSTILE_KEY, or `-` for stdin) for a token.
    Exchange(ExchangeArgs),
}

#[derive(Debug, Args)]
pub struct ExchangeArgs {
    /// The API key; `-` reads it from stdin; without it KEYSTILE_KEY is used.
    #[arg(env = "KEYSTILE_KEY", hide_env_values = true)]
    pub key: keystile::secret::Secret,
    /// The key owner's email, when the key has one.
    #[arg(long)]
    pub email: Option<String>,
    /// Scopes for the token (a subset of the key's); repeat or separate
    /// with commas. None: all of the key's.
    #[arg(long = "scope", value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// A shorter lifetime than the server's default, e.g. 5m.
    #[arg(long)]
    pub ttl: Option<String>,
    /// Print only the token.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub server: ServerArgs,
    /// How to print.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Format,
}

pub async fn run(args: TokenArgs) -> Result<(), CliError> {
    let TokenCommand::Exchange(a) = args.command;
    let secret = super::key_argument(&a.key)?;
    let ttl_seconds = match &a.ttl {
        Some(t) => {
            let d = humantime::parse_duration(t).map_err(|e| CliError::usage(format!("--ttl {t:?}: {e}")))?;
            u32::try_from(d.as_secs()).map_err(|_| CliError::usage("--ttl is too long"))?
        }
        None => 0,
    };
    let channel = a.server.connect(true).await?;
    let resp = TokenExchangeClient::new(channel)
        .exchange(proto::ExchangeRequest {
            secret,
            email: a.email.unwrap_or_default(),
            scopes: a.scopes.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            ttl_seconds,
        })
        .await?
        .into_inner();
    if a.quiet {
        println!("{}", resp.token);
    } else if a.output != Format::Table {
        output::document(
            a.output,
            &json!({"token": resp.token, "expires_in": resp.expires_in, "token_type": resp.token_type}),
        );
    } else {
        eprintln!("A bearer token for {} s: keep it secret.", resp.expires_in);
        println!("{}", resp.token);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct SigningKeysArgs {
    /// The deployment's Redis: the same settings as `serve`.
    #[command(flatten)]
    pub redis: keystile::config::RedisArgs,
    /// File holding the deployment's pepper (it seals the private keys).
    #[arg(long, env = "KEYSTILE_PEPPER_FILE")]
    pub pepper_file: Option<PathBuf>,
    /// The deployment's pepper itself (prefer --pepper-file).
    #[arg(long = "pepper", env = "KEYSTILE_PEPPER", hide_env_values = true)]
    pub pepper: Option<keystile::secret::Secret>,
    /// rotate or list.
    #[arg(value_enum)]
    pub command: SigningKeysCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SigningKeysCommand {
    /// Add a new signing key. Every sidecar publishes it within seconds and
    /// signs with it a minute later; tokens of the older keys keep
    /// verifying. The oldest beyond three is dropped.
    Rotate,
    /// The signing keys, newest first.
    List,
}

pub async fn signing_keys(args: SigningKeysArgs) -> Result<(), CliError> {
    use keystile::key::PepperSet;
    use keystile::token::signing::SigningPair;
    use keystile::token::{KEEP_SIGNING_KEYS, PUBLISH_BEFORE_SIGNING};

    let pepper = super::deployment_pepper(args.pepper_file.as_deref(), args.pepper.as_ref())?;
    let (store, where_) = super::deployment_store(&args.redis, "signing keys live in")?;
    let unavailable =
        |e: &dyn std::fmt::Display| CliError { message: format!("Redis at {where_}: {e}"), code: exit::UNAVAILABLE };
    let peppers = PepperSet::single(pepper.clone());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if let SigningKeysCommand::Rotate = args.command {
        let existing = store.signing_keys().await.map_err(|e| unavailable(&e))?;
        if let Some(k) = existing.iter().find(|k| SigningPair::unseal(k, &peppers).is_err()) {
            return Err(CliError::usage(format!(
                "signing key {} is sealed under pepper {}, not the one given ({}): give the deployment's pepper",
                k.kid,
                k.pepper_id,
                pepper.id()
            )));
        }
        let fresh = SigningPair::generate(now);
        store.add_signing_key(&fresh.seal(&pepper), KEEP_SIGNING_KEYS).await.map_err(|e| unavailable(&e))?;
        eprintln!(
            "signing key {} added: published now, signing from {} s on",
            fresh.kid,
            PUBLISH_BEFORE_SIGNING.as_secs()
        );
    }
    let keys = store.signing_keys().await.map_err(|e| unavailable(&e))?;
    for k in keys.iter().rev() {
        let opens = if SigningPair::unseal(k, &peppers).is_ok() { "" } else { "  (sealed under another pepper)" };
        println!("{}  created {}{opens}", k.kid, super::output::when(k.created_at));
    }
    if keys.is_empty() {
        println!("no signing keys yet: the first exchange makes one (or run `keystile signing-keys rotate`)");
    }
    Ok(())
}
