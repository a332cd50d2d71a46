//! `keystile bench`: a gRPC load generator for the sidecar.
//!
//! Closed loop (`--concurrency` callers, each waiting for its answer) or open
//! loop (`--rate` requests per second, latency counted from when a request
//! was due, so a stalled server is not hidden). Several HTTP/2 connections,
//! an HDR histogram, and every non-OK grpc-status (or an unexpected verdict)
//! counted as an error. Scenarios run back to back with the same settings
//! against the same server, so `Verify / Health` is a ratio from one run.
//!
//! Without `--server` it starts a server in this process on its own runtime
//! threads (memory store, or `--redis-url`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use keystile::app::App;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::{Env, KeyFormat, Pepper, PepperSet, generate};
use keystile::proto;
use keystile::proto::key_admin_client::KeyAdminClient;
use keystile::server::{self, ServerOptions};
use keystile::store::KeyStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// grpc.health.v1.Health/Check: the empty-handler baseline.
    Health,
    /// Verify with valid keys, all cached (cycles over --keys keys).
    Hit,
    /// Verify with keys the server has never seen: forged key_ids, answered
    /// by the known-key filter once it is loaded (no store read).
    Miss,
    /// Verify with malformed keys: rejected before cache or store.
    Malformed,
    /// 90 % hits, 5 % malformed, 5 % unknown key_ids.
    Mix,
    /// Verify with forged keys: well-formed, a fresh random key_id each,
    /// no IP (never shed): NOT_FOUND, from the known-key filter once it is
    /// loaded. Not in the default list.
    Forged,
}

/// What the keys of the scenarios look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// One scope, no allowlist, no rate limit (a short answer).
    Simple,
    /// Two scopes, a two-CIDR allowlist and a rate limit, asked from an
    /// allowed address: the answer carries every rate-limit header, as in
    /// real use.
    Realistic,
    /// As realistic, with three named limits (per minute, hour and
    /// second), all named by each request: the largest answer.
    ThreeLimits,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Server to load (http://host:port). Without it, a server is started
    /// in this process.
    #[arg(long)]
    pub server: Option<String>,
    /// The keys' shape: simple, or realistic (scopes, allowlist, rate limit).
    #[arg(long, value_enum, default_value = "simple")]
    pub profile: Profile,
    /// PEM file of the CA that signed an https:// --server's certificate.
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Allow sending the admin key over plaintext to a --server that is not
    /// on this machine.
    #[arg(long)]
    pub insecure: bool,
    /// Admin key of --server, to create the keys the scenarios use.
    #[arg(long, env = "KEYSTILE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<keystile::secret::Secret>,
    /// Redis for the in-process server (default: memory store).
    #[arg(long)]
    pub redis_url: Option<keystile::secret::RedisUrl>,
    /// Runtime threads of the in-process server.
    #[arg(long)]
    pub server_workers: Option<usize>,
    /// The process id of --server, to report its CPU time per call (read
    /// from /proc; the in-process server's is read from its own threads).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Scenarios, run in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "health,hit,malformed,mix,miss")]
    pub scenario: Vec<Scenario>,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Callers in flight (closed loop), or the cap on requests in flight
    /// (open loop).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Open loop: requests per second. Unset: closed loop.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Measured time per scenario.
    #[arg(long, default_value = "5s")]
    pub duration: String,
    /// Unmeasured time per scenario before it.
    #[arg(long, default_value = "1s")]
    pub warmup: String,
    /// Distinct keys for `hit` (and for `miss`: its most requests).
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Run the scenario list this many times, alternating, and report the
    /// median of each (the ratio too): shared machines are noisy.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// The `ip` of the forged scenario's requests: `none`, `random-v4`,
    /// `random-v6`, `random-port` (a random IPv4 with a port) or one
    /// address for all of them (shed once it has failed too often).
    #[arg(long, default_value = "none", value_parser = parse_forged_ip)]
    pub forged_ip: ForgedIp,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// A few seconds with small settings; fails on any error.
    #[arg(long)]
    pub smoke: bool,
}

/// One scenario's outcome.
#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: Scenario,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub histogram: Histogram<u64>,
    /// The server's CPU time (user and system) per call over the measured
    /// time, when it can be read.
    pub server_cpu_us: Option<f64>,
}

/// Where the server's CPU time is read (Linux's /proc, in clock ticks of
/// 10 ms): the threads of this process that run the in-process server, or
/// the process given by --server-pid.
enum ServerCpu {
    Threads(&'static str),
    Process(u32),
    Unknown,
}

/// The name of the in-process server's runtime threads.
const SERVER_THREADS: &str = "keystile-server";

impl ServerCpu {
    /// User and system time so far, in microseconds.
    fn micros(&self) -> Option<u64> {
        // utime and stime: the 14th and 15th fields, counted after the
        // command name (which may hold spaces, but ends with ')').
        let ticks = |stat: &str| -> Option<u64> {
            let mut f = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
            Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
        };
        // Linux reports /proc times in USER_HZ, 100 on x86-64 and arm64.
        // CPU time of threads that ended during the run is not counted.
        const MICROS_PER_TICK: u64 = 10_000;
        match self {
            ServerCpu::Process(pid) => {
                Some(ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)? * MICROS_PER_TICK)
            }
            ServerCpu::Threads(name) => {
                let mut total = 0;
                for task in std::fs::read_dir("/proc/self/task").ok()? {
                    let path = task.ok()?.path();
                    let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                    if comm.trim_end() == *name {
                        total += ticks(&std::fs::read_to_string(path.join("stat")).unwrap_or_default()).unwrap_or(0);
                    }
                }
                Some(total * MICROS_PER_TICK)
            }
            ServerCpu::Unknown => None,
        }
    }
}

impl Report {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    fn micros(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "scenario": format!("{:?}", self.scenario).to_lowercase(),
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.seconds,
            "rps": self.rps(),
            "p50_us": self.micros(0.5),
            "p90_us": self.micros(0.9),
            "p99_us": self.micros(0.99),
            "p999_us": self.micros(0.999),
            "max_us": self.histogram.max() as f64 / 1000.0,
            "server_cpu_us_per_call": self.server_cpu_us,
        })
    }
}

/// Where the forged scenario's requests say they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForgedIp {
    None,
    RandomV4,
    RandomV6,
    RandomPort,
    Fixed(std::net::IpAddr),
}

fn parse_forged_ip(s: &str) -> Result<ForgedIp, String> {
    Ok(match s {
        "none" => ForgedIp::None,
        "random-v4" => ForgedIp::RandomV4,
        "random-v6" => ForgedIp::RandomV6,
        "random-port" => ForgedIp::RandomPort,
        other => ForgedIp::Fixed(
            other
                .parse()
                .map_err(|_| format!("{other:?} is none, random-v4, random-v6, random-port or an IP address"))?,
        ),
    })
}

impl ForgedIp {
    /// The `i`-th request's address: distinct for every request (a mix of
    /// `i`'s bits) unless fixed.
    fn nth(&self, i: usize) -> String {
        let mut x = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let v4 = std::net::Ipv4Addr::from((x as u32) | 0x0100_0000);
        match self {
            ForgedIp::None => String::new(),
            ForgedIp::RandomV4 => v4.to_string(),
            ForgedIp::RandomV6 => std::net::Ipv6Addr::from(((x as u128) << 64) | 0x2001_0db8 << 96 | 1).to_string(),
            ForgedIp::RandomPort => format!("{v4}:{}", 1024 + (x >> 48) % 60_000),
            ForgedIp::Fixed(ip) => ip.to_string(),
        }
    }
}

struct Workload {
    hit: Vec<String>,
    miss: Vec<String>,
    malformed: Vec<String>,
    unknown: Vec<String>,
    /// The address requests come from (the realistic profile's allowlist).
    ip: String,
    /// The limits each Verify names (the three-limits profile's).
    limits: Vec<String>,
    forged_ip: ForgedIp,
    next_miss: AtomicUsize,
}

enum Target {
    Health(HealthClient<Channel>),
    Verify(tonic::client::Grpc<Channel>),
}

/// The one field of `VerifyResponse` the generator reads. Decoding only
/// `code` (prost skips the rest) keeps the client's cost per call close to
/// that of a Health/Check answer, so that a loaded client does not pace the
/// server differently in the two scenarios.
#[derive(Clone, PartialEq, prost::Message)]
struct VerifyCode {
    #[prost(int32, tag = "2")]
    code: i32,
}

async fn call_verify(grpc: &mut tonic::client::Grpc<Channel>, req: proto::VerifyRequest) -> Result<i32, tonic::Status> {
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<proto::VerifyRequest, VerifyCode>::default();
    let path = http::uri::PathAndQuery::from_static("/keystile.v1.Verifier/Verify");
    grpc.unary(tonic::Request::new(req), path, codec).await.map(|r| r.into_inner().code)
}

pub async fn run(args: BenchArgs) -> Result<Vec<Report>, String> {
    let (mut duration, mut warmup) = (parse(&args.duration)?, parse(&args.warmup)?);
    let (mut connections, mut concurrency, mut keys) =
        (args.connections.max(1), args.concurrency.max(1), args.keys.max(1));
    if args.smoke {
        (duration, warmup, connections, concurrency, keys) =
            (Duration::from_millis(700), Duration::from_millis(200), 2, 8, 200);
    }

    if args.server.is_none() && args.server_pid.is_some() {
        return Err("--server-pid is for a --server; the in-process server's CPU is read from its own threads".into());
    }
    let cpu = match (&args.server, args.server_pid) {
        (None, _) => ServerCpu::Threads(SERVER_THREADS),
        (Some(_), Some(pid)) => ServerCpu::Process(pid),
        (Some(_), None) => ServerCpu::Unknown,
    };
    let mut _local = LocalServer(None);
    let (url, admin_key) = match &args.server {
        Some(url) => (
            url.clone(),
            args.admin_key
                .as_ref()
                .map(|k| k.expose().to_string())
                .ok_or("--server needs --admin-key (or KEYSTILE_ADMIN_KEY)")?,
        ),
        None => {
            let (rt, url, key) = start_local(args.redis_url.as_ref().map(|u| u.expose()), args.server_workers).await?;
            _local.0 = Some(rt);
            (url, key)
        }
    };
    // TLS when the URL says https; the admin key goes in plaintext only to
    // loopback unless --insecure.
    let target = super::ServerArgs {
        server: url.clone(),
        ca_file: args.ca_file.clone(),
        client_cert: None,
        client_key: None,
        insecure: args.insecure,
    };
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(target.connect(true).await.map_err(|e| e.message)?);
    }

    let needs_miss = args.scenario.contains(&Scenario::Miss);
    let workload = Arc::new(Workload {
        forged_ip: args.forged_ip.clone(),
        ..prepare(&channels[0], &admin_key, keys, if needs_miss { keys } else { 0 }, args.profile).await?
    });
    let mut reports = Vec::new();
    let rounds = if args.smoke { 1 } else { args.rounds.max(1) };
    for _ in 0..rounds {
        for &scenario in &args.scenario {
            let settings = Settings { duration, warmup, concurrency, rate: args.rate };
            let report = run_scenario(scenario, &channels, &workload, settings, &cpu).await;
            if !args.json {
                print_line(&report);
            }
            reports.push(report);
            if scenario == Scenario::Miss {
                // Fresh keys are used up once: later rounds would have none.
                workload.next_miss.store(usize::MAX / 2, Ordering::Relaxed);
            }
        }
    }
    let median_rps = |s: Scenario| {
        let mut v: Vec<f64> = reports.iter().filter(|r| r.scenario == s && r.requests > 0).map(Report::rps).collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let median_cpu = |s: Scenario| {
        let mut v: Vec<f64> = reports.iter().filter(|r| r.scenario == s).filter_map(|r| r.server_cpu_us).collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let ratio = median_rps(Scenario::Hit).zip(median_rps(Scenario::Health)).map(|(h, b)| h / b);
    if args.json {
        let medians: serde_json::Map<String, serde_json::Value> = args
            .scenario
            .iter()
            .filter_map(|&s| median_rps(s).map(|m| (format!("{s:?}").to_lowercase(), json!(m))))
            .collect();
        let out = json!({
            "server": url,
            "connections": connections,
            "concurrency": concurrency,
            "rate": args.rate,
            "rounds": rounds,
            "duration_seconds": duration.as_secs_f64(),
            "scenarios": reports.iter().map(Report::to_json).collect::<Vec<_>>(),
            "median_rps": medians,
            "median_server_cpu_us_per_call": args
                .scenario
                .iter()
                .filter_map(|&s| median_cpu(s).map(|m| (format!("{s:?}").to_lowercase(), json!(m))))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
            "verify_hit_over_health": ratio,
        });
        println!("{out}");
    } else {
        if rounds > 1 {
            for &s in &args.scenario {
                if let Some(m) = median_rps(s) {
                    let cpu = median_cpu(s).map_or("-".to_string(), |c| format!("{c:.1}"));
                    println!(
                        "median {:<10} {m:>10.0} req/s  server CPU {cpu:>5} µs/call",
                        format!("{s:?}").to_lowercase()
                    );
                }
            }
        }
        if let Some(r) = ratio {
            println!("verify hit / health baseline: {:.1} %", r * 100.0);
        }
    }
    Ok(reports)
}

/// The in-process server's runtime; stopped without blocking, since it is
/// dropped inside the client's runtime.
struct LocalServer(Option<tokio::runtime::Runtime>);

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// A server on its own runtime threads, so that it does not share a
/// scheduler with the load it is measured under.
async fn start_local(
    redis_url: Option<&str>,
    workers: Option<usize>,
) -> Result<(tokio::runtime::Runtime, String, String), String> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.unwrap_or((cpus / 2).max(1)))
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let redis_url = redis_url.map(str::to_string);
    let (url, key) = rt
        .spawn(async move {
            let store: Arc<dyn KeyStore> = match redis_url {
                Some(u) => Arc::new(
                    keystile::store::redis::RedisStore::open(&u, "keystile-bench", Duration::from_secs(1))
                        .map_err(|e| e.to_string())?,
                ),
                None => Arc::new(keystile::store::memory::MemoryStore::new()),
            };
            let app =
                Arc::new(App::build(EngineSettings::new(PepperSet::single(Pepper::random())), store, Clock::system()));
            let minted = app.mint_admin_key("bench admin").await.map_err(|e| e.to_string())?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            tokio::spawn(server::serve(app, ServerOptions::default(), listener, std::future::pending()));
            Ok::<_, String>((format!("http://{addr}"), minted.key.expose().to_string()))
        })
        .await
        .map_err(|e| e.to_string())??;
    Ok((rt, url, key))
}

async fn prepare(
    channel: &Channel,
    admin_key: &str,
    hits: usize,
    misses: usize,
    profile: Profile,
) -> Result<Workload, String> {
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {admin_key}").parse().map_err(|_| "bad admin key")?;
    let admin = KeyAdminClient::with_interceptor(channel.clone(), move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    let create = |name: String| {
        let mut admin = admin.clone();
        async move {
            let mut req =
                proto::CreateKeyRequest { name, env: "live".into(), scopes: vec!["read".into()], ..Default::default() };
            if profile != Profile::Simple {
                req.scopes.push("write".into());
                req.ip_allowlist = vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()];
                req.rate_limit =
                    Some(proto::RateLimit { requests: 1_000_000_000, window_seconds: 1, burst: 0, per_tenant: false });
                if profile == Profile::ThreeLimits {
                    req.limits = ["api=1000000000/1m", "export=1000000000/1h", "burst=1000000000/1s"]
                        .iter()
                        .map(|l| keystile::service::admin::limit_to_proto(&l.parse().expect("a limit spec")))
                        .collect();
                }
            }
            admin.create_key(req).await.map(|r| r.into_inner().key).map_err(|e| format!("creating bench keys: {e}"))
        }
    };
    let mut hit = Vec::with_capacity(hits);
    let mut miss = Vec::with_capacity(misses);
    for chunk in (0..hits + misses).collect::<Vec<_>>().chunks(64) {
        let made = futures_join(chunk.iter().map(|i| create(format!("bench {i}")))).await;
        for (i, key) in chunk.iter().zip(made) {
            if *i < hits { hit.push(key?) } else { miss.push(key?) }
        }
    }
    let format = KeyFormat::default();
    let malformed = (0..64)
        .map(|i| {
            let mut k = generate(&format, Env::Live).key.into_exposed().into_bytes();
            let at = 10 + i % 40;
            k[at] = if k[at] == b'x' { b'y' } else { b'x' };
            String::from_utf8(k).unwrap_or_default()
        })
        .collect();
    let unknown = (0..64).map(|_| generate(&format, Env::Live).key.into_exposed()).collect();
    let ip = if profile == Profile::Simple { String::new() } else { "10.1.2.3".to_string() };
    let limits = match profile {
        Profile::ThreeLimits => vec!["api".into(), "export".into(), "burst".into()],
        _ => Vec::new(),
    };
    Ok(Workload {
        hit,
        miss,
        malformed,
        unknown,
        ip,
        limits,
        forged_ip: ForgedIp::None,
        next_miss: AtomicUsize::new(0),
    })
}

async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a bench setup task panicked"));
    }
    out
}

#[derive(Clone, Copy)]
struct Settings {
    duration: Duration,
    warmup: Duration,
    concurrency: usize,
    rate: Option<u64>,
}

/// Sends the `i`-th request of a scenario. `Ok(false)` = an answer that
/// the scenario did not expect; `Err` = the scenario has run out of input.
async fn one(target: &mut Target, scenario: Scenario, w: &Workload, i: usize) -> Result<bool, ()> {
    let verify = |key: &str| proto::VerifyRequest {
        key: key.to_string(),
        ip: w.ip.clone(),
        scopes: vec!["read".into()],
        limits: w.limits.clone(),
        ..Default::default()
    };
    // Failing keys come from no address: from the profile's one address
    // they would soon have it shed, and the scenarios after this one with it.
    let failing = |key: &str| proto::VerifyRequest { ip: String::new(), ..verify(key) };
    match target {
        Target::Health(c) => Ok(c.check(HealthCheckRequest { service: String::new() }).await.is_ok()),
        Target::Verify(c) => {
            let (req, expect) = match scenario {
                Scenario::Hit => (verify(&w.hit[i % w.hit.len()]), Some(proto::Code::Valid)),
                Scenario::Malformed => (failing(&w.malformed[i % w.malformed.len()]), Some(proto::Code::Malformed)),
                Scenario::Miss => {
                    let n = w.next_miss.fetch_add(1, Ordering::Relaxed);
                    (verify(w.miss.get(n).ok_or(())?), Some(proto::Code::Valid))
                }
                Scenario::Forged => {
                    let forged =
                        keystile::key::generate(&keystile::key::KeyFormat::default(), keystile::key::Env::Live);
                    let req = proto::VerifyRequest {
                        key: forged.key.into_exposed(),
                        ip: w.forged_ip.nth(i),
                        ..Default::default()
                    };
                    // From one address, shed once it has failed too often.
                    let expect = match w.forged_ip {
                        ForgedIp::Fixed(_) => None,
                        _ => Some(proto::Code::NotFound),
                    };
                    (req, expect)
                }
                Scenario::Mix => match i % 20 {
                    0 => (failing(&w.malformed[i % w.malformed.len()]), None),
                    1 => (failing(&w.unknown[i % w.unknown.len()]), None),
                    _ => (verify(&w.hit[i % w.hit.len()]), None),
                },
                Scenario::Health => unreachable!("health has its own client"),
            };
            match call_verify(c, req).await {
                Ok(code) => Ok(expect.is_none_or(|e| code == e as i32)),
                Err(_) => Ok(false),
            }
        }
    }
}

fn target(scenario: Scenario, channel: &Channel) -> Target {
    match scenario {
        Scenario::Health => Target::Health(HealthClient::new(channel.clone())),
        _ => Target::Verify(tonic::client::Grpc::new(channel.clone())),
    }
}

async fn run_scenario(
    scenario: Scenario,
    channels: &[Channel],
    w: &Arc<Workload>,
    s: Settings,
    cpu: &ServerCpu,
) -> Report {
    let counter = Arc::new(AtomicUsize::new(0));
    if scenario != Scenario::Miss && !s.warmup.is_zero() {
        closed_loop(scenario, channels, w, s.concurrency, s.warmup, &counter).await;
    }
    let (started, cpu_before) = (Instant::now(), cpu.micros());
    let (histogram, errors) = match s.rate {
        None => closed_loop(scenario, channels, w, s.concurrency, s.duration, &counter).await,
        Some(rate) => open_loop(scenario, channels, w, s.concurrency, s.duration, rate).await,
    };
    let seconds = started.elapsed().as_secs_f64();
    let server_cpu_us = cpu_before
        .zip(cpu.micros())
        .filter(|_| !histogram.is_empty())
        .map(|(before, after)| after.saturating_sub(before) as f64 / histogram.len() as f64);
    Report { scenario, requests: histogram.len(), errors, seconds, histogram, server_cpu_us }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s in nanoseconds, 3 significant digits.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

async fn closed_loop(
    scenario: Scenario,
    channels: &[Channel],
    w: &Arc<Workload>,
    concurrency: usize,
    duration: Duration,
    counter: &Arc<AtomicUsize>,
) -> (Histogram<u64>, u64) {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let mut target = target(scenario, &channels[t % channels.len()]);
            let (w, counter) = (w.clone(), counter.clone());
            tokio::spawn(async move {
                let mut h = new_histogram();
                let mut errors = 0;
                while Instant::now() < deadline {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    match one(&mut target, scenario, &w, i).await {
                        Ok(ok) => {
                            h.saturating_record(t0.elapsed().as_nanos() as u64);
                            errors += u64::from(!ok);
                        }
                        Err(()) => break,
                    }
                }
                (h, errors)
            })
        })
        .collect();
    let mut total = new_histogram();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await.expect("a load task panicked");
        total.add(h).expect("same bounds");
        errors += e;
    }
    (total, errors)
}

async fn open_loop(
    scenario: Scenario,
    channels: &[Channel],
    w: &Arc<Workload>,
    cap: usize,
    duration: Duration,
    rate: u64,
) -> (Histogram<u64>, u64) {
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = tokio::time::Instant::now();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(cap));
    let errors = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(std::sync::Mutex::new(new_histogram()));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0usize;
    let mut handles = Vec::new();
    loop {
        let due = tick.tick().await;
        if due.duration_since(start) >= duration {
            break;
        }
        let permit = in_flight.clone().acquire_owned().await.expect("never closed");
        let mut target = target(scenario, &channels[i % channels.len()]);
        let (w, errors, hist) = (w.clone(), errors.clone(), hist.clone());
        let n = i;
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            if let Ok(ok) = one(&mut target, scenario, &w, n).await {
                // From when the request was due: waiting for a slot counts.
                hist.lock().expect("not poisoned").saturating_record(due.elapsed().as_nanos() as u64);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        i += 1;
    }
    for h in handles {
        let _ = h.await;
    }
    let h = hist.lock().expect("not poisoned").clone();
    (h, errors.load(Ordering::Relaxed))
}

fn print_line(r: &Report) {
    println!(
        "{:<10} {:>9} req {:>10.0} req/s  server CPU {:>5} µs/call  p50 {:>7.1} µs  p90 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>8.1} µs  errors {}",
        format!("{:?}", r.scenario).to_lowercase(),
        r.requests,
        r.rps(),
        r.server_cpu_us.map_or("-".to_string(), |c| format!("{c:.1}")),
        r.micros(0.5),
        r.micros(0.9),
        r.micros(0.99),
        r.micros(0.999),
        r.errors
    );
}
