//! The binary's own commands, beside `serve`: `keys` (a KeyAdmin client),
//! `verify` (try a key), `bench` (the gRPC load generator) and
//! `completions`. They use the library as any client would; the library
//! holds the engine, its stores, limiters and front ends.
//!
//! Every command exits with one code per kind of outcome (README, "Exit
//! codes"): see [`exit`].

pub mod audit;
pub mod bench;
pub mod keys;
pub mod output;
pub mod tenants;
pub mod token;
pub mod verify;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Exit codes (the BSD sysexits names).
pub mod exit {
    /// Usage or configuration error: every problem is listed.
    pub const USAGE: i32 = 64;
    /// The server refused the input as invalid (or the thing named does
    /// not exist).
    pub const DATA: i32 = 65;
    /// The server, or the store, could not be reached or did not answer.
    pub const UNAVAILABLE: i32 = 69;
    /// The credential was refused.
    pub const NO_PERMISSION: i32 = 77;
    /// Anything else.
    pub const OTHER: i32 = 1;
}

/// A failed command: a message for stderr and its exit code.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub code: i32,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError { message: message.into(), code: exit::USAGE }
    }

    pub fn unavailable(message: impl Into<String>) -> CliError {
        CliError { message: message.into(), code: exit::UNAVAILABLE }
    }
}

/// The exit code of a status the server answered with.
pub fn status_code(code: tonic::Code) -> i32 {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::NotFound | Code::AlreadyExists => {
            exit::DATA
        }
        Code::Unauthenticated | Code::PermissionDenied => exit::NO_PERMISSION,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => exit::UNAVAILABLE,
        _ => exit::OTHER,
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        if s.code() == tonic::Code::Unimplemented {
            return CliError {
                message: "the server does not serve this API (is KeyAdmin turned off with --no-admin there?)".into(),
                code: exit::OTHER,
            };
        }
        let mut message = format!("{:?}: {}", s.code(), s.message());
        if let Some(source) = std::error::Error::source(&s) {
            message = format!("{message}: {}", chain(source));
        }
        CliError { message, code: status_code(s.code()) }
    }
}

pub use keystile::config::error_chain as chain;

/// How a command reaches a keystile server.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The server: http://host:port, https://host:port, or host:port
    /// (plaintext).
    #[arg(
        long,
        env = "KEYSTILE_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true,
        help_heading = "Connection"
    )]
    pub server: String,
    /// PEM file of the CA that signed an https:// server's certificate
    /// (default: the system's roots).
    #[arg(long, env = "KEYSTILE_CA_FILE", global = true, help_heading = "Connection")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for a server that requires mutual TLS.
    #[arg(long, env = "KEYSTILE_CLIENT_CERT", global = true, requires = "client_key", help_heading = "Connection")]
    pub client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(long, env = "KEYSTILE_CLIENT_KEY", global = true, requires = "client_cert", help_heading = "Connection")]
    pub client_key: Option<PathBuf>,
    /// Allow sending a key over plaintext to a server that is not on this
    /// machine.
    #[arg(long, global = true, help_heading = "Connection")]
    pub insecure: bool,
}

impl ServerArgs {
    /// The server URL with its scheme (`host:port` means `http://`).
    pub fn url(&self) -> String {
        let s = self.server.trim();
        if s.contains("://") { s.to_string() } else { format!("http://{s}") }
    }

    /// Connects; over TLS for `https://`. With `sends_secret`, refuses a
    /// plaintext server that is not on loopback unless `--insecure`.
    pub async fn connect(&self, sends_secret: bool) -> Result<Channel, CliError> {
        let url = self.url();
        let endpoint = Endpoint::from_shared(url.clone()).map_err(|_| {
            CliError::usage(format!("--server {:?} is not a URL like http://127.0.0.1:50051", self.server))
        })?;
        let uri = endpoint.uri().clone();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(CliError::usage(format!("--server {:?}: the scheme must be http or https", self.server))),
        };
        if !tls && (self.ca_file.is_some() || self.client_cert.is_some()) {
            return Err(CliError::usage("--ca-file and --client-cert are for https:// servers; this one is http://"));
        }
        if !tls && sends_secret && !self.insecure && !is_loopback(uri.host().unwrap_or_default()) {
            return Err(CliError::usage(format!(
                "refusing to send a key in plaintext to {url}: use https:// (with --ca-file if needed), \
                 or --insecure if the network is trusted"
            )));
        }
        let mut endpoint =
            endpoint.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(30)).tcp_nodelay(true);
        if tls {
            let mut config = ClientTlsConfig::new().with_native_roots();
            let read = |flag: &str, path: &PathBuf| {
                std::fs::read(path).map_err(|e| CliError::usage(format!("--{flag} {}: {e}", path.display())))
            };
            if let Some(path) = &self.ca_file {
                config = config.ca_certificate(Certificate::from_pem(read("ca-file", path)?));
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                config = config.identity(Identity::from_pem(read("client-cert", cert)?, read("client-key", key)?));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| CliError::usage(format!("TLS settings for {url}: {}", chain(&e))))?;
        }
        endpoint.connect().await.map_err(|e| CliError::unavailable(format!("cannot reach {url}: {}", chain(&e))))
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The deployment's pepper, from exactly one of a file or the variable
/// (`keys bootstrap`, `signing-keys`).
pub fn deployment_pepper(
    file: Option<&std::path::Path>,
    hex: Option<&keystile::secret::Secret>,
) -> Result<keystile::key::Pepper, CliError> {
    match (file, hex) {
        (Some(path), None) => keystile::config::read_pepper(&path.to_path_buf()).map_err(CliError::usage),
        (None, Some(hex)) => {
            keystile::key::Pepper::parse_hex(hex.expose()).map_err(|e| CliError::usage(format!("KEYSTILE_PEPPER: {e}")))
        }
        _ => Err(CliError::usage("give the deployment's pepper by exactly one of --pepper-file or KEYSTILE_PEPPER")),
    }
}

/// The deployment's Redis, opened for a command that writes to it
/// directly; `what` says what lives there, for the error without Redis.
/// Returns the store and a description of where it is (never a password).
pub fn deployment_store(
    redis: &keystile::config::RedisArgs,
    what: &str,
) -> Result<(std::sync::Arc<dyn keystile::store::KeyStore>, String), CliError> {
    use keystile::store::StoreConfig;
    let mut problems = Vec::new();
    let store = redis.store(Duration::from_secs(5), &mut problems);
    let where_ = match &store {
        StoreConfig::Redis { topology, .. } if problems.is_empty() => topology.describe(),
        StoreConfig::Memory if problems.is_empty() => {
            return Err(CliError::usage(format!(
                "{what} the deployment's Redis: give --redis-url, --redis-sentinel or --redis-cluster"
            )));
        }
        _ => return Err(CliError::usage(problems.join("; "))),
    };
    let opened = store.open().map_err(|e| CliError::usage(format!("Redis at {where_}: {e}")))?;
    Ok((opened, where_))
}

/// A key given on the command line: `-` reads it from stdin (so that it
/// stays out of the process list).
pub fn key_argument(key: &keystile::secret::Secret) -> Result<String, CliError> {
    if key.expose() != "-" {
        return Ok(key.expose().to_string());
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| CliError::usage(format!("reading the key from stdin: {e}")))?;
    Ok(line.trim().to_string())
}

/// The interceptor every KeyAdmin client of the CLI sends its admin key with.
pub type AdminAuth = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;

/// A KeyAdmin client on `channel` that sends `bearer` with every call.
pub fn admin_client(
    channel: Channel,
    bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
) -> keystile::proto::key_admin_client::KeyAdminClient<
    tonic::service::interceptor::InterceptedService<Channel, AdminAuth>,
> {
    let auth: AdminAuth = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    keystile::proto::key_admin_client::KeyAdminClient::with_interceptor(channel, auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_address_is_plaintext_http() {
        let args = |s: &str| ServerArgs {
            server: s.into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            insecure: false,
        };
        assert_eq!(args("127.0.0.1:50051").url(), "http://127.0.0.1:50051");
        assert_eq!(args("https://keystile:443").url(), "https://keystile:443");
        assert!(is_loopback("localhost") && is_loopback("[::1]") && is_loopback("127.0.0.2"));
        assert!(!is_loopback("192.0.2.1") && !is_loopback("keystile"));
    }
}
