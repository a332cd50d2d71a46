//! `keystile tenants …`: a tenant's named limits (README, "Rate limits"),
//! through KeyAdmin's `SetTenantPolicy`/`GetTenantPolicy`. `set-limit` and
//! `clear-limit` change one limit and keep the others.

use clap::{Args, Subcommand};
use serde_json::json;

use super::keys::admin_bearer;
use super::output::{self, Format, limit_json, limit_text};
use super::{CliError, ServerArgs};
use keystile::limit::{LimitFallback, LimitScope, LimitSpec};
use keystile::proto;

#[derive(Debug, Args)]
pub struct TenantsArgs {
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
    #[command(subcommand)]
    pub command: TenantsCommand,
}

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Show a tenant's limits.
    Get { tenant: String },
    /// Add a limit to a tenant's policy, or replace the one of that name.
    SetLimit(SetLimitArgs),
    /// Remove one limit from a tenant's policy.
    ClearLimit {
        tenant: String,
        /// The limit's name.
        name: String,
    },
    /// Set a tier (a named scope bundle) of a tenant; `-` as the tenant sets
    /// a deployment-wide tier. No --scope removes it.
    SetTier {
        tenant: String,
        /// The tier's name, e.g. premium.
        name: String,
        /// A scope of the tier; repeat or separate with commas.
        #[arg(long = "scope", value_delimiter = ',')]
        scopes: Vec<String>,
    },
    /// List a tenant's tiers and the deployment's (`-`: the deployment's).
    Tiers { tenant: String },
}

#[derive(Debug, Args)]
pub struct SetLimitArgs {
    pub tenant: String,
    /// The limit's name, [a-z0-9_-]{1,32} (e.g. integration).
    pub name: String,
    /// REQUESTS/WINDOW[:BURST], e.g. 1000/1m or 1000/1m:100.
    pub rate: String,
    /// Count per key, or per tenant (shared by the tenant's keys of one
    /// environment).
    #[arg(long, value_parser = ["key", "tenant"], default_value = "tenant")]
    pub per: String,
    /// Apply when a request names no limit.
    #[arg(long)]
    pub auto: bool,
    /// What a sidecar does while Redis cannot be reached.
    #[arg(long, value_parser = ["local-share", "open", "closed"], default_value = "local-share")]
    pub fallback: String,
}

impl SetLimitArgs {
    fn spec(&self) -> Result<LimitSpec, CliError> {
        let mut spec: LimitSpec =
            format!("{}={}", self.name.trim(), self.rate.trim()).parse().map_err(CliError::usage)?;
        spec.per = if self.per == "key" { LimitScope::Key } else { LimitScope::Tenant };
        spec.auto_apply = self.auto;
        spec.fallback = match self.fallback.as_str() {
            "open" => LimitFallback::Open,
            "closed" => LimitFallback::Closed,
            _ => LimitFallback::LocalShare,
        };
        Ok(spec)
    }
}

pub async fn run(args: TenantsArgs) -> Result<(), CliError> {
    let format = if args.json { Format::Json } else { args.output };
    let bearer = admin_bearer(args.admin_key.as_ref())?;
    // Checked before a connection is made.
    let new_limit = match &args.command {
        TenantsCommand::SetLimit(s) => Some(s.spec()?),
        TenantsCommand::ClearLimit { name, .. } => {
            name.parse::<keystile::limit::LimitName>().map_err(CliError::usage)?;
            None
        }
        TenantsCommand::Get { .. } | TenantsCommand::SetTier { .. } | TenantsCommand::Tiers { .. } => None,
    };
    let channel = args.server.connect(true).await?;
    let mut client = super::admin_client(channel, bearer);
    let deployment = |t: &str| if t == "-" { String::new() } else { t.to_string() };
    let tier_json = |t: &proto::Tier| json!({"tenant": t.tenant, "name": t.name, "scopes": t.scopes});
    let print_tier = |t: &proto::Tier| {
        let owner = if t.tenant.is_empty() { "(deployment)".to_string() } else { t.tenant.clone() };
        println!("{owner:<16} {:<16} {}", t.name, if t.scopes.is_empty() { "-".into() } else { t.scopes.join(",") });
    };
    let policy = match args.command {
        TenantsCommand::SetTier { tenant, name, scopes } => {
            let scopes = scopes.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            let tier = client
                .set_tier(proto::SetTierRequest { tenant: deployment(&tenant), name, scopes })
                .await?
                .into_inner();
            if format != Format::Table {
                output::document(format, &tier_json(&tier));
            } else {
                print_tier(&tier);
            }
            return Ok(());
        }
        TenantsCommand::Tiers { tenant } => {
            let tiers =
                client.list_tiers(proto::ListTiersRequest { tenant: deployment(&tenant) }).await?.into_inner().tiers;
            if format != Format::Table {
                output::document(format, &json!({"tiers": tiers.iter().map(tier_json).collect::<Vec<_>>()}));
            } else if tiers.is_empty() {
                println!("no tiers");
            } else {
                tiers.iter().for_each(print_tier);
            }
            return Ok(());
        }
        TenantsCommand::Get { tenant } => {
            client.get_tenant_policy(proto::GetTenantPolicyRequest { tenant }).await?.into_inner()
        }
        TenantsCommand::SetLimit(s) => {
            let spec = keystile::service::admin::limit_to_proto(&new_limit.expect("parsed above"));
            let current = client
                .get_tenant_policy(proto::GetTenantPolicyRequest { tenant: s.tenant.clone() })
                .await?
                .into_inner();
            let mut limits: Vec<proto::LimitSpec> =
                current.limits.into_iter().filter(|l| l.name != spec.name).collect();
            limits.push(spec);
            client.set_tenant_policy(proto::SetTenantPolicyRequest { tenant: s.tenant, limits }).await?.into_inner()
        }
        TenantsCommand::ClearLimit { tenant, name } => {
            let current =
                client.get_tenant_policy(proto::GetTenantPolicyRequest { tenant: tenant.clone() }).await?.into_inner();
            if !current.limits.iter().any(|l| l.name == name) {
                return Err(CliError {
                    message: format!("tenant {tenant:?} has no limit named {name:?}"),
                    code: super::exit::DATA,
                });
            }
            let limits = current.limits.into_iter().filter(|l| l.name != name).collect();
            client.set_tenant_policy(proto::SetTenantPolicyRequest { tenant, limits }).await?.into_inner()
        }
    };
    if format != Format::Table {
        output::document(
            format,
            &json!({"tenant": policy.tenant, "updated_at": policy.updated_at,
                    "limits": policy.limits.iter().map(limit_json).collect::<Vec<_>>()}),
        );
    } else if policy.limits.is_empty() {
        println!("tenant {} has no limits of its own", policy.tenant);
    } else {
        println!("tenant {}", policy.tenant);
        for l in &policy.limits {
            println!("  {}", limit_text(l));
        }
    }
    Ok(())
}
