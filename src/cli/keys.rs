//! `keystile keys …`: the operator's CLI, a KeyAdmin client. A table for
//! people, `--output json|yaml` (or `--json`) for scripts. The full key is
//! printed only by `create` and `rotate`, and only once. Every command that
//! names a key takes its bare id, its display prefix or the full key.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde_json::json;
use tonic::metadata::MetadataValue;

use super::output::{self, Format, print_record, print_table, record_json, state_name, when};
use super::{CliError, ServerArgs, exit};
use keystile::limit::{LimitSpec, RateLimitPolicy};
use keystile::proto;

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// A key with the keystile:admin scope (`Bearer ` allowed).
    #[arg(long, env = "KEYSTILE_ADMIN_KEY", hide_env_values = true, global = true, help_heading = "Connection")]
    pub admin_key: Option<keystile::secret::Secret>,
    /// How to print: a table for people, json or yaml for scripts.
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true, help_heading = "Output")]
    pub output: Format,
    /// Print JSON (the same as --output json).
    #[arg(long, global = true, help_heading = "Output")]
    pub json: bool,
    /// Print only the new key (create, rotate, bootstrap).
    #[arg(long, short = 'q', global = true, help_heading = "Output")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key. The full key is printed once and never again.
    Create(CreateArgs),
    /// List keys, oldest first.
    List(ListArgs),
    /// Show every field of one key.
    Get {
        /// The key: its id, its display prefix or the full key.
        key: String,
    },
    /// Change a key's name, scopes, IP allowlist, rate limit, metadata or expiry.
    Update(UpdateArgs),
    /// Stop a key from verifying (DISABLED) until it is enabled again.
    Disable {
        /// The key: its id, its display prefix or the full key.
        key: String,
    },
    /// Let a disabled key verify again (a revoked key stays revoked).
    Enable {
        /// The key: its id, its display prefix or the full key.
        key: String,
    },
    /// Revoke a key at once, on every sidecar.
    Revoke {
        /// The key: its id, its display prefix or the full key.
        key: String,
    },
    /// Mint a new key with the same attributes; the old one keeps working for the grace period.
    Rotate {
        /// The key: its id, its display prefix or the full key.
        key: String,
        /// How long the old key keeps working (e.g. 1h, 30m, 0s).
        #[arg(long, default_value = "1h")]
        grace: String,
    },
    /// Delete a key for good.
    Delete {
        /// The key: its id, its display prefix or the full key.
        key: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Mint the first admin key straight into Redis (no server needed).
    Bootstrap(BootstrapArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// What the key is for, shown in listings (e.g. "billing service").
    #[arg(long)]
    pub name: String,
    /// live or test.
    #[arg(long, default_value = "live")]
    pub env: String,
    /// The tenant the key belongs to (none when unset).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Whose key it is: an email or external id.
    #[arg(long)]
    pub owner: Option<String>,
    /// A granted scope; repeat or separate with commas.
    #[arg(long = "scope", visible_alias = "scopes", value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// A CIDR or address the key may be used from; repeat or separate with commas.
    #[arg(long = "allow-ip", visible_alias = "allow-ips", value_delimiter = ',')]
    pub ip_allowlist: Vec<String>,
    /// requests/window[:burst][@tenant], e.g. 100/60s, 100/1m:20, or
    /// 1000/60s@tenant to share one bucket with the tenant's other keys.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// A named limit of this key, NAME=REQUESTS/WINDOW[:BURST][@tenant][,auto];
    /// repeatable. Overrides the tenant's limit of the same name.
    #[arg(long = "limit")]
    pub limits: Vec<String>,
    /// key=value; repeatable.
    #[arg(long = "meta")]
    pub metadata: Vec<String>,
    /// Valid only for token exchange (`keystile token exchange`), refused
    /// by Verify as a bearer credential.
    #[arg(long)]
    pub exchange_only: bool,
    /// A tier the key holds (its scopes add to the key's); repeat or
    /// separate with commas.
    #[arg(long = "tier", value_delimiter = ',')]
    pub tiers: Vec<String>,
    /// secret (server side, the default), publishable (a site key that may
    /// sit in a browser: public: scopes only) or restricted (an explicit
    /// scope list).
    #[arg(long, value_parser = ["secret", "publishable", "restricted"], default_value = "secret")]
    pub kind: String,
    /// A browser origin a publishable key answers for
    /// (https://app.example.com, https://*.example.com); repeat or separate
    /// with commas. None: any origin.
    #[arg(long = "allow-origin", visible_alias = "allow-origins", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Expiry as unix seconds or RFC 3339 (2027-01-01T00:00:00Z).
    #[arg(long, conflicts_with = "expires_in")]
    pub expires_at: Option<String>,
    /// Expiry from now, e.g. 90d.
    #[arg(long)]
    pub expires_in: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this tenant's keys.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only live or only test keys.
    #[arg(long)]
    pub env: Option<String>,
    /// Only the keys of this owner ("your keys").
    #[arg(long)]
    pub owner: Option<String>,
    /// Only keys in this state (reads every page).
    #[arg(long, value_parser = ["active", "rotating", "expired", "revoked", "disabled"])]
    pub state: Option<String>,
    /// Only keys whose name contains this, case-insensitive (reads every page).
    #[arg(long)]
    pub name: Option<String>,
    /// Keys per page (at most 1000).
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
    /// Continue after a page (the token printed with the previous page).
    #[arg(long)]
    pub page_token: Option<String>,
    /// Fetch every page.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The key: its id, its display prefix or the full key.
    pub key: String,
    /// A new name.
    #[arg(long)]
    pub name: Option<String>,
    /// A new owner ("" removes it).
    #[arg(long)]
    pub owner: Option<String>,
    /// Replace the scopes (repeat or separate with commas; "" for none).
    #[arg(long = "scope", visible_alias = "scopes", value_delimiter = ',', num_args = 1)]
    pub scopes: Option<Vec<String>>,
    /// Replace the IP allowlist (repeat or separate with commas; "" for none).
    #[arg(long = "allow-ip", visible_alias = "allow-ips", value_delimiter = ',', num_args = 1)]
    pub ip_allowlist: Option<Vec<String>>,
    /// requests/window[:burst][@tenant]
    #[arg(long, conflicts_with = "clear_rate_limit")]
    pub rate_limit: Option<String>,
    /// Remove the key's own limit (the deployment default applies).
    #[arg(long)]
    pub clear_rate_limit: bool,
    /// Replace the key's named limits, NAME=REQUESTS/WINDOW[:BURST][@tenant][,auto];
    /// repeatable.
    #[arg(long = "limit", conflicts_with = "clear_limits")]
    pub limits: Vec<String>,
    /// Remove the key's named limits (its tenant's apply).
    #[arg(long)]
    pub clear_limits: bool,
    /// Make the key exchange-only (true) or a bearer credential again (false).
    #[arg(long)]
    pub exchange_only: Option<bool>,
    /// Replace the key's tiers; repeat or separate with commas.
    #[arg(long = "tier", value_delimiter = ',', conflicts_with = "clear_tiers")]
    pub tiers: Vec<String>,
    /// Remove the key's tiers.
    #[arg(long)]
    pub clear_tiers: bool,
    /// Replace a publishable key's allowed origins (repeat or separate with
    /// commas; "" for any origin).
    #[arg(long = "allow-origin", visible_alias = "allow-origins", value_delimiter = ',', num_args = 1)]
    pub allowed_origins: Option<Vec<String>>,
    /// Replace the metadata with these key=value pairs.
    #[arg(long = "meta")]
    pub metadata: Vec<String>,
    /// Remove all metadata.
    #[arg(long, conflicts_with = "metadata")]
    pub clear_metadata: bool,
    /// Expiry as unix seconds or RFC 3339.
    #[arg(long, conflicts_with_all = ["never_expires", "expires_in"])]
    pub expires_at: Option<String>,
    /// Expiry from now, e.g. 90d.
    #[arg(long, conflicts_with = "never_expires")]
    pub expires_in: Option<String>,
    /// Remove the expiry.
    #[arg(long)]
    pub never_expires: bool,
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// The deployment's Redis: the same settings as `serve`.
    #[command(flatten)]
    pub redis: keystile::config::RedisArgs,
    /// File holding the deployment's pepper.
    #[arg(long, env = "KEYSTILE_PEPPER_FILE")]
    pub pepper_file: Option<PathBuf>,
    /// The deployment's pepper itself (prefer --pepper-file).
    #[arg(long = "pepper", env = "KEYSTILE_PEPPER", hide_env_values = true)]
    pub pepper: Option<keystile::secret::Secret>,
    /// Key prefix of the deployment.
    #[arg(long = "key-prefix", env = "KEYSTILE_KEY_PREFIXES", value_delimiter = ',', default_value = "ks")]
    pub key_prefixes: Vec<String>,
    /// The admin key's name.
    #[arg(long, default_value = "bootstrap admin")]
    pub name: String,
    /// Mint even though none of the first 100 keys was hashed with this
    /// pepper (after a pepper rotation, when all of them still use the
    /// previous one).
    #[arg(long)]
    pub force: bool,
}

/// The key_id in any of the forms a user holds: the bare id, the display
/// prefix (`ks_live_<id>`) or the full key (`ks_live_<id>_<secret>`).
pub fn key_id_of(s: &str) -> Result<String, CliError> {
    let s = s.trim();
    let s = s.strip_prefix("Bearer ").unwrap_or(s).trim();
    let parts: Vec<&str> = s.split('_').collect();
    let id = match parts.as_slice() {
        [id] => *id,
        [_prefix, _env, id, ..] => *id,
        _ => "",
    };
    if id.len() == 8 && id.bytes().all(|c| c.is_ascii_alphanumeric()) {
        Ok(id.to_string())
    } else {
        // Never echoed: what was given may be a key or a secret.
        Err(CliError::usage(
            "the KEY given is not a key id (8 letters or digits), a display prefix (ks_live_<id>) or a full key",
        ))
    }
}

/// The admin key as given, `Bearer ` and surrounding blanks allowed; an
/// empty value counts as none.
pub(super) fn admin_bearer(
    key: Option<&keystile::secret::Secret>,
) -> Result<MetadataValue<tonic::metadata::Ascii>, CliError> {
    let key = key.map(|k| k.expose().trim()).unwrap_or_default();
    let key = key.strip_prefix("Bearer ").or_else(|| key.strip_prefix("bearer ")).unwrap_or(key).trim();
    if key.is_empty() {
        return Err(CliError::usage("set KEYSTILE_ADMIN_KEY (or --admin-key) to a key with the keystile:admin scope"));
    }
    MetadataValue::try_from(format!("Bearer {key}"))
        .map_err(|_| CliError::usage("the admin key contains characters that cannot be sent"))
}

pub async fn run(args: KeysArgs) -> Result<(), CliError> {
    let format = if args.json { Format::Json } else { args.output };
    if let KeysCommand::Bootstrap(b) = &args.command {
        return bootstrap(b, format, args.quiet).await;
    }
    // Everything that can be checked here is, before a connection is made.
    let bearer = admin_bearer(args.admin_key.as_ref())?;
    let prepared = prepare(args.command)?;
    let channel = args.server.connect(true).await?;
    let mut client = super::admin_client(channel, bearer);
    let quiet = args.quiet;
    match prepared {
        Prepared::Create(req) => {
            let resp = client.create_key(req).await?.into_inner();
            let record = resp.record.unwrap_or_default();
            if quiet {
                println!("{}", resp.key);
            } else if format != Format::Table {
                output::document(format, &json!({ "key": resp.key, "record": record_json(&record) }));
            } else {
                eprintln!("Store this key now: it is shown only once.");
                println!("{}", resp.key);
                print_table(&[record]);
            }
        }
        Prepared::List(l) => {
            let mut token = l.page_token.clone().unwrap_or_default();
            let mut all = Vec::new();
            loop {
                let resp = client
                    .list_keys(proto::ListKeysRequest {
                        page_size: l.page_size,
                        page_token: token.clone(),
                        tenant: l.tenant.clone().unwrap_or_default(),
                        env: l.env.clone().unwrap_or_default(),
                        owner: l.owner.clone().unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                all.extend(resp.records);
                token = resp.next_page_token;
                // A filter applies to every key, not to one page of them.
                let every_page = l.all || l.state.is_some() || l.name.is_some();
                if !every_page || token.is_empty() {
                    break;
                }
            }
            let name = l.name.as_deref().map(str::to_lowercase);
            all.retain(|r| {
                l.state.as_deref().is_none_or(|s| state_name(r.state) == s)
                    && name.as_deref().is_none_or(|n| r.name.to_lowercase().contains(n))
            });
            if format != Format::Table {
                output::document(
                    format,
                    &json!({ "records": all.iter().map(record_json).collect::<Vec<_>>(), "next_page_token": token }),
                );
            } else {
                print_table(&all);
                if !token.is_empty() {
                    eprintln!("more: --page-token {token}");
                }
            }
        }
        Prepared::Get(key_id) => {
            let r = client.get_key(proto::GetKeyRequest { key_id }).await?.into_inner().record.unwrap_or_default();
            show(format, &r);
        }
        Prepared::Update(req) => {
            let r = client.update_key(req).await?.into_inner().record.unwrap_or_default();
            show(format, &r);
        }
        Prepared::Disable(key_id, disable) => {
            let r = if disable {
                client.disable_key(proto::DisableKeyRequest { key_id }).await?.into_inner().record
            } else {
                client.enable_key(proto::EnableKeyRequest { key_id }).await?.into_inner().record
            };
            show(format, &r.unwrap_or_default());
        }
        Prepared::Revoke(key_id) => {
            let r =
                client.revoke_key(proto::RevokeKeyRequest { key_id }).await?.into_inner().record.unwrap_or_default();
            show(format, &r);
        }
        Prepared::Rotate(key_id, grace) => {
            let resp = client
                .rotate_key(proto::RotateKeyRequest { key_id, grace_seconds: Some(grace.as_secs()) })
                .await?
                .into_inner();
            let record = resp.record.unwrap_or_default();
            let previous = resp.previous.unwrap_or_default();
            if quiet {
                println!("{}", resp.key);
            } else if format != Format::Table {
                output::document(
                    format,
                    &json!({ "key": resp.key, "record": record_json(&record), "previous": record_json(&previous) }),
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
        Prepared::Delete(key_id) => {
            client.delete_key(proto::DeleteKeyRequest { key_id: key_id.clone() }).await?;
            if format != Format::Table {
                output::document(format, &json!({ "deleted": key_id }));
            } else {
                eprintln!("deleted {key_id}");
            }
        }
    }
    Ok(())
}

/// A command checked and converted, ready to send.
enum Prepared {
    Create(proto::CreateKeyRequest),
    List(ListArgs),
    Get(String),
    Update(proto::UpdateKeyRequest),
    /// `true` disables, `false` enables.
    Disable(String, bool),
    Revoke(String),
    Rotate(String, Duration),
    Delete(String),
}

fn prepare(command: KeysCommand) -> Result<Prepared, CliError> {
    Ok(match command {
        KeysCommand::Create(c) => Prepared::Create(create_request(c)?),
        KeysCommand::List(l) => Prepared::List(l),
        KeysCommand::Get { key } => Prepared::Get(key_id_of(&key)?),
        KeysCommand::Update(u) => Prepared::Update(update_request(u)?),
        KeysCommand::Revoke { key } => Prepared::Revoke(key_id_of(&key)?),
        KeysCommand::Disable { key } => Prepared::Disable(key_id_of(&key)?, true),
        KeysCommand::Enable { key } => Prepared::Disable(key_id_of(&key)?, false),
        KeysCommand::Rotate { key, grace } => {
            let grace =
                humantime::parse_duration(&grace).map_err(|e| CliError::usage(format!("--grace {grace:?}: {e}")))?;
            Prepared::Rotate(key_id_of(&key)?, grace)
        }
        KeysCommand::Delete { key, yes } => {
            let key_id = key_id_of(&key)?;
            if !yes && !confirm(&key_id)? {
                return Err(CliError { message: "not deleted".into(), code: exit::OTHER });
            }
            Prepared::Delete(key_id)
        }
        KeysCommand::Bootstrap(_) => unreachable!("handled before"),
    })
}

fn confirm(key_id: &str) -> Result<bool, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage("deleting is irreversible: pass --yes to delete without a prompt"));
    }
    eprint!("Delete key {key_id} for good? It cannot be undone. Type the key id to confirm: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| CliError::usage(e.to_string()))?;
    Ok(line.trim() == key_id)
}

fn parse_time(flag: &str, s: &str) -> Result<i64, CliError> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    humantime::parse_rfc3339_weak(s)
        .map(|t| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0))
        .map_err(|_| CliError::usage(format!("{flag} {s:?} is neither unix seconds nor an RFC 3339 time")))
}

fn parse_in(flag: &str, s: &str) -> Result<i64, CliError> {
    let d = humantime::parse_duration(s).map_err(|e| CliError::usage(format!("{flag} {s:?}: {e} (e.g. 90d, 12h)")))?;
    Ok(now() + d.as_secs() as i64)
}

fn parse_meta(pairs: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CliError::usage(format!("--meta {p:?} must be key=value with a non-empty key"))),
        })
        .collect()
}

fn rate(s: &str) -> Result<proto::RateLimit, CliError> {
    let p: RateLimitPolicy = s.parse().map_err(|e| CliError::usage(format!("--rate-limit: {e}")))?;
    Ok(proto::RateLimit {
        requests: p.requests,
        window_seconds: p.window_seconds,
        burst: p.burst,
        per_tenant: p.per_tenant,
    })
}

/// `--limit` values as the API takes them; every bad one reported.
pub(super) fn limit_specs(values: &[String]) -> Result<Vec<proto::LimitSpec>, CliError> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for v in values {
        match v.trim().parse::<LimitSpec>() {
            Ok(l) => out.push(keystile::service::admin::limit_to_proto(&l)),
            Err(e) => problems.push(format!("--limit: {e}")),
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(CliError::usage(problems.join("\n"))) }
}

fn create_request(c: CreateArgs) -> Result<proto::CreateKeyRequest, CliError> {
    let expires_at = match (&c.expires_at, &c.expires_in) {
        (Some(at), _) => parse_time("--expires-at", at)?,
        (None, Some(d)) => parse_in("--expires-in", d)?,
        (None, None) => 0,
    };
    Ok(proto::CreateKeyRequest {
        name: c.name,
        env: c.env,
        tenant: c.tenant.unwrap_or_default(),
        owner: c.owner.unwrap_or_default(),
        scopes: nonempty(c.scopes),
        ip_allowlist: nonempty(c.ip_allowlist),
        rate_limit: c.rate_limit.as_deref().map(rate).transpose()?,
        limits: limit_specs(&c.limits)?,
        metadata: parse_meta(&c.metadata)?.into_iter().collect(),
        expires_at,
        exchange_only: c.exchange_only,
        tiers: nonempty(c.tiers),
        kind: match c.kind.as_str() {
            "publishable" => proto::KeyKind::Publishable,
            "restricted" => proto::KeyKind::Restricted,
            _ => proto::KeyKind::Secret,
        } as i32,
        allowed_origins: nonempty(c.allowed_origins),
    })
}

fn nonempty(v: Vec<String>) -> Vec<String> {
    v.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

fn update_request(u: UpdateArgs) -> Result<proto::UpdateKeyRequest, CliError> {
    let metadata = if u.clear_metadata {
        Some(proto::MetadataMap::default())
    } else if u.metadata.is_empty() {
        None
    } else {
        Some(proto::MetadataMap { entries: parse_meta(&u.metadata)?.into_iter().collect() })
    };
    let expires_at = if u.never_expires {
        Some(0)
    } else if let Some(at) = &u.expires_at {
        Some(parse_time("--expires-at", at)?)
    } else {
        u.expires_in.as_deref().map(|d| parse_in("--expires-in", d)).transpose()?
    };
    let req = proto::UpdateKeyRequest {
        key_id: key_id_of(&u.key)?,
        name: u.name,
        owner: u.owner,
        scopes: u.scopes.map(|s| proto::StringList { values: nonempty(s) }),
        ip_allowlist: u.ip_allowlist.map(|s| proto::StringList { values: nonempty(s) }),
        rate_limit: u.rate_limit.as_deref().map(rate).transpose()?,
        clear_rate_limit: u.clear_rate_limit,
        limits: limit_specs(&u.limits)?,
        clear_limits: u.clear_limits,
        metadata,
        expires_at,
        exchange_only: u.exchange_only,
        tiers: nonempty(u.tiers),
        clear_tiers: u.clear_tiers,
        allowed_origins: u.allowed_origins.map(|s| proto::StringList { values: nonempty(s) }),
    };
    let changes_nothing = req.name.is_none()
        && req.owner.is_none()
        && req.scopes.is_none()
        && req.ip_allowlist.is_none()
        && req.rate_limit.is_none()
        && !req.clear_rate_limit
        && req.limits.is_empty()
        && !req.clear_limits
        && req.exchange_only.is_none()
        && req.tiers.is_empty()
        && !req.clear_tiers
        && req.allowed_origins.is_none()
        && req.metadata.is_none()
        && req.expires_at.is_none();
    if changes_nothing {
        return Err(CliError::usage(
            "nothing to change: give at least one of --name, --owner, --scope, --allow-ip, --rate-limit, --clear-rate-limit, \
             --limit, --clear-limits, --exchange-only, --tier, --clear-tiers, --allow-origin, --meta, --clear-metadata, --expires-at, --expires-in, --never-expires",
        ));
    }
    Ok(req)
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn show(format: Format, r: &proto::KeyRecord) {
    match format {
        Format::Table => print_record(r),
        other => output::document(other, &record_json(r)),
    }
}

async fn bootstrap(b: &BootstrapArgs, format: Format, quiet: bool) -> Result<(), CliError> {
    use keystile::app::App;
    use keystile::clock::Clock;
    use keystile::engine::EngineSettings;
    use keystile::key::{Env, KeyFormat, PepperSet};

    let pepper = super::deployment_pepper(b.pepper_file.as_deref(), b.pepper.as_ref())?;
    let key_format = KeyFormat::new(b.key_prefixes.clone(), &Env::ALL).map_err(|e| CliError::usage(e.join("; ")))?;
    let (store, where_) = super::deployment_store(&b.redis, "bootstrap writes to")?;
    let unavailable = |e: &dyn std::fmt::Display| CliError {
        message: format!("cannot write the admin key to Redis at {where_}: {e}"),
        code: exit::UNAVAILABLE,
    };
    // Keys hashed under another pepper would never verify beside this one:
    // refuse when none of the first keys uses it.
    let existing = store
        .list(&keystile::store::ListQuery { limit: 100, ..Default::default() })
        .await
        .map_err(|e| unavailable(&e))?;
    let ids: std::collections::BTreeSet<&str> =
        existing.records.iter().map(|r| r.secret_hash.pepper_id.as_str()).collect();
    if !b.force && !ids.is_empty() && !ids.contains(pepper.id()) {
        return Err(CliError::usage(format!(
            "the keys in this Redis were hashed with pepper {}, and the pepper given is {}: give the \
             deployment's pepper (or --force after a pepper rotation)",
            ids.into_iter().collect::<Vec<_>>().join(", "),
            pepper.id()
        )));
    }
    // Not a replica: it verifies nothing, so it takes no part in shared limits.
    let settings = EngineSettings { format: key_format, fleet: None, ..EngineSettings::new(PepperSet::single(pepper)) };
    let app = App::build(settings, store, Clock::system());
    let minted = app.mint_admin_key(&b.name).await.map_err(|e| unavailable(&e))?;
    let record = keystile::service::admin::to_proto(&minted.record, now());
    if quiet {
        println!("{}", minted.key.expose());
    } else if format != Format::Table {
        output::document(format, &json!({ "key": minted.key.expose(), "record": record_json(&record) }));
    } else {
        eprintln!("Store this admin key now: it is shown only once.");
        println!("KEYSTILE_ADMIN_KEY={}", minted.key.expose());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_named_in_three_forms() {
        assert_eq!(key_id_of("7Hq2mZp0").unwrap(), "7Hq2mZp0");
        assert_eq!(key_id_of("ks_live_7Hq2mZp0").unwrap(), "7Hq2mZp0");
        assert_eq!(key_id_of("ks_live_7Hq2mZp0_Vb3kR9sT1uXw4yZa6cDe8fGh0jKm2nPq3xQ0Lw").unwrap(), "7Hq2mZp0");
        assert_eq!(key_id_of("Bearer ks_test_7Hq2mZp0_x").unwrap(), "7Hq2mZp0");
        let err = key_id_of("ks_live_7Hq2m_Vb3kR9sT1uXw4yZa6cDe8fGh0jKm2nPq3xQ0Lw").unwrap_err();
        assert!(!err.message.contains("Vb3kR9sT"), "no secret in the error: {}", err.message);
        assert!(key_id_of("short").is_err());
    }
}
