//! `keystile verify KEY`: asks a server's Verifier about a key, as a
//! service would, and prints the verdict and the headers it would forward.
//! Exits 0 whatever the verdict: a denial is an answer, not a failure.

use clap::Args;
use serde_json::{Map, Value, json};

use super::output::{self, Format};
use super::{CliError, ServerArgs};
use keystile::proto;
use keystile::proto::verifier_client::VerifierClient;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The key to try (`Bearer ` allowed); `-` reads it from stdin, and
    /// without it KEYSTILE_KEY is used (neither shows in the process list).
    #[arg(env = "KEYSTILE_KEY", hide_env_values = true)]
    pub key: keystile::secret::Secret,
    /// The end client's address the request would come from.
    #[arg(long)]
    pub ip: Option<String>,
    /// A scope the request needs; repeat or separate with commas.
    #[arg(long = "scope", visible_alias = "scopes", value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// The tenant the request is for.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Rate-limit cells the request takes.
    #[arg(long)]
    pub cost: Option<u32>,
    /// A named limit the request counts against; repeat or separate with
    /// commas (none: the key's automatic limits).
    #[arg(long = "limit", value_delimiter = ',')]
    pub limits: Vec<String>,
    /// The browser origin the request comes from (for publishable keys).
    #[arg(long)]
    pub origin: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
    /// How to print: a summary, or the Verify response as json or yaml.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Format,
    /// Print JSON (the same as --output json).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: VerifyArgs) -> Result<(), CliError> {
    let format = if args.json { Format::Json } else { args.output };
    // The key goes in the request body; the usual refusal of plaintext to
    // a remote server applies to it as to an admin key.
    let key = super::key_argument(&args.key)?;
    let channel = args.server.connect(true).await?;
    let request = proto::VerifyRequest {
        key,
        ip: args.ip.unwrap_or_default(),
        scopes: args.scopes.into_iter().filter(|s| !s.trim().is_empty()).collect(),
        tenant: args.tenant.unwrap_or_default(),
        cost: args.cost,
        limits: args.limits.into_iter().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect(),
        origin: args.origin.unwrap_or_default(),
        want_metadata: false,
    };
    let resp = VerifierClient::new(channel).verify(request).await?.into_inner();
    match format {
        Format::Table => print_summary(&resp),
        other => output::document(other, &response_json(&resp)),
    }
    Ok(())
}

fn code_name(code: i32) -> &'static str {
    proto::Code::try_from(code).map_or("CODE_UNSPECIFIED", |c| c.as_str_name())
}

fn print_summary(r: &proto::VerifyResponse) {
    println!("{} ({}) {}", code_name(r.code), r.http_status, r.message);
    if !r.key_id.is_empty() {
        println!(
            "key id  {}  name {:?}  env {}  tenant {}",
            r.key_id,
            r.name,
            r.env,
            if r.tenant.is_empty() { "-" } else { &r.tenant }
        );
    }
    let mut headers: Vec<_> = r.headers.iter().collect();
    headers.sort();
    for (k, v) in headers {
        println!("{k}: {v}");
    }
}

/// The response in protobuf's JSON mapping: lowerCamelCase names, enums by
/// name, 64-bit integers as strings, fields at their default left out.
pub fn response_json(r: &proto::VerifyResponse) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value, default: bool| {
        if !default {
            m.insert(k.to_string(), v);
        }
    };
    put("valid", json!(r.valid), !r.valid);
    put("code", json!(code_name(r.code)), r.code == 0);
    put("error", json!(r.error), r.error.is_empty());
    put("httpStatus", json!(r.http_status), r.http_status == 0);
    put("message", json!(r.message), r.message.is_empty());
    put("keyId", json!(r.key_id), r.key_id.is_empty());
    put("name", json!(r.name), r.name.is_empty());
    put("env", json!(r.env), r.env.is_empty());
    put("tenant", json!(r.tenant), r.tenant.is_empty());
    put("scopes", json!(r.scopes), r.scopes.is_empty());
    put("metadata", json!(r.metadata), r.metadata.is_empty());
    put("expiresAt", json!(r.expires_at.to_string()), r.expires_at == 0);
    if let Some(l) = &r.rate_limit {
        let mut rl = Map::new();
        for (k, v) in [
            ("limit", l.limit),
            ("remaining", l.remaining),
            ("resetSeconds", l.reset_seconds),
            ("windowSeconds", l.window_seconds),
            ("retryAfterMs", l.retry_after_ms),
        ] {
            if v != 0 {
                rl.insert(k.to_string(), json!(v.to_string()));
            }
        }
        put("rateLimit", Value::Object(rl), false);
    }
    put(
        "limits",
        Value::Array(
            r.limits
                .iter()
                .map(|l| {
                    json!({"name": l.name, "limit": l.limit.to_string(), "remaining": l.remaining.to_string(),
                           "resetSeconds": l.reset_seconds.to_string(), "windowSeconds": l.window_seconds.to_string(),
                           "retryAfterMs": l.retry_after_ms.to_string()})
                })
                .collect(),
        ),
        r.limits.is_empty(),
    );
    put("headers", json!(r.headers), r.headers.is_empty());
    Value::Object(m)
}
