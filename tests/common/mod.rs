//! Test harness: a real `redis-server` on a free loopback port, and a real
//! keystile server on a real socket, reached through generated tonic
//! clients.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystile::app::App;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::{Pepper, PepperSet};
use keystile::proto;
use keystile::proto::key_admin_client::KeyAdminClient;
use keystile::proto::verifier_client::VerifierClient;
use keystile::server::{self, ServerOptions};
use keystile::store::KeyStore;
use serde_json::Value;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` of the test's own, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Arguments beyond the harness's own (TLS, replication).
    extra: Vec<String>,
    /// A sentinel's configuration file, when this is a sentinel.
    sentinel: Option<String>,
    /// `requirepass`, when set.
    password: Option<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A data node with more arguments, e.g. `--tls-port` or `--replicaof`.
    /// The harness still talks to it in plaintext on `port`.
    pub fn start_with(extra: &[String]) -> RedisServer {
        Self::start_authed(extra, None)
    }

    /// A data node that wants `password` (also as `masterauth`, for a
    /// replica of a node that wants the same).
    pub fn start_authed(extra: &[String], password: Option<&str>) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut extra = extra.to_vec();
        if let Some(p) = password {
            extra.extend(["--requirepass", p, "--masterauth", p].map(String::from));
        }
        let cluster = extra.iter().any(|a| a == "--cluster-enabled");
        let mut server =
            RedisServer { port: 0, dir, child: None, extra, sentinel: None, password: password.map(String::from) };
        // A port free when chosen can be taken before redis-server binds it
        // (and a cluster node also needs port + 10000 for its bus): a node
        // that exits at once is started again on another port.
        for _ in 0..5 {
            server.port = loop {
                let port = free_port();
                if !cluster || (port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()) {
                    break port;
                }
            };
            if server.try_launch() {
                return server;
            }
        }
        panic!("redis-server did not start on five free ports");
    }

    /// A sentinel watching `master` at `host:port` under `name`, with a
    /// quorum of `quorum` and a one-second down-after.
    pub fn start_sentinel(name: &str, master_port: u16, quorum: u32) -> RedisServer {
        Self::start_sentinel_authed(name, master_port, quorum, None, None)
    }

    /// A sentinel that logs into the data nodes with `data_password` and
    /// wants `own_password` from its own clients.
    pub fn start_sentinel_authed(
        name: &str,
        master_port: u16,
        quorum: u32,
        data_password: Option<&str>,
        own_password: Option<&str>,
    ) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut conf = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\nsentinel resolve-hostnames no\n\
             sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 5000\n"
        );
        if let Some(p) = data_password {
            conf.push_str(&format!("sentinel auth-pass {name} {p}\n"));
        }
        if let Some(p) = own_password {
            conf.push_str(&format!("requirepass {p}\n"));
        }
        let path = dir.path().join("sentinel.conf");
        std::fs::write(&path, conf).unwrap();
        let mut server = RedisServer {
            port,
            dir,
            child: None,
            extra: Vec::new(),
            sentinel: Some(path.to_str().unwrap().to_string()),
            password: own_password.map(String::from),
        };
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn launch(&mut self) {
        assert!(self.try_launch(), "redis-server did not start on port {}", self.port);
    }

    /// Starts redis-server on `port`; false when it exited at once (the
    /// port was taken).
    fn try_launch(&mut self) -> bool {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut command = Command::new(&bin);
        match &self.sentinel {
            Some(conf) => {
                command.args([conf.as_str(), "--sentinel"]);
            }
            None => {
                command
                    .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(self.dir.path())
                    .args(["--dbfilename", "dump.rdb", "--protected-mode", "no"])
                    .args(&self.extra);
            }
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e} (install redis-server)"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return true;
            }
            let exited = self.child.as_mut().is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_some()));
            if exited || Instant::now() >= deadline {
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }

    /// Saves the data set and stops the server (connections are refused).
    pub fn stop(&mut self) {
        let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").arg("SAVE").query(&mut self.conn());
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the saved data.
    pub fn restart(&mut self) {
        self.launch();
    }

    /// Calls of one command since start (from INFO commandstats).
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut self.conn()).unwrap();
        info.lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter_map(|l| {
                let (name, rest) = l.split_once(':')?;
                let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
                Some((name.to_string(), calls))
            })
            .collect()
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn test_pepper() -> PepperSet {
    PepperSet::single(Pepper::parse(&[42u8; 32]).unwrap())
}

/// A keystile server on a real loopback socket.
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin_key: String,
    pub app: Arc<App>,
    pub clock: Clock,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(store: Arc<dyn KeyStore>) -> TestServer {
        Self::start_with(store, EngineSettings::new(test_pepper()), ServerOptions::default(), Clock::system()).await
    }

    pub async fn start_with(
        store: Arc<dyn KeyStore>,
        settings: EngineSettings,
        options: ServerOptions,
        clock: Clock,
    ) -> TestServer {
        let app = Arc::new(App::build(settings, store, clock.clone()));
        let admin = app.mint_admin_key("test admin").await.expect("the store takes the admin key");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn({
            let app = app.clone();
            async move {
                server::serve(app, options, listener, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            }
        });
        let server = TestServer {
            addr,
            admin_key: admin.key.expose().to_string(),
            app,
            clock,
            shutdown: Some(tx),
            task: Some(task),
        };
        server.wait_ready().await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.unwrap()
    }

    pub async fn verifier(&self) -> VerifierClient<Channel> {
        VerifierClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminClient {
        admin_client(self.channel().await, &self.admin_key)
    }

    /// Waits until health says SERVING.
    pub async fn wait_ready(&self) {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
            if status.is_ok_and(|s| {
                s.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            }) {
                return;
            }
            assert!(Instant::now() < deadline, "the server never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

type Auth = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

pub type AdminClient = KeyAdminClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

pub fn admin_client(channel: Channel, key: &str) -> AdminClient {
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    let f: Auth = Box::new(move |mut req| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    KeyAdminClient::with_interceptor(channel, f)
}
pub fn verify_req(key: &str) -> proto::VerifyRequest {
    proto::VerifyRequest { key: key.to_string(), ..Default::default() }
}

pub fn create_req(name: &str) -> proto::CreateKeyRequest {
    proto::CreateKeyRequest { name: name.into(), env: "live".into(), ..Default::default() }
}

/// Creates a key through KeyAdmin and returns (full key, record).
pub async fn create(admin: &mut AdminClient, req: proto::CreateKeyRequest) -> (String, proto::KeyRecord) {
    let resp = admin.create_key(req).await.expect("CreateKey").into_inner();
    (resp.key, resp.record.unwrap())
}

pub async fn verify(client: &mut VerifierClient<Channel>, req: proto::VerifyRequest) -> proto::VerifyResponse {
    client.verify(req).await.expect("Verify answers").into_inner()
}

/// Verifies `req` until the answer is `want`, failing with `what` after a
/// second (the cross-replica bound of README, "Storage, cache and
/// revocation").
pub async fn until_code(
    client: &mut VerifierClient<Channel>,
    req: proto::VerifyRequest,
    want: proto::Code,
    what: &str,
) {
    let t0 = std::time::Instant::now();
    while code(&verify(client, req.clone()).await) != want {
        assert!(t0.elapsed() < Duration::from_secs(1), "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn code(resp: &proto::VerifyResponse) -> proto::Code {
    proto::Code::try_from(resp.code).unwrap()
}

/// The `keystile` binary, for tests that run it as operators do.
pub const BIN: &str = env!("CARGO_BIN_EXE_keystile");

pub struct Sidecar {
    pub child: Child,
    pub port: u16,
    pub admin_key: String,
}

impl Sidecar {
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Sidecar {
        let port = free_port();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .envs(envs.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut admin_key = String::new();
        if args.contains(&"--dev") {
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
            admin_key = line.trim().strip_prefix("KEYSTILE_ADMIN_KEY=").expect("the dev line").to_string();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "keystile did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sidecar { child, port, admin_key }
    }

    pub fn server(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until health says SERVING (the store answers, the feed is live).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(channel) = Channel::from_shared(self.server()).unwrap().connect().await {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
                if status.is_ok_and(|s| {
                    s.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                }) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the sidecar never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn keys(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("keys")
            .args(args)
            .env("KEYSTILE_ADMIN_KEY", &self.admin_key)
            .env("KEYSTILE_SERVER", self.server())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn keys_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.keys(&all);
        assert!(out.status.success(), "keys {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// SIGTERM, then the exit code and what was left on stdout.
    pub fn terminate(mut self) -> (Option<i32>, String) {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_string(&mut rest).unwrap();
        }
        (status.code(), rest)
    }
}

/// A test that fails half-way leaves no server behind.
impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files: (ca, server cert, server key, client cert, client key).
pub fn certificates(dir: &std::path::Path) -> (String, String, String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    // Distinct subjects: OpenSSL (Redis) takes a certificate whose subject
    // is its issuer's for self-signed.
    let named = |names: Vec<String>, cn: &str| {
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p
    };
    let mut ca = named(Vec::new(), "keystile test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let server = named(server_names, "127.0.0.1").signed_by(&server_key, &ca).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = named(vec!["operator".into()], "operator").signed_by(&client_key, &ca).unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_string()
    };
    (
        write("ca.pem", ca.pem()),
        write("server.pem", server.pem()),
        write("server.key", server_key.serialize_pem()),
        write("client.pem", client.pem()),
        write("client.key", client_key.serialize_pem()),
    )
}

/// A named limit as the API takes it, from `NAME=REQUESTS/WINDOW[:BURST][@tenant][,auto]`.
pub fn limit(spec: &str) -> proto::LimitSpec {
    keystile::service::admin::limit_to_proto(&spec.parse().expect("a limit spec"))
}

/// What a fleet run saw: VALID answers per replica, and per caller the
/// `x-ratelimit-remaining` values in the order it was answered.
pub struct FleetRun {
    pub valid: Vec<u64>,
    pub remaining: Vec<Vec<u64>>,
    pub other: u64,
}

/// Sends `total` Verify calls for `key`, split over `clients` by `weights`
/// (in percent), each replica from 4 concurrent callers.
pub async fn drive(clients: &[VerifierClient<Channel>], key: &str, weights: &[u32], total: u32) -> FleetRun {
    let mut tasks = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let mine = total * weights[i] / 100;
        for w in 0..4u32 {
            let mut client = client.clone();
            let key = key.to_string();
            let n = mine / 4 + u32::from(w < mine % 4);
            tasks.push((
                i,
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut valid = 0u64;
                    let mut other = 0u64;
                    for _ in 0..n {
                        let r = client.verify(verify_req(&key)).await.expect("Verify answers").into_inner();
                        match code(&r) {
                            proto::Code::Valid => valid += 1,
                            proto::Code::RateLimited => {}
                            _ => other += 1,
                        }
                        if let Some(rem) = r.headers.get("x-ratelimit-remaining") {
                            seen.push(rem.parse::<u64>().unwrap());
                        }
                    }
                    (valid, other, seen)
                }),
            ));
        }
    }
    let mut run = FleetRun { valid: vec![0; clients.len()], remaining: Vec::new(), other: 0 };
    for (i, t) in tasks {
        let (valid, other, seen) = t.await.unwrap();
        run.valid[i] += valid;
        run.other += other;
        run.remaining.push(seen);
    }
    run
}

/// One HTTP/1.1 exchange over a real socket (then close): the status,
/// headers (names lower case, in order) and body (de-chunked).
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// Every value of header `name` (lower case).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpReply {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n.min(after.len())]);
            rest = after.get(n + 2..).unwrap_or("");
        }
        out
    } else {
        body.to_string()
    };
    HttpReply { status, headers, body }
}

/// Waits until the server's known-key filter is loaded (unknown key_ids
/// are then answered without the store).
pub async fn wait_known_keys(s: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.app.records.known_keys_ready() {
        assert!(Instant::now() < deadline, "the known key_ids never loaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `key` (just created on another replica) is known to every
/// client's sidecar: the change feed announces it within milliseconds,
/// and until then an unknown key_id is NOT_FOUND. Asks with a scope no key
/// holds, so no limit is counted.
pub async fn wait_known_everywhere(clients: &[VerifierClient<Channel>], key: &str) {
    for client in clients {
        let mut c = client.clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let req = proto::VerifyRequest { scopes: vec!["probe:never-granted".into()], ..verify_req(key) };
            let code = proto::Code::try_from(c.verify(req).await.expect("Verify answers").into_inner().code).unwrap();
            if code != proto::Code::NotFound {
                break;
            }
            assert!(Instant::now() < deadline, "the key never became known");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The sorted names of process `pid`'s (`self` for this one) threads that
/// serve per-core runtimes beyond the first (README, "Runtime").
pub fn core_threads(pid: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("ks-core-"))
        .collect();
    names.sort();
    names
}
