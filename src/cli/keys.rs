//! `keystile keys …`: the operator's CLI, a KeyAdmin client. A table for
//! people, `--json` for scripts. The full key is printed only by `create`
//! and `rotate`, and only once.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use keystile::limit::RateLimitPolicy;
use keystile::proto;
use keystile::proto::key_admin_client::KeyAdminClient;

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// KeyAdmin endpoint.
    #[arg(long, env = "KEYSTILE_SERVER", default_value = "http://127.0.0.1:50051", global = true)]
    pub server: String,
    /// A key with the keystile:admin scope.
    #[arg(long, env = "KEYSTILE_ADMIN_KEY", hide_env_values = true, global = true)]
    pub admin_key: Option<keystile::secret::Secret>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key. The full key is printed once and never again.
    Create(CreateArgs),
    /// List keys, oldest first.
    List(ListArgs),
    /// Show one key.
    Get { key_id: String },
    /// Change a key's name, scopes, IP allowlist, rate limit, metadata or expiry.
    Update(UpdateArgs),
    /// Revoke a key at once, on every sidecar.
    Revoke { key_id: String },
    /// Mint a new key with the same attributes; the old one keeps working for the grace period.
    Rotate {
        key_id: String,
        /// How long the old key keeps working (e.g. 1h, 30m, 0s).
        #[arg(long, default_value = "1h")]
        grace: String,
    },
    /// Delete a key for good.
    Delete {
        key_id: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Mint the first admin key straight into Redis (no server needed).
    Bootstrap(BootstrapArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub name: String,
    /// live or test.
    #[arg(long, default_value = "live")]
    pub env: String,
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// A granted scope; repeat or separate with commas.
    #[arg(long = "scope", value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// A CIDR or address the key may be used from; repeat or separate with commas.
    #[arg(long = "allow-ip", value_delimiter = ',')]
    pub ip_allowlist: Vec<String>,
    /// requests/window[:burst][@tenant], e.g. 100/60s, 100/1m:20, or
    /// 1000/60s@tenant to share one bucket with the tenant's other keys.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// key=value; repeatable.
    #[arg(long = "meta")]
    pub metadata: Vec<String>,
    /// Expiry as unix seconds or RFC 3339 (2027-01-01T00:00:00Z).
    #[arg(long, conflicts_with = "expires_in")]
    pub expires_at: Option<String>,
    /// Expiry from now, e.g. 90d.
    #[arg(long)]
    pub expires_in: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, default_value = "")]
    pub tenant: String,
    #[arg(long, default_value = "")]
    pub env: String,
    /// Keys per page (at most 1000).
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
    /// Continue after a page (the token printed with the previous page).
    #[arg(long, default_value = "")]
    pub page_token: String,
    /// Fetch every page.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    pub key_id: String,
    #[arg(long)]
    pub name: Option<String>,
    /// Replace the scopes (comma-separated; empty string for none).
    #[arg(long)]
    pub scopes: Option<String>,
    /// Replace the IP allowlist (comma-separated; empty string for none).
    #[arg(long)]
    pub allow_ips: Option<String>,
    /// requests/window[:burst][@tenant]
    #[arg(long, conflicts_with = "clear_rate_limit")]
    pub rate_limit: Option<String>,
    /// Remove the key's own limit (the deployment default applies).
    #[arg(long)]
    pub clear_rate_limit: bool,
    /// Replace the metadata with these key=value pairs.
    #[arg(long = "meta")]
    pub metadata: Vec<String>,
    /// Remove all metadata.
    #[arg(long, conflicts_with = "metadata")]
    pub clear_metadata: bool,
    /// Unix seconds or RFC 3339.
    #[arg(long, conflicts_with = "never_expires")]
    pub expires_at: Option<String>,
    #[arg(long)]
    pub never_expires: bool,
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    #[arg(long, env = "KEYSTILE_REDIS_URL", hide_env_values = true)]
    pub redis_url: keystile::secret::RedisUrl,
    #[arg(long, env = "KEYSTILE_REDIS_NAMESPACE", default_value = "keystile")]
    pub redis_namespace: String,
    #[arg(long, env = "KEYSTILE_PEPPER_FILE")]
    pub pepper_file: Option<PathBuf>,
    #[arg(long = "pepper", env = "KEYSTILE_PEPPER", hide_env_values = true)]
    pub pepper: Option<keystile::secret::Secret>,
    /// Key prefix of the deployment.
    #[arg(long = "key-prefix", env = "KEYSTILE_KEY_PREFIXES", value_delimiter = ',', default_value = "ks")]
    pub key_prefixes: Vec<String>,
    #[arg(long, default_value = "bootstrap admin")]
    pub name: String,
}

/// A CLI failure: a message for stderr and an exit code.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub code: i32,
}

impl CliError {
    fn usage(message: impl Into<String>) -> CliError {
        CliError { message: message.into(), code: keystile::config::EX_USAGE }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError { message: format!("{:?}: {}", s.code(), s.message()), code: 1 }
    }
}

pub async fn run(args: KeysArgs) -> Result<(), CliError> {
    if let KeysCommand::Bootstrap(b) = &args.command {
        return bootstrap(b, args.json).await;
    }
    let Some(admin_key) = args.admin_key.clone() else {
        return Err(CliError::usage("set KEYSTILE_ADMIN_KEY (or --admin-key) to a key with the keystile:admin scope"));
    };
    let bearer = MetadataValue::try_from(format!("Bearer {}", admin_key.expose().trim()))
        .map_err(|_| CliError::usage("the admin key contains characters that cannot be sent"))?;
    let channel = Channel::from_shared(args.server.clone())
        .map_err(|_| CliError::usage(format!("--server {:?} is not a URL like http://127.0.0.1:50051", args.server)))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| CliError { message: format!("cannot reach {}: {e}", args.server), code: 69 })?;
    let mut client = KeyAdminClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    let json = args.json;
    match args.command {
        KeysCommand::Create(c) => {
            let req = create_request(c)?;
            let resp = client.create_key(req).await?.into_inner();
            let record = resp.record.unwrap_or_default();
            if json {
                println!("{}", json!({ "key": resp.key, "record": record_json(&record) }));
            } else {
                eprintln!("Store this key now: it is shown only once.");
                println!("{}", resp.key);
                print_table(&[record]);
            }
        }
        KeysCommand::List(l) => {
            let mut token = l.page_token.clone();
            let mut all = Vec::new();
            loop {
                let resp = client
                    .list_keys(proto::ListKeysRequest {
                        page_size: l.page_size,
                        page_token: token.clone(),
                        tenant: l.tenant.clone(),
                        env: l.env.clone(),
                    })
                    .await?
                    .into_inner();
                all.extend(resp.records);
                token = resp.next_page_token;
                if !l.all || token.is_empty() {
                    break;
                }
            }
            if json {
                println!(
                    "{}",
                    json!({ "records": all.iter().map(record_json).collect::<Vec<_>>(), "next_page_token": token })
                );
            } else {
                print_table(&all);
                if !token.is_empty() {
                    eprintln!("more: --page-token {token}");
                }
            }
        }
        KeysCommand::Get { key_id } => {
            let r = client.get_key(proto::GetKeyRequest { key_id }).await?.into_inner().record.unwrap_or_default();
            show(json, &r);
        }
        KeysCommand::Update(u) => {
            let req = update_request(u)?;
            let r = client.update_key(req).await?.into_inner().record.unwrap_or_default();
            show(json, &r);
        }
        KeysCommand::Revoke { key_id } => {
            let r =
                client.revoke_key(proto::RevokeKeyRequest { key_id }).await?.into_inner().record.unwrap_or_default();
            show(json, &r);
        }
        KeysCommand::Rotate { key_id, grace } => {
            let grace =
                humantime::parse_duration(&grace).map_err(|e| CliError::usage(format!("--grace {grace:?}: {e}")))?;
            let resp = client
                .rotate_key(proto::RotateKeyRequest { key_id, grace_seconds: Some(grace.as_secs()) })
                .await?
                .into_inner();
            let record = resp.record.unwrap_or_default();
            let previous = resp.previous.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    json!({ "key": resp.key, "record": record_json(&record), "previous": record_json(&previous) })
                );
            } else {
                eprintln!(
                    "Store the new key now: it is shown only once. The old key works until {}.",
                    when(previous.revoked_at)
                );
                println!("{}", resp.key);
                print_table(&[record, previous]);
            }
        }
        KeysCommand::Delete { key_id, yes } => {
            if !yes && !confirm(&key_id)? {
                return Err(CliError { message: "not deleted".into(), code: 1 });
            }
            client.delete_key(proto::DeleteKeyRequest { key_id: key_id.clone() }).await?;
            if json {
                println!("{}", json!({ "deleted": key_id }));
            } else {
                eprintln!("deleted {key_id}");
            }
        }
        KeysCommand::Bootstrap(_) => unreachable!("handled above"),
    }
    Ok(())
}

fn confirm(key_id: &str) -> Result<bool, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage("deleting is irreversible: pass --yes to delete without a prompt"));
    }
    eprint!("Delete key {key_id} for good? It cannot be undone. Type the key_id to confirm: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| CliError::usage(e.to_string()))?;
    Ok(line.trim() == key_id)
}

fn parse_time(s: &str) -> Result<i64, CliError> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    humantime::parse_rfc3339_weak(s)
        .map(|t| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0))
        .map_err(|_| CliError::usage(format!("{s:?} is neither unix seconds nor an RFC 3339 time")))
}

fn parse_meta(pairs: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::usage(format!("--meta {p:?} must be key=value")))
        })
        .collect()
}

fn rate(s: &str) -> Result<proto::RateLimit, CliError> {
    let p: RateLimitPolicy = s.parse().map_err(CliError::usage)?;
    Ok(proto::RateLimit {
        requests: p.requests,
        window_seconds: p.window_seconds,
        burst: p.burst,
        per_tenant: p.per_tenant,
    })
}

fn create_request(c: CreateArgs) -> Result<proto::CreateKeyRequest, CliError> {
    let expires_at = match (&c.expires_at, &c.expires_in) {
        (Some(at), _) => parse_time(at)?,
        (None, Some(d)) => {
            let d = humantime::parse_duration(d).map_err(|e| CliError::usage(format!("--expires-in {d:?}: {e}")))?;
            now() + d.as_secs() as i64
        }
        (None, None) => 0,
    };
    Ok(proto::CreateKeyRequest {
        name: c.name,
        env: c.env,
        tenant: c.tenant,
        scopes: c.scopes,
        ip_allowlist: c.ip_allowlist,
        rate_limit: c.rate_limit.as_deref().map(rate).transpose()?,
        metadata: parse_meta(&c.metadata)?.into_iter().collect(),
        expires_at,
    })
}

fn list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

fn update_request(u: UpdateArgs) -> Result<proto::UpdateKeyRequest, CliError> {
    let metadata = if u.clear_metadata {
        Some(proto::MetadataMap::default())
    } else if u.metadata.is_empty() {
        None
    } else {
        Some(proto::MetadataMap { entries: parse_meta(&u.metadata)?.into_iter().collect() })
    };
    Ok(proto::UpdateKeyRequest {
        key_id: u.key_id,
        name: u.name,
        scopes: u.scopes.map(|s| proto::StringList { values: list(&s) }),
        ip_allowlist: u.allow_ips.map(|s| proto::StringList { values: list(&s) }),
        rate_limit: u.rate_limit.as_deref().map(rate).transpose()?,
        clear_rate_limit: u.clear_rate_limit,
        metadata,
        expires_at: if u.never_expires { Some(0) } else { u.expires_at.as_deref().map(parse_time).transpose()? },
    })
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn when(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t as u64)).to_string()
}

fn state_name(s: i32) -> &'static str {
    match proto::KeyState::try_from(s).unwrap_or(proto::KeyState::Unspecified) {
        proto::KeyState::Active => "active",
        proto::KeyState::Rotating => "rotating",
        proto::KeyState::Expired => "expired",
        proto::KeyState::Revoked => "revoked",
        proto::KeyState::Unspecified => "unknown",
    }
}

/// A record as scripts see it: times as unix seconds (0 = never/unset).
pub fn record_json(r: &proto::KeyRecord) -> Value {
    json!({
        "key_id": r.key_id,
        "display_prefix": r.display_prefix,
        "name": r.name,
        "env": r.env,
        "tenant": r.tenant,
        "scopes": r.scopes,
        "ip_allowlist": r.ip_allowlist,
        "rate_limit": r.rate_limit.as_ref().map(|l| json!({"requests": l.requests, "window_seconds": l.window_seconds, "burst": l.burst, "per_tenant": l.per_tenant})),
        "metadata": r.metadata.iter().collect::<BTreeMap<_, _>>(),
        "created_at": r.created_at,
        "expires_at": r.expires_at,
        "revoked_at": r.revoked_at,
        "last_used_at": r.last_used_at,
        "version": r.version,
        "state": state_name(r.state),
    })
}

fn show(json: bool, r: &proto::KeyRecord) {
    if json {
        println!("{}", record_json(r));
    } else {
        print_table(std::slice::from_ref(r));
    }
}

fn print_table(records: &[proto::KeyRecord]) {
    let header = ["NAME", "KEY", "ENV", "TENANT", "SCOPES", "CREATED", "LAST USED", "EXPIRES", "STATE"];
    let rows: Vec<[String; 9]> = records
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.display_prefix.clone(),
                r.env.clone(),
                if r.tenant.is_empty() { "-".into() } else { r.tenant.clone() },
                if r.scopes.is_empty() { "-".into() } else { r.scopes.join(",") },
                when(r.created_at),
                if r.last_used_at == 0 { "never".into() } else { when(r.last_used_at) },
                if r.expires_at == 0 { "never".into() } else { when(r.expires_at) },
                state_name(r.state).into(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let out: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", out.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

async fn bootstrap(b: &BootstrapArgs, json: bool) -> Result<(), CliError> {
    use std::sync::Arc;

    use keystile::app::App;
    use keystile::clock::Clock;
    use keystile::engine::EngineSettings;
    use keystile::key::{Env, KeyFormat, Pepper, PepperSet};
    use keystile::store::redis::RedisStore;

    let pepper = match (&b.pepper_file, &b.pepper) {
        (Some(path), None) => keystile::config::read_pepper(path).map_err(CliError::usage)?,
        (None, Some(hex)) => {
            Pepper::parse(hex.expose().as_bytes()).map_err(|e| CliError::usage(format!("KEYSTILE_PEPPER: {e}")))?
        }
        _ => {
            return Err(CliError::usage(
                "give the deployment's pepper by exactly one of --pepper-file or KEYSTILE_PEPPER",
            ));
        }
    };
    let format = KeyFormat::new(b.key_prefixes.clone(), &Env::ALL).map_err(|e| CliError::usage(e.join("; ")))?;
    let store = RedisStore::open(b.redis_url.expose(), &b.redis_namespace, Duration::from_secs(5))
        .map_err(|e| CliError::usage(e.to_string()))?;
    let settings = EngineSettings { format, ..EngineSettings::new(PepperSet::single(pepper)) };
    let app = App::build(settings, Arc::new(store), Clock::system());
    let minted = app.mint_admin_key(&b.name).await.map_err(|e| CliError { message: e.to_string(), code: 1 })?;
    let record = keystile::service::admin::to_proto(&minted.record, now());
    if json {
        println!("{}", json!({ "key": minted.key.expose(), "record": record_json(&record) }));
    } else {
        eprintln!("Store this admin key now: it is shown only once.");
        println!("KEYSTILE_ADMIN_KEY={}", minted.key.expose());
    }
    Ok(())
}
