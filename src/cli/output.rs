//! How the CLI prints: a table (or a field list for one key) for people,
//! JSON or YAML for scripts. The JSON shapes are documented in the README
//! ("Admin API and CLI"); YAML carries the same documents.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use clap::ValueEnum;
use serde_json::{Value, json};

use keystile::proto;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Prints a document as JSON (one line) or YAML.
pub fn document(format: Format, doc: &Value) {
    match format {
        Format::Yaml => print!("{}", yaml(doc)),
        _ => println!("{doc}"),
    }
}

/// YAML for a JSON document: block mappings and sequences, strings
/// double-quoted (a JSON string is a valid YAML scalar), numbers, booleans
/// and null as they are.
pub fn yaml(doc: &Value) -> String {
    let mut out = String::new();
    write_yaml(doc, 0, &mut out);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn write_yaml(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                out.push_str(&format!("{pad}{}:", Value::String(k.clone())));
                nested(v, indent, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for v in items {
                out.push_str(&format!("{pad}-"));
                nested(v, indent, out);
            }
        }
        scalar => out.push_str(&format!("{pad}{scalar}\n")),
    }
}

fn nested(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_yaml(v, indent + 2, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_yaml(v, indent + 2, out);
        }
        scalar => out.push_str(&format!(" {scalar}\n")),
    }
}

pub fn when(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t as u64)).to_string()
}

pub fn state_name(s: i32) -> &'static str {
    match proto::KeyState::try_from(s).unwrap_or(proto::KeyState::Unspecified) {
        proto::KeyState::Active => "active",
        proto::KeyState::Rotating => "rotating",
        proto::KeyState::Expired => "expired",
        proto::KeyState::Revoked => "revoked",
        proto::KeyState::Disabled => "disabled",
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
        "owner": r.owner,
        "disabled": r.disabled,
        "exchange_only": r.exchange_only,
        "tiers": r.tiers,
        "limits": r.limits.iter().map(limit_json).collect::<Vec<_>>(),
        "kind": kind_name(r.kind),
        "allowed_origins": r.allowed_origins,
        "usage": r.usage.iter().map(|u| (u.code.clone(), u.count)).collect::<BTreeMap<_, _>>(),
    })
}

fn kind_name(kind: i32) -> &'static str {
    match proto::KeyKind::try_from(kind) {
        Ok(proto::KeyKind::Publishable) => "publishable",
        Ok(proto::KeyKind::Restricted) => "restricted",
        _ => "secret",
    }
}

/// A named limit as scripts see it.
pub fn limit_json(l: &proto::LimitSpec) -> Value {
    let per = if l.per == proto::LimitScope::Tenant as i32 { "tenant" } else { "key" };
    let fallback = match proto::LimitFallback::try_from(l.fallback) {
        Ok(proto::LimitFallback::Open) => "open",
        Ok(proto::LimitFallback::Closed) => "closed",
        _ => "local_share",
    };
    json!({"name": l.name, "requests": l.requests, "window_seconds": l.window_seconds, "burst": l.burst,
           "per": per, "auto_apply": l.auto_apply, "fallback": fallback})
}

/// A named limit as `--limit` writes it.
pub fn limit_text(l: &proto::LimitSpec) -> String {
    keystile::limit::LimitSpec::try_from(l.clone())
        .map_or_else(|_| format!("{} (unreadable)", l.name), |s| s.to_string())
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

fn rate_text(r: &proto::KeyRecord) -> String {
    r.rate_limit.as_ref().map_or("-".into(), |l| {
        let mut s = format!("{}/{}s", l.requests, l.window_seconds);
        if l.burst > 0 {
            s.push_str(&format!(":{}", l.burst));
        }
        if l.per_tenant {
            s.push_str("@tenant");
        }
        s
    })
}

/// One key, every field, one per line.
pub fn print_record(r: &proto::KeyRecord) {
    let revoked = if r.revoked_at == 0 {
        "-".to_string()
    } else if state_name(r.state) == "rotating" {
        format!("{} (end of the rotation's grace)", when(r.revoked_at))
    } else {
        when(r.revoked_at)
    };
    let metadata: Vec<String> = r.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let rows = [
        ("key id", r.key_id.clone()),
        ("display prefix", r.display_prefix.clone()),
        ("name", r.name.clone()),
        ("state", state_name(r.state).to_string()),
        ("kind", kind_name(r.kind).to_string()),
        ("env", r.env.clone()),
        ("tenant", or_dash(&r.tenant)),
        ("owner", or_dash(&r.owner)),
        ("scopes", or_dash(&r.scopes.join(","))),
        ("ip allowlist", or_dash(&r.ip_allowlist.join(","))),
        ("rate limit", rate_text(r)),
        ("tiers", or_dash(&r.tiers.join(","))),
        ("exchange only", if r.exchange_only { "yes".into() } else { "no".into() }),
        ("origins", or_dash(&r.allowed_origins.join(","))),
        ("limits", or_dash(&r.limits.iter().map(limit_text).collect::<Vec<_>>().join(" "))),
        ("metadata", or_dash(&metadata.join(" "))),
        ("created", when(r.created_at)),
        ("last used", if r.last_used_at == 0 { "never".into() } else { when(r.last_used_at) }),
        (
            "usage (24h)",
            or_dash(&r.usage.iter().map(|u| format!("{} {}", u.code, u.count)).collect::<Vec<_>>().join(", ")),
        ),
        ("expires", if r.expires_at == 0 { "never".into() } else { when(r.expires_at) }),
        ("revoked", revoked),
        ("version", r.version.to_string()),
    ];
    for (k, v) in rows {
        println!("{k:<15} {v}");
    }
}

/// Keys as a table.
pub fn print_table(records: &[proto::KeyRecord]) {
    let header = ["KEY ID", "NAME", "KEY", "ENV", "TENANT", "SCOPES", "CREATED", "LAST USED", "EXPIRES", "STATE"];
    let rows: Vec<[String; 10]> = records
        .iter()
        .map(|r| {
            [
                r.key_id.clone(),
                r.name.clone(),
                r.display_prefix.clone(),
                r.env.clone(),
                or_dash(&r.tenant),
                or_dash(&r.scopes.join(",")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_of_a_record_document() {
        let doc = json!({"key": "ks_live_x", "record": {"scopes": ["a", "b"], "metadata": {}, "version": 2, "rate_limit": null}});
        assert_eq!(
            yaml(&doc),
            "\"key\": \"ks_live_x\"\n\"record\":\n  \"metadata\": {}\n  \"rate_limit\": null\n  \"scopes\":\n    - \"a\"\n    - \"b\"\n  \"version\": 2\n"
        );
    }
}
