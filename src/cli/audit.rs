//! `keystile audit`: admin mutations, newest first (README, "Audit"),
//! through KeyAdmin's `ListAuditEvents`.

use clap::Args;
use serde_json::json;

use super::keys::admin_bearer;
use super::output::{self, Format, when};
use super::{CliError, ServerArgs};
use keystile::proto;

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// A key with an admin scope (`Bearer ` allowed).
    #[arg(long, env = "KEYSTILE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<keystile::secret::Secret>,
    /// Only this tenant's events.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only the events of this key (its id).
    #[arg(long)]
    pub key: Option<String>,
    /// Only what this admin key (its id) did.
    #[arg(long)]
    pub actor: Option<String>,
    /// Events per page (at most 1000).
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
    /// Continue after a page (the token printed with it).
    #[arg(long)]
    pub page_token: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Format,
}

pub async fn run(args: AuditArgs) -> Result<(), CliError> {
    let bearer = admin_bearer(args.admin_key.as_ref())?;
    let channel = args.server.connect(true).await?;
    let mut client = super::admin_client(channel, bearer);
    let resp = client
        .list_audit_events(proto::ListAuditEventsRequest {
            tenant: args.tenant.unwrap_or_default(),
            key_id: args.key.unwrap_or_default(),
            actor: args.actor.unwrap_or_default(),
            page_size: args.page_size,
            page_token: args.page_token.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if args.output != Format::Table {
        let events: Vec<_> = resp
            .events
            .iter()
            .map(|e| {
                json!({"id": e.id, "at": e.at, "actor": e.actor, "peer": e.peer, "action": e.action,
                       "key_id": e.key_id, "tenant": e.tenant, "env": e.env, "fields": e.fields})
            })
            .collect();
        output::document(args.output, &json!({"events": events, "next_page_token": resp.next_page_token}));
        return Ok(());
    }
    let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    for e in &resp.events {
        println!(
            "{}  {:<18} {:<9} {:<10} {:<12} by {} from {}  {}",
            when(e.at),
            e.action,
            dash(&e.key_id),
            dash(&e.env),
            dash(&e.tenant),
            e.actor,
            dash(&e.peer),
            e.fields.join(" ")
        );
    }
    if resp.events.is_empty() {
        println!("no events");
    }
    if !resp.next_page_token.is_empty() {
        eprintln!("more: --page-token {}", resp.next_page_token);
    }
    Ok(())
}
