//! Fleet mode against a real etcd: replicas share one routing table, one audit chain and one
//! canary controller. A change made through any replica is live on all of them within a second;
//! two changes racing on the same `If-Match` generation let exactly one through; sticky keys land
//! on the same version everywhere; killing the controller's replica hands the canary to another
//! that goes on from the persisted step; and an etcd outage keeps traffic flowing on the last
//! table while mutations are refused, until etcd is back.
//!
//! Each test runs its own etcd (see `common::etcd`) under its own key prefix.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::{Etcd, EtcdTlsFiles};
use common::pki::Pki;
use common::*;
use http::{Method, StatusCode};
use serde_json::Value;

const ROUTE: &str = "chat";
const STABLE: &str = "chat@v1";
const CANDIDATE: &str = "chat@v2";
const STICKY_HEADER: &str = "x-session";

/// Issue 9's acceptance point: a change is live on every replica this long after its 200.
const PROPAGATION: Duration = Duration::from_secs(1);
/// The replicas' election and liveness lease (`[state] lease_ttl`).
const LEASE_TTL: Duration = Duration::from_secs(2);
/// How often the leader compacts etcd's history (`[state] compaction_interval`): often, so every
/// fleet test also runs with history being compacted under it.
const COMPACTION: Duration = Duration::from_secs(1);
/// How long after the controller's replica dies another one may take to lead.
const TAKEOVER: Duration = Duration::from_secs(2 + 5);
/// How long a whole canary (several 1 s windows and a takeover) may take on a busy 2-core machine.
const CANARY_DEADLINE: Duration = Duration::from_secs(60);
/// "Within a few seconds" of etcd coming back, mutations work again.
const RECOVERY: Duration = Duration::from_secs(15);

// === config ===

/// The `[state]` table of one replica in fleet mode.
fn state_table(dir: &Path, etcd: &str, prefix: &str, replica: &str) -> String {
    format!(
        r#"
[state]
dir = {dir:?}
backend = "etcd"
etcd = [{etcd:?}]
prefix = {prefix:?}
replica = {replica:?}
lease_ttl = "{}s"
compaction_interval = "{}s"
"#,
        LEASE_TTL.as_secs(),
        COMPACTION.as_secs(),
        dir = dir.display().to_string(),
    )
}

/// `chat@v1` stable and `chat@v2` candidate at 0% on route `chat`, with `route_keys` added to
/// the route and `tables` (such as `[routes.canary]`) after it. Backends are `{v1}` and `{v2}`.
fn routes(route_keys: &str, tables: &str) -> String {
    format!(
        r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{{v1}}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{{v2}}"]

[[routes]]
name = "chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "0%"
{route_keys}

{tables}
"#
    )
}

fn sticky_route() -> String {
    routes(&format!("sticky_header = {STICKY_HEADER:?}"), "")
}

// === replicas ===

enum Instance {
    /// Kept so the in-process weir lives as long as the replica.
    InProcess {
        _weir: Weir,
    },
    Child(WeirProcess),
    Killed,
}

/// One weir of the fleet, in-process or a child process, with its own local state directory.
struct Replica {
    name: String,
    dir: PathBuf,
    proxy: SocketAddr,
    admin: SocketAddr,
    process: Instance,
}

impl Replica {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    fn is_alive(&self) -> bool {
        !matches!(self.process, Instance::Killed)
    }

    async fn routes(&self) -> Value {
        let reply = get(&http1(), &self.admin_url("/v1/routes")).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}: GET /v1/routes: {}",
            self.name,
            reply.text()
        );
        reply.json()
    }

    async fn route(&self) -> Value {
        route_of(&self.routes().await)
    }

    async fn generation(&self) -> u64 {
        let routes = self.routes().await;
        routes["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: /v1/routes has no generation: {routes}", self.name))
    }

    /// The `fleet` object of `/v1/routes`.
    async fn fleet(&self) -> Value {
        self.routes().await["fleet"].clone()
    }

    async fn is_leader(&self) -> bool {
        self.fleet().await["leader"] == true
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let reply = get(&http1(), &self.admin_url("/metrics")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}: GET /metrics", self.name);
        metric(&parse_metrics(&reply.text()), name, &[])
    }

    async fn readyz(&self) -> u16 {
        self.readyz_at("/readyz").await.status.as_u16()
    }

    async fn readyz_at(&self, path: &str) -> Reply {
        get(&http1(), &self.admin_url(path)).await
    }

    fn token(&self) -> String {
        admin_token(&self.dir)
    }

    /// `PUT /v1/routes/chat/weight`, with `If-Match: generation` when given.
    async fn put_weight(&self, weight: &str, if_match: Option<u64>) -> Reply {
        let if_match = if_match.map(|g| g.to_string());
        let headers: Vec<(&str, &str)> =
            if_match.iter().map(|g| ("if-match", g.as_str())).collect();
        admin_call(
            &self.admin_url(&format!("/v1/routes/{ROUTE}/weight")),
            Method::PUT,
            Some(&self.token()),
            Some(&format!(r#"{{"weight": "{weight}"}}"#)),
            &headers,
        )
        .await
    }

    /// `POST /v1/reload`: re-read the replica's config file.
    async fn reload(&self) -> Reply {
        let url = self.admin_url("/v1/reload");
        admin_call(&url, Method::POST, Some(&self.token()), None, &[]).await
    }

    /// A `GET /v1/chat` with a sticky key; returns the version that answered.
    async fn version_for(&self, client: &HttpClient, key: &str) -> String {
        let reply = get_with(client, &self.url("/v1/chat"), &[(STICKY_HEADER, key)]).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{} key {key}: {}",
            self.name,
            reply.text()
        );
        assert_eq!(
            reply.header("x-backend"),
            Some(reply.served_by()),
            "{}: x-weir-version names the backend that answered",
            self.name
        );
        reply.served_by().to_string()
    }

    fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    fn audit(&self) -> Vec<Value> {
        audit_records(&self.dir)
    }

    /// kill -9; waits until the process is gone.
    async fn kill(&mut self) {
        let Instance::Child(child) = &mut self.process else {
            panic!("{} is not a child process", self.name);
        };
        child.child.kill().expect("SIGKILL");
        let status = child.exit_status(DEADLINE).await;
        assert_eq!(status.code(), None, "{} died of SIGKILL", self.name);
        self.process = Instance::Killed;
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let (true, Instance::Child(child)) = (std::thread::panicking(), &self.process) {
            let log = child.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(60);
            eprintln!(
                "--- last lines of replica {} ---\n{}",
                self.name,
                lines[from..].join("\n")
            );
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Run {
    /// `Weir::start` in this test process.
    InProcess,
    /// `weir serve --config` child processes, so one can be killed with SIGKILL.
    Processes,
}

/// An etcd, two named backends and `size` replicas `r1`, `r2`, … sharing a unique prefix.
struct Fleet {
    // Replicas go before etcd, so they are stopped first.
    replicas: Vec<Replica>,
    etcd: Etcd,
    prefix: String,
    _v1: Backend,
    _v2: Backend,
    work: TempDir,
}

impl Fleet {
    async fn start(test: &str, size: usize, routes: &str, run: Run) -> Fleet {
        let etcd = Etcd::start().await;
        let v1 = Backend::named(STABLE).await;
        let v2 = Backend::named(CANDIDATE).await;
        let work = temp_dir(&format!("fleet-{test}"));
        let prefix = format!("/weir/test-{}-{test}", std::process::id());
        let backends = [("v1", v1.url()), ("v2", v2.url())];
        let pairs: Vec<(&str, &str)> = backends.iter().map(|(n, u)| (*n, u.as_str())).collect();
        let mut replicas = Vec::new();
        for i in 1..=size {
            let name = format!("r{i}");
            let dir = work.path().join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            let template = format!(
                "{}\n{routes}",
                state_table(&dir, &etcd.url(), &prefix, &name)
            );
            let replica = match run {
                Run::InProcess => {
                    let weir = Weir::start(&template, &pairs).await;
                    Replica {
                        name,
                        dir,
                        proxy: weir.proxy,
                        admin: weir.admin,
                        process: Instance::InProcess { _weir: weir },
                    }
                }
                Run::Processes => {
                    let config = work.path().join(format!("{name}.toml"));
                    write_config(&config, &template, &pairs, &dir);
                    let child = WeirProcess::spawn(
                        &["serve", "--config", config.to_str().unwrap()],
                        work.path(),
                    );
                    Replica {
                        name,
                        dir,
                        proxy: child.proxy,
                        admin: child.admin,
                        process: Instance::Child(child),
                    }
                }
            };
            replicas.push(replica);
        }
        Fleet {
            replicas,
            etcd,
            prefix,
            _v1: v1,
            _v2: v2,
            work,
        }
    }

    fn alive(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| r.is_alive())
    }

    /// One line per live replica: generation, route weight, fleet status. For failure messages.
    async fn describe(&self) -> String {
        let mut out = String::new();
        for r in self.alive() {
            let routes = r.routes().await;
            out.push_str(&format!(
                "\n  {}: generation {} weight {} stable {} fleet {}",
                r.name,
                routes["generation"],
                route_of(&routes)["weight"],
                route_of(&routes)["stable"],
                routes["fleet"]
            ));
        }
        out
    }

    /// Whether every live replica reports `generation` and route weight `weight`.
    async fn agree_on(&self, generation: u64, weight: u64) -> bool {
        for r in self.alive() {
            let routes = r.routes().await;
            if routes["generation"] != generation || route_of(&routes)["weight"] != weight {
                return false;
            }
        }
        true
    }

    /// The live replicas whose `fleet.leader` is true.
    async fn leaders(&self) -> Vec<String> {
        let mut leaders = Vec::new();
        for r in self.alive() {
            if r.is_leader().await {
                leaders.push(r.name.clone());
            }
        }
        leaders
    }

    /// Sets the route to 50% through replica `through` and waits until every replica serves it;
    /// returns the generation and the version each of `keys` gets (both versions among them).
    async fn at_half(&self, through: usize, keys: &[String]) -> (u64, Vec<String>) {
        let reply = self.replicas[through].put_weight("50%", None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let generation = generation_of(&reply);
        assert_eventually!(
            within DEADLINE,
            self.agree_on(generation, 5_000).await,
            "the replicas never agreed on 50%:{}",
            self.describe().await
        );
        let versions = self.versions_by_key(keys).await;
        assert!(
            versions.iter().any(|v| v == STABLE) && versions.iter().any(|v| v == CANDIDATE),
            "both versions serve some keys at 50%: {versions:?}"
        );
        (generation, versions)
    }

    /// `PUT weight` through `replica` until etcd, just restarted, lets it through (503 until
    /// then, for at most [`RECOVERY`]); returns the accepted reply.
    async fn put_weight_once_etcd_is_back(&self, replica: usize, weight: &str) -> Reply {
        let started = Instant::now();
        loop {
            let reply = self.replicas[replica].put_weight(weight, None).await;
            match reply.status.as_u16() {
                200 => return reply,
                503 if started.elapsed() < RECOVERY => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => panic!(
                    "{:?} after etcd came back a mutation got {} {}{}",
                    started.elapsed(),
                    reply.status,
                    reply.text(),
                    self.etcd.log_tail()
                ),
            }
        }
    }

    /// Waits until every replica is connected to etcd, names itself and the prefix, exactly one
    /// leads and all show one generation; returns it.
    async fn settle(&self) -> u64 {
        assert_eventually!(
            within DEADLINE,
            self.is_settled().await,
            "the fleet never settled (connected, one leader, one generation):{}",
            self.describe().await
        );
        self.replicas[0].generation().await
    }

    async fn is_settled(&self) -> bool {
        let mut generations = Vec::new();
        let mut leaders = 0;
        for r in self.alive() {
            let routes = r.routes().await;
            let fleet = &routes["fleet"];
            if fleet["etcd"] != "connected" {
                return false;
            }
            assert_eq!(fleet["replica"], r.name.as_str(), "{}: {fleet}", r.name);
            assert_eq!(fleet["prefix"], self.prefix.as_str(), "{}: {fleet}", r.name);
            if fleet["leader"] == true {
                leaders += 1;
            }
            generations.push(routes["generation"].clone());
        }
        leaders == 1 && generations.windows(2).all(|w| w[0] == w[1])
    }

    /// Sends the sticky keys to every live replica; asserts each key got one version from all
    /// of them and returns those versions, key by key.
    async fn versions_by_key(&self, keys: &[String]) -> Vec<String> {
        let client = http1();
        let mut versions = Vec::new();
        for key in keys {
            let mut seen = Vec::new();
            for r in self.alive() {
                seen.push((r.name.clone(), r.version_for(&client, key).await));
            }
            assert!(
                seen.iter().all(|(_, v)| *v == seen[0].1),
                "sticky key {key} got different versions from different replicas: {seen:?}"
            );
            assert!(
                seen[0].1 == STABLE || seen[0].1 == CANDIDATE,
                "key {key}: {seen:?}"
            );
            versions.push(seen[0].1.clone());
        }
        versions
    }

    /// Every live replica's `audit.jsonl` verifies with `weir audit verify`, every record names a
    /// replica of the fleet, and, once the local copies have caught up, all hold the same records.
    async fn assert_audit_chains_agree(&self) {
        for r in self.alive() {
            let output = run_weir(
                &["audit", "verify", r.audit_path().to_str().unwrap()],
                self.work.path(),
                DEADLINE,
            )
            .await;
            assert!(
                output.status.success(),
                "{}: weir audit verify {}: {}{}",
                r.name,
                r.audit_path().display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            // The replica's cached state (for a start without etcd) is no head to check against.
            if r.dir.join("routing-state.json").exists() {
                let said = String::from_utf8_lossy(&output.stdout);
                assert!(said.contains("records no head"), "{}: {said}", r.name);
            }
            let names: Vec<&str> = self.replicas.iter().map(|r| r.name.as_str()).collect();
            for record in r.audit() {
                assert!(
                    record["replica"]
                        .as_str()
                        .is_some_and(|name| names.contains(&name)),
                    "{}: an audit record does not name the replica that wrote it: {record}",
                    r.name
                );
            }
        }
        let chains = || -> Vec<(String, Vec<(u64, String)>)> {
            self.alive()
                .map(|r| (r.name.clone(), chain(&r.audit())))
                .collect()
        };
        assert_eventually!(
            within DEADLINE,
            chains().windows(2).all(|w| w[0].1 == w[1].1),
            "the replicas' audit chains differ (seq, hash): {:#?}",
            chains()
        );
    }
}

fn route_of(routes: &Value) -> Value {
    routes["routes"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["name"] == ROUTE))
        .cloned()
        .unwrap_or_else(|| panic!("no route {ROUTE} in {routes}"))
}

/// `(seq, hash)` of every record.
fn chain(records: &[Value]) -> Vec<(u64, String)> {
    records
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap_or(u64::MAX),
                r["hash"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The `set_weight` records of the route.
fn set_weights(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["action"] == "set_weight" && r["route"] == ROUTE)
        .collect()
}

/// Records whose `after.weight` is `weight` (any action).
fn records_with_weight(records: &[Value], weight: u64) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["after"]["weight"] == weight)
        .collect()
}

fn generation_of(reply: &Reply) -> u64 {
    reply.json()["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("a mutation's answer has a generation: {}", reply.text()))
}

fn sticky_keys(n: usize) -> Vec<String> {
    (0..n).map(|k| format!("user-{k}")).collect()
}

// === config ===

#[test]
fn fleet_settings_are_checked_when_the_config_is_read() {
    let dir = temp_dir("fleet-config");
    let base = |state: &str| {
        config_text(
            &format!("{state}\n{}", routes("", "")),
            &[("v1", "http://127.0.0.1:1"), ("v2", "http://127.0.0.1:2")],
            dir.path(),
        )
    };
    let good = state_table(dir.path(), "http://127.0.0.1:2379", "/weir/t", "r1");
    if let Err(e) = weir::Config::from_toml_str(&base(&good), "fleet.toml") {
        panic!("a valid fleet config is refused: {e}");
    }
    for (what, state, field) in [
        (
            "a lease under 1s",
            good.replace(r#"lease_ttl = "2s""#, r#"lease_ttl = "500ms""#),
            "lease_ttl",
        ),
        (
            "an unknown backend",
            good.replace(r#"backend = "etcd""#, r#"backend = "zookeeper""#),
            "backend",
        ),
        (
            "an unknown key",
            good.replace("replica = ", "replicas = "),
            "replicas",
        ),
    ] {
        match weir::Config::from_toml_str(&base(&state), "fleet.toml") {
            Ok(_) => panic!("{what} was accepted:\n{state}"),
            Err(e) => {
                let message = format!("{e:#}");
                assert!(
                    message.contains(field),
                    "{what}: the error should name {field}: {message}"
                );
            }
        }
    }
}

/// The replica's lease carries its counters and its election key, and only one task keeps a
/// lease alive: two tasks asking for it at the same moment (the counter publisher and the
/// election, after a lapse or at start) must get one lease between them. A second, unkept lease
/// would expire with the counters on it and stay in use while the kept one looks alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_that_ask_for_the_lease_together_share_one() {
    let etcd = Etcd::start().await;
    let config = weir::FleetConfig {
        endpoints: vec![etcd.url()],
        prefix: "/weir/lease-test".into(),
        replica: "r1".into(),
        lease_ttl: Duration::from_secs(5),
        compaction_interval: None,
        tls: None,
        user: None,
    };
    let fleet = weir::Fleet::connect(&config)
        .await
        .expect("connect to etcd");
    let (first, second, third) = tokio::join!(fleet.lease(), fleet.lease(), fleet.lease());
    let (first, second, third) = (first.unwrap(), second.unwrap(), third.unwrap());
    assert_eq!(
        (first, second),
        (second, third),
        "one lease for all three asks"
    );
    assert_eq!(fleet.lease().await.unwrap(), first, "and it is kept");
}

/// A TCP relay to etcd that can hold etcd's answers back (and then let them through), so a
/// change reaches etcd while its answer arrives too late: the commit times out after etcd
/// applied it.
struct HoldingRelay {
    url: String,
    hold: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingRelay {
    async fn start(etcd: &Etcd) -> HoldingRelay {
        let target: SocketAddr = etcd
            .url()
            .trim_start_matches("http://")
            .parse()
            .expect("etcd's client URL is host:port");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hold = Arc::new(AtomicBool::new(false));
        let held = Arc::clone(&hold);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let hold = Arc::clone(&held);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let requests = tokio::io::copy(&mut client_read, &mut server_write);
                    let answers = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = server_read.read(&mut buf).await?;
                            while hold.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            if n == 0 {
                                return client_write.shutdown().await;
                            }
                            client_write.write_all(&buf[..n]).await?;
                        }
                    };
                    let _ = tokio::join!(requests, answers);
                });
            }
        });
        HoldingRelay { url, hold, task }
    }

    fn hold(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }
}

impl Drop for HoldingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// etcd applies a change but its answer comes after the commit's 2 s timeout: the commit asks
/// etcd whether its audit record landed and reports the change applied, instead of an
/// "unreachable, retry" that would have the caller repeat a change that is already live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_etcd_applied_but_answered_late_is_reported_applied() {
    use weir::Prepared;
    use weir::{AuditHead, StateBody, STATE_FORMAT};

    let etcd = Etcd::start().await;
    let relay = HoldingRelay::start(&etcd).await;
    let config = weir::FleetConfig {
        endpoints: vec![relay.url.clone()],
        prefix: "/weir/late-answer".into(),
        replica: "r1".into(),
        lease_ttl: Duration::from_secs(5),
        compaction_interval: None,
        tls: None,
        user: None,
    };
    // Only this test's calls use the connection, so the commit starts the moment it is called.
    let fleet = Arc::new(
        weir::Fleet::connect(&config)
            .await
            .expect("connect to etcd through the relay"),
    );
    let record = Prepared {
        seq: 1,
        hash: "h1".into(),
        line: r#"{"seq":1,"action":"start"}"#.into(),
    };
    let body = StateBody {
        format: STATE_FORMAT,
        state: weir::RoutingState {
            generation: 1,
            routes: Vec::new(),
            production: Default::default(),
        },
        audit_head: Some(AuditHead {
            seq: 1,
            hash: "h1".into(),
            line: record.line.clone(),
        }),
    };

    relay.hold(true);
    let commit = tokio::spawn({
        let fleet = Arc::clone(&fleet);
        let (body, record) = (body.clone(), record.clone());
        async move { fleet.commit(0, &body, &record, false).await }
    });
    // Past the commit's timeout (2 s), then etcd's answers go through.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    relay.hold(false);
    let revision = commit
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("a commit etcd applied is reported applied: {e}"));
    let shared = fleet.load().await.unwrap().expect("the state is in etcd");
    assert_eq!(revision, shared.revision, "the revision it was applied at");
    assert_eq!(shared.body.state.generation, 1);
    assert_eq!(
        fleet.records(1, 1).await.unwrap(),
        vec![record.line.clone()],
        "the audit record went with it"
    );

    // When etcd stays silent through the commit, its re-send and the check, nobody can tell:
    // the caller hears "not confirmed", never "not applied" (and here it was applied).
    let second = Prepared {
        seq: 2,
        hash: "h2".into(),
        line: r#"{"seq":2,"action":"set_weight"}"#.into(),
    };
    let mut body = body;
    body.state.generation = 2;
    relay.hold(true);
    let commit = tokio::spawn({
        let fleet = Arc::clone(&fleet);
        let record = second.clone();
        async move { fleet.commit(revision, &body, &record, false).await }
    });
    let outcome = commit.await.unwrap();
    relay.hold(false);
    match outcome {
        Err(e @ weir::FleetError::Unconfirmed { .. }) => {
            assert!(e.to_string().contains("did not confirm"), "{e}")
        }
        other => panic!("a commit etcd never answered: {other:?}"),
    }
    assert_eventually!(
        within DEADLINE,
        fleet
            .load()
            .await
            .is_ok_and(|s| s.is_some_and(|s| s.body.state.generation == 2)),
        "the unconfirmed change was in fact applied"
    );
}

/// A replica joining a fleet whose audit chain has grown past what one gRPC answer carries
/// (4 MiB) fills its copy page by page: a fleet that has run canaries for a few days must not
/// lock new replicas out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joins_a_fleet_whose_audit_chain_is_larger_than_one_answer() {
    use weir::{AuditLog, Entry};
    use weir::{StateBody, STATE_FORMAT};

    let etcd = Etcd::start().await;
    let prefix = format!("/weir/test-{}-long-chain", std::process::id());
    let config = weir::FleetConfig {
        endpoints: vec![etcd.url()],
        prefix: prefix.clone(),
        replica: "elder".into(),
        lease_ttl: LEASE_TTL,
        compaction_interval: None,
        tls: None,
        user: None,
    };
    let fleet = weir::Fleet::connect(&config)
        .await
        .expect("connect to etcd");
    // An elder replica's history: 120 records of ~40 KB, ~4.8 MB in all.
    let work = temp_dir("fleet-long-chain");
    let elder = work.path().join("elder");
    std::fs::create_dir_all(&elder).unwrap();
    let mut audit = AuditLog::open(&elder, None).unwrap();
    audit.set_replica("elder");
    let note = "n".repeat(40_000);
    let mut revision = 0;
    for generation in 1..=120 {
        let prepared = audit.prepare(Entry {
            actor: "admin",
            action: "note",
            route: None,
            before: Value::Null,
            after: serde_json::json!({ "note": note }),
            generation,
            reason: Some("history"),
            window: None,
        });
        let body = StateBody {
            format: STATE_FORMAT,
            state: weir::RoutingState {
                generation,
                routes: Vec::new(),
                production: Default::default(),
            },
            audit_head: Some(prepared.head()),
        };
        revision = fleet
            .commit(revision, &body, &prepared, false)
            .await
            .unwrap_or_else(|e| panic!("commit record {generation}: {e}"));
        audit.append(&prepared).unwrap();
    }

    let v1 = Backend::named(STABLE).await;
    let v2 = Backend::named(CANDIDATE).await;
    let dir = work.path().join("r1");
    std::fs::create_dir_all(&dir).unwrap();
    let template = format!(
        "{}\n{}",
        state_table(&dir, &etcd.url(), &prefix, "r1"),
        routes("", "")
    );
    let _weir = Weir::start(&template, &[("v1", &v1.url()), ("v2", &v2.url())]).await;
    let records = audit_records(&dir);
    assert_eq!(
        records.iter().filter(|r| r["action"] == "note").count(),
        120,
        "the joining replica copied the whole chain"
    );
    assert_eq!(
        records.last().unwrap()["replica"],
        "r1",
        "then wrote its own start"
    );
    assert_eq!(records.last().unwrap()["seq"], 121);
}

/// etcd keeps every revision until compacted, and counters are published twice a second per
/// replica: the leader compacts. Once the history is compacted past the state's own revision
/// (no change for a while), followers stay quiet (they watch from the revision they read, not
/// from the state's, which would be refused as compacted over and over) and still see the next
/// change within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_compacts_etcd_and_followers_stay_current_and_quiet() {
    let fleet = Fleet::start("compaction", 2, &routes("", ""), Run::InProcess).await;
    let mut etcd = etcd_client::Client::connect([fleet.etcd.url()], None)
        .await
        .expect("connect to etcd");
    let state_key = format!("{}/state", fleet.prefix);
    let state_revision = etcd.get(state_key.as_str(), None).await.unwrap().kvs()[0].mod_revision();
    assert_eventually!(
        within DEADLINE,
        etcd.get(
            state_key.as_str(),
            Some(etcd_client::GetOptions::new().with_revision(state_revision))
        )
        .await
        .is_err_and(|e| e.to_string().contains("compacted")),
        "etcd's history was never compacted past the state's revision {state_revision}"
    );

    let calls = |text: &str| {
        let scrape = parse_metrics(text);
        ["Range", "Watch"]
            .iter()
            .map(|method| {
                metric(
                    &scrape,
                    "grpc_server_started_total",
                    &[("grpc_method", method)],
                )
                .unwrap_or_else(|| panic!("etcd counts {method} calls"))
            })
            .sum::<f64>()
    };
    let metrics_url = format!("{}/metrics", fleet.etcd.url());
    let before = calls(&get(&http1(), &metrics_url).await.text());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = calls(&get(&http1(), &metrics_url).await.text()) - before;
    // Each replica reads the state and re-watches about once a second and the leader reads the
    // revision once per compaction: about 10. Followers refused by compaction loop: about 80.
    assert!(
        during <= 24.0,
        "{during} reads and watches in 2 s with nothing changing"
    );

    let reply = fleet.replicas[0].put_weight("40%", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let generation = generation_of(&reply);
    let started = Instant::now();
    assert_eventually!(
        within DEADLINE,
        fleet.agree_on(generation, 4_000).await,
        "the replicas never agreed on 40%:{}",
        fleet.describe().await
    );
    assert!(
        started.elapsed() <= PROPAGATION,
        "live on both within {PROPAGATION:?}, took {:?}",
        started.elapsed()
    );
}

/// A replica whose config cannot build the fleet's state (another replica reloaded a config
/// that routes to a version this one does not know) keeps its older table, but says so: it
/// turns unready with the reason, `weir_fleet_state_applied` drops to 0, `/v1/routes` shows
/// it, and it leaves the canary seat to a replica that can. Once its own config catches up
/// (reload), it applies the state and is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_apply_the_fleet_state_says_so_and_turns_unready() {
    let fleet = Fleet::start("cannot-apply", 2, &routes("", ""), Run::Processes).await;
    let v3 = Backend::named("chat@v3").await;
    let with_v3 = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap();
        let text = text.replace(r#"candidate = "chat@v2""#, r#"candidate = "chat@v3""#);
        let text = text.replace(
            "[[routes]]",
            &format!(
                "[[versions]]\nmodel = \"chat\"\nversion = \"v3\"\nbackends = [{:?}]\n\n[[routes]]",
                v3.url()
            ),
        );
        std::fs::write(path, text).unwrap();
    };
    // The canary leader is the one left behind: it must also leave its seat.
    fleet.settle().await;
    let leader = fleet.leaders().await;
    let stuck_at = fleet
        .replicas
        .iter()
        .position(|r| r.name == leader[0])
        .unwrap();
    let (stuck, ahead) = (&fleet.replicas[stuck_at], &fleet.replicas[1 - stuck_at]);
    with_v3(&fleet.work.path().join(format!("{}.toml", ahead.name)));
    let reply = ahead.reload().await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "ahead reload: {}",
        reply.text()
    );
    assert_eq!(route_of(&ahead.routes().await)["candidate"], "chat@v3");

    assert_eventually!(
        within DEADLINE,
        stuck.readyz().await == 503,
        "stuck stays ready on a state it cannot apply: {}",
        stuck.readyz_at("/readyz").await.text()
    );
    let ready = stuck.readyz_at("/readyz?exclude=etcd").await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    let why = ready.json()["checks"]["fleet_state"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        why.starts_with("cannot apply the fleet's routing state") && why.contains("chat@v3"),
        "the check names the version it lacks: {}",
        ready.text()
    );
    assert_eq!(stuck.metric("weir_fleet_state_applied").await, Some(0.0));
    assert_eq!(ahead.metric("weir_fleet_state_applied").await, Some(1.0));
    assert!(
        stuck.fleet().await["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("cannot apply")),
        "{}",
        stuck.fleet().await
    );
    assert_eq!(
        route_of(&stuck.routes().await)["candidate"],
        "chat@v2",
        "stuck keeps the table it had"
    );

    assert_eventually!(
        within DEADLINE,
        fleet.leaders().await == [ahead.name.clone()],
        "the canary seat stayed with the replica that cannot apply the state: leaders {:?}",
        fleet.leaders().await
    );
    // It keeps its lease while it waits: its published counters stay, on the same lease, well
    // past the lease's TTL (a new lease would restart its counts in the leader's window).
    let mut etcd = etcd_client::Client::connect([fleet.etcd.url()], None)
        .await
        .expect("connect to etcd");
    let counters_key = format!("{}/counters/{}", fleet.prefix, stuck.name);
    let mut lease_of_counters = async || {
        let mut got = etcd.get(counters_key.as_str(), None).await.unwrap();
        got.take_kvs().first().map(|kv| kv.lease())
    };
    let before = lease_of_counters().await;
    assert!(
        before.is_some_and(|l| l != 0),
        "{} publishes its counters on a lease",
        stuck.name
    );
    tokio::time::sleep(LEASE_TTL * 3).await;
    assert_eq!(
        lease_of_counters().await,
        before,
        "the replica that left the seat let its lease lapse"
    );

    with_v3(&fleet.work.path().join(format!("{}.toml", stuck.name)));
    let reply = stuck.reload().await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "stuck reload: {}",
        reply.text()
    );
    assert_eventually!(
        within DEADLINE,
        stuck.readyz_at("/readyz").await.status == StatusCode::OK,
        "stuck never applied the state after its reload: {}",
        stuck.readyz_at("/readyz").await.text()
    );
    assert_eq!(route_of(&stuck.routes().await)["candidate"], "chat@v3");
    assert_eq!(stuck.metric("weir_fleet_state_applied").await, Some(1.0));
    assert_eq!(stuck.fleet().await["state"], "current");
}

/// A replica restarted while etcd is down starts from the state it last routed by (kept in its
/// state directory) instead of exiting: the same sticky keys get the same versions, changes are
/// refused with 503, the probe's readiness holds, and it joins the fleet when etcd returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_while_etcd_is_down_serves_its_last_state_and_joins_later() {
    let mut fleet = Fleet::start("restart-offline", 2, &sticky_route(), Run::Processes).await;
    let keys = sticky_keys(16);
    let (generation, versions) = fleet.at_half(0, &keys).await;

    let starts = |r: &Replica| {
        r.audit()
            .iter()
            .filter(|rec| rec["action"] == "start" && rec["replica"] == r.name.as_str())
            .count()
    };
    let started_before = starts(&fleet.replicas[1]);
    fleet.etcd.stop();
    fleet.replicas[1].kill().await;
    let config = fleet.work.path().join("r2.toml");
    let child = WeirProcess::spawn(
        &["serve", "--config", config.to_str().unwrap()],
        fleet.work.path(),
    );
    let r2 = &mut fleet.replicas[1];
    (r2.proxy, r2.admin) = (child.proxy, child.admin);
    r2.process = Instance::Child(child);

    assert_eq!(
        fleet.replicas[1].generation().await,
        generation,
        "the restarted replica serves the generation it had"
    );
    assert_eq!(
        fleet.versions_by_key(&keys).await,
        versions,
        "the restarted replica routes every sticky key as before"
    );
    let r2 = &fleet.replicas[1];
    assert_eq!(r2.fleet().await["etcd"], "unreachable");
    assert_eq!(r2.readyz().await, 503, "plain /readyz names etcd");
    let probe = r2.readyz_at("/readyz?exclude=etcd,fleet_state").await;
    assert_eq!(probe.status, StatusCode::OK, "{}", probe.text());
    let refused = r2.put_weight("20%", None).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.text()
    );

    fleet.etcd.restart().await;
    assert_eventually!(
        within DEADLINE,
        fleet.replicas[1].fleet().await["etcd"] == "connected",
        "the restarted replica never reached etcd: {}",
        fleet.replicas[1].fleet().await
    );
    // A change through the restarted replica itself: it joins first (its start recorded now),
    // then commits on the fleet's state.
    let accepted = fleet.put_weight_once_etcd_is_back(1, "70%").await;
    let recovered = generation_of(&accepted);
    assert_eq!(
        starts(&fleet.replicas[1]),
        started_before + 1,
        "the restarted replica recorded its start when it joined"
    );
    assert_eventually!(
        within DEADLINE,
        fleet.agree_on(recovered, 7_000).await,
        "the restarted replica never joined the fleet's changes:{}",
        fleet.describe().await
    );
    fleet.assert_audit_chains_agree().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_weir_on_files_reports_no_fleet() {
    let v1 = Backend::named(STABLE).await;
    let v2 = Backend::named(CANDIDATE).await;
    let weir = Weir::start(&routes("", ""), &[("v1", &v1.url()), ("v2", &v2.url())]).await;
    let routes = weir.routes().await;
    assert_eq!(
        routes.get("fleet"),
        Some(&Value::Null),
        "file mode has \"fleet\": null: {routes}"
    );
}

// === propagation ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_set_through_one_replica_is_live_on_all_within_a_second() {
    let fleet = Fleet::start("propagate", 3, &sticky_route(), Run::InProcess).await;
    let before = fleet.settle().await;

    let reply = fleet.replicas[0].put_weight("100%", None).await;
    let acknowledged = Instant::now();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let generation = generation_of(&reply);
    assert_eq!(generation, before + 1, "one change, one generation");

    // Each replica's table, polled until it shows the change; the clock started at the 200.
    let mut pending: Vec<&Replica> = fleet.replicas.iter().collect();
    let mut last_seen = Vec::new();
    while !pending.is_empty() {
        last_seen.clear();
        let mut still = Vec::new();
        for r in pending {
            let routes = r.routes().await;
            let weight = route_of(&routes)["weight"].clone();
            if routes["generation"] == generation && weight == 10_000 {
                continue;
            }
            last_seen.push(format!(
                "{}: generation {} weight {weight}",
                r.name, routes["generation"]
            ));
            still.push(r);
        }
        pending = still;
        if !pending.is_empty() && acknowledged.elapsed() > PROPAGATION {
            panic!(
                "{PROPAGATION:?} after the 200 (generation {generation}, weight 10000) some \
                 replicas still show the old table: {last_seen:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // At 100% every replica sends everything to the candidate.
    let client = http1();
    for r in &fleet.replicas {
        for i in 0..20 {
            let version = r.version_for(&client, &format!("any-{i}")).await;
            assert_eq!(version, CANDIDATE, "{} at 100%", r.name);
        }
    }

    // A sticky key lands on the same version whichever replica it reaches, and at 50% some keys
    // go to each version.
    let (_, versions) = fleet.at_half(1, &sticky_keys(24)).await;
    // And again: the same keys, the same versions.
    assert_eq!(fleet.versions_by_key(&sticky_keys(24)).await, versions);
}

// === conflicts ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_changes_on_the_same_generation_through_two_replicas_let_exactly_one_through() {
    let fleet = Fleet::start("conflict", 3, &sticky_route(), Run::InProcess).await;
    let generation = fleet.settle().await;
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    let (reply_a, reply_b) = tokio::join!(
        a.put_weight("30%", Some(generation)),
        b.put_weight("70%", Some(generation))
    );
    let outcomes = [
        (a, 3_000u64, &reply_a, 7_000u64),
        (b, 7_000, &reply_b, 3_000),
    ];
    let statuses: Vec<u16> = outcomes.iter().map(|o| o.2.status.as_u16()).collect();
    let winners: Vec<_> = outcomes.iter().filter(|o| o.2.status == 200).collect();
    let losers: Vec<_> = outcomes.iter().filter(|o| o.2.status == 409).collect();
    assert!(
        winners.len() == 1 && losers.len() == 1,
        "expected one 200 and one 409 at If-Match {generation}, got {statuses:?}: {} / {}",
        reply_a.text(),
        reply_b.text()
    );
    let (winner, weight, reply, lost_weight) = winners[0];
    let loser = losers[0];
    assert!(
        loser.2.json()["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "a 409 carries an error message: {}",
        loser.2.text()
    );
    let new_generation = generation_of(reply);
    assert_eq!(new_generation, generation + 1, "{}", reply.text());

    assert_eventually!(
        within DEADLINE,
        fleet.agree_on(new_generation, *weight).await,
        "the replicas never agreed on {}'s {weight} at generation {new_generation}:{}",
        winner.name,
        fleet.describe().await
    );

    // Every replica's copy of the chain holds the winner's change once and nothing of the loser's.
    for r in &fleet.replicas {
        assert_eventually!(
            within DEADLINE,
            !set_weights(&r.audit()).is_empty(),
            "{}'s audit log never got the change: {:#?}",
            r.name,
            r.audit()
        );
        let records = r.audit();
        let changes = set_weights(&records);
        assert_eq!(changes.len(), 1, "{}: {changes:#?}", r.name);
        let change = changes[0];
        assert_eq!(change["after"]["weight"], *weight, "{}: {change}", r.name);
        assert_eq!(change["before"]["weight"], 0, "{}: {change}", r.name);
        assert_eq!(change["generation"], new_generation, "{}: {change}", r.name);
        assert_eq!(
            change["replica"],
            winner.name.as_str(),
            "{}: {change}",
            r.name
        );
        assert!(
            records_with_weight(&records, *lost_weight).is_empty(),
            "{}: the refused {lost_weight} was logged: {records:#?}",
            r.name
        );
    }
    fleet.assert_audit_chains_agree().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_changes_without_if_match_through_two_replicas_are_both_applied_in_turn() {
    let fleet = Fleet::start("serialize", 2, &sticky_route(), Run::InProcess).await;
    let generation = fleet.settle().await;
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    let (reply_a, reply_b) = tokio::join!(a.put_weight("30%", None), b.put_weight("70%", None));
    assert_eq!(reply_a.status, StatusCode::OK, "{}", reply_a.text());
    assert_eq!(reply_b.status, StatusCode::OK, "{}", reply_b.text());
    let mut applied = [
        (generation_of(&reply_a), 3_000u64, a.name.as_str()),
        (generation_of(&reply_b), 7_000u64, b.name.as_str()),
    ];
    applied.sort();
    assert_eq!(
        [applied[0].0, applied[1].0],
        [generation + 1, generation + 2],
        "the two changes take one generation each, one after the other"
    );
    let (last_generation, last_weight, _) = applied[1];
    assert_eventually!(
        within DEADLINE,
        fleet.agree_on(last_generation, last_weight).await,
        "the replicas never agreed on the later change:{}",
        fleet.describe().await
    );
    for r in &fleet.replicas {
        assert_eventually!(
            within DEADLINE,
            set_weights(&r.audit()).len() >= 2,
            "{}'s audit log never got both changes: {:#?}",
            r.name,
            r.audit()
        );
        let records = r.audit();
        let logged: Vec<(u64, u64, &str)> = set_weights(&records)
            .iter()
            .map(|c| {
                (
                    c["generation"].as_u64().unwrap_or(0),
                    c["after"]["weight"].as_u64().unwrap_or(0),
                    c["replica"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            logged, applied,
            "{}: each change logged once, in order",
            r.name
        );
    }
    fleet.assert_audit_chains_agree().await;
}

// === the canary controller ===

/// Requests sent round-robin to the live replicas until stopped, counted per replica.
struct Traffic {
    stop: Arc<AtomicBool>,
    alive: Arc<Vec<AtomicBool>>,
    ok: Arc<Vec<AtomicUsize>>,
    /// Answers other than 200.
    refused: Arc<Vec<AtomicUsize>>,
    /// Requests that got no answer.
    failed: Arc<Vec<AtomicUsize>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(proxies: Vec<String>, workers: usize) -> Traffic {
        let n = proxies.len();
        let counters = || Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>());
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new((0..n).map(|_| AtomicBool::new(true)).collect::<Vec<_>>());
        let (ok, refused, failed) = (counters(), counters(), counters());
        let proxies = Arc::new(proxies);
        let client = http1();
        let tasks = (0..workers)
            .map(|worker| {
                let (stop, alive, proxies, client) =
                    (stop.clone(), alive.clone(), proxies.clone(), client.clone());
                let (ok, refused, failed) = (ok.clone(), refused.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut next = worker;
                    while !stop.load(Ordering::SeqCst) {
                        next = (next + 1) % n;
                        if !alive[next].load(Ordering::SeqCst) {
                            continue;
                        }
                        let req = request(Method::GET, &proxies[next]).body(empty()).unwrap();
                        let answered = tokio::time::timeout(Duration::from_secs(5), async {
                            use http_body_util::BodyExt;
                            let response = client.request(req).await.ok()?;
                            let status = response.status();
                            response.into_body().collect().await.ok()?;
                            Some(status)
                        })
                        .await;
                        match answered {
                            Ok(Some(StatusCode::OK)) => ok[next].fetch_add(1, Ordering::SeqCst),
                            Ok(Some(_)) => refused[next].fetch_add(1, Ordering::SeqCst),
                            _ => failed[next].fetch_add(1, Ordering::SeqCst),
                        };
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            alive,
            ok,
            refused,
            failed,
            tasks,
        }
    }

    /// Stops sending to replica `i` (before it is killed).
    fn skip(&self, i: usize) {
        self.alive[i].store(false, Ordering::SeqCst);
    }

    fn ok(&self, i: usize) -> usize {
        self.ok[i].load(Ordering::SeqCst)
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("traffic workers stop")
                .expect("a traffic worker panicked");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_goes_on_from_its_step_when_the_controller_replica_is_killed() {
    let steps = [1_000u64, 2_500, 5_000, 7_500, 10_000];
    let canary = r#"
[routes.canary]
steps = ["10%", "25%", "50%", "75%", "100%"]
interval = "1s"
min_requests = 10
max_p99_ratio = 50.0
progress_deadline = "60s"
"#;
    let mut fleet = Fleet::start("failover", 3, &routes("", canary), Run::Processes).await;
    fleet.settle().await;
    let traffic = Traffic::start(
        fleet.replicas.iter().map(|r| r.url("/v1/chat")).collect(),
        6,
    );

    // Wait for the canary to pass its second step, noting who runs it.
    let mut at_kill = None;
    assert_eventually!(
        within CANARY_DEADLINE,
        {
            for (i, r) in fleet.replicas.iter().enumerate() {
                let routes = r.routes().await;
                let route = route_of(&routes);
                if routes["fleet"]["leader"] == true && route["weight"].as_u64() >= Some(steps[1]) {
                    at_kill = Some((i, route));
                }
            }
            at_kill.is_some()
        },
        "the canary never reached its second step:{}",
        fleet.describe().await
    );
    let (old, route) = at_kill.unwrap();
    assert!(
        route["stable"] == STABLE && route["weight"].as_u64() < Some(steps[steps.len() - 1]),
        "the canary went too fast to kill its controller halfway: {route}"
    );
    let old_name = fleet.replicas[old].name.clone();
    let weight_at_kill = route["weight"].as_u64().unwrap();
    traffic.skip(old);
    fleet.replicas[old].kill().await;
    let killed = Instant::now();
    let served_at_kill: Vec<usize> = (0..3).map(|i| traffic.ok(i)).collect();

    // Another replica leads within the lease TTL and a few seconds.
    assert_eventually!(
        within TAKEOVER,
        fleet.leaders().await.len() == 1,
        "{TAKEOVER:?} after {old_name} was killed, leaders {:?}:{}",
        fleet.leaders().await,
        fleet.describe().await
    );
    let new_name = fleet.leaders().await.remove(0);
    assert_ne!(new_name, old_name);
    eprintln!(
        "{new_name} took over from {old_name} after {:?}",
        killed.elapsed()
    );
    for r in fleet.alive() {
        let leading = if r.name == new_name { 1.0 } else { 0.0 };
        assert_eventually!(
            within DEADLINE,
            r.metric("weir_fleet_leader").await == Some(leading),
            "{}: weir_fleet_leader is {:?}, expected {leading}",
            r.name,
            r.metric("weir_fleet_leader").await
        );
        assert_eq!(
            r.metric("weir_fleet_etcd_up").await,
            Some(1.0),
            "{}",
            r.name
        );
    }

    // The new controller finishes the canary.
    assert_eventually!(
        within CANARY_DEADLINE,
        {
            let mut promoted = true;
            for r in fleet.alive() {
                promoted &= r.route().await["stable"] == CANDIDATE;
            }
            promoted
        },
        "the canary was never promoted after the takeover:{}",
        fleet.describe().await
    );
    for (i, r) in fleet.replicas.iter().enumerate() {
        if r.is_alive() {
            assert!(
                traffic.ok(i) > served_at_kill[i],
                "{} served nothing after the kill",
                r.name
            );
        }
    }
    let refused: Vec<usize> = (0..3)
        .map(|i| traffic.refused[i].load(Ordering::SeqCst))
        .collect();
    let failed: Vec<usize> = (0..3)
        .map(|i| traffic.failed[i].load(Ordering::SeqCst))
        .collect();
    traffic.stop().await;
    for (i, r) in fleet.replicas.iter().enumerate() {
        if i != old {
            assert_eq!(
                (refused[i], failed[i]),
                (0, 0),
                "{}: requests refused or unanswered",
                r.name
            );
        }
    }

    // The chain: every step once, in order, then the promotion; the old controller's records
    // first, the new one's after.
    let survivor = fleet.alive().next().unwrap();
    let canary_changes = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["actor"] == "canary" && r["action"] != "canary_decision")
            .cloned()
            .collect()
    };
    assert_eventually!(
        within DEADLINE,
        canary_changes(&survivor.audit())
            .iter()
            .any(|r| r["action"] == "promote"),
        "{}'s audit log never got the promotion: {:#?}",
        survivor.name,
        canary_changes(&survivor.audit())
    );
    let changes = canary_changes(&survivor.audit());
    let summary: Vec<(String, Option<u64>, String)> = changes
        .iter()
        .map(|c| {
            (
                c["action"].as_str().unwrap_or("?").to_string(),
                c["after"]["weight"].as_u64(),
                c["replica"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    let actions: Vec<(&str, Option<u64>)> =
        summary.iter().map(|(a, w, _)| (a.as_str(), *w)).collect();
    let mut expected: Vec<(&str, Option<u64>)> =
        steps.iter().map(|w| ("set_weight", Some(*w))).collect();
    expected.push(("promote", actions.last().and_then(|a| a.1)));
    assert_eq!(
        actions, expected,
        "the canary's changes: each step once, in order, then promote: {summary:#?}"
    );
    let writers: Vec<&str> = summary.iter().map(|(_, _, r)| r.as_str()).collect();
    let handover = writers
        .iter()
        .position(|w| *w != old_name)
        .unwrap_or_else(|| panic!("the killed {old_name} wrote every change: {summary:#?}"));
    assert!(
        handover > 0 && writers[handover..].iter().all(|w| *w == new_name),
        "{old_name} ran the canary first, {new_name} after the kill: {summary:#?}"
    );
    let at_kill_step = steps.iter().position(|w| *w == weight_at_kill);
    assert!(
        at_kill_step.is_some_and(|step| step < handover),
        "the step seen at the kill ({weight_at_kill}) was {old_name}'s: {summary:#?}"
    );
    fleet.assert_audit_chains_agree().await;
}

// === etcd outage ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_the_last_table_while_etcd_is_down_and_converge_when_it_is_back() {
    let mut fleet = Fleet::start("outage", 3, &sticky_route(), Run::InProcess).await;
    fleet.settle().await;
    let keys = sticky_keys(16);
    let (generation, versions) = fleet.at_half(0, &keys).await;

    fleet.etcd.stop();

    // A mutation cannot be committed: 503, naming etcd.
    let refused = fleet.replicas[1].put_weight("20%", None).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a mutation with etcd down: {}",
        refused.text()
    );
    let message = refused.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        message.contains("etcd"),
        "the 503 says etcd is the problem: {}",
        refused.text()
    );
    assert_eq!(
        fleet.replicas[1]
            .metric("weir_route_weight_basis_points")
            .await,
        Some(5_000.0),
        "the refused weight never shows as the route's weight"
    );

    // Every replica notices, says so, and stops being ready.
    for r in &fleet.replicas {
        assert_eventually!(
            within DEADLINE,
            r.fleet().await["etcd"] == "unreachable",
            "{}: fleet {}",
            r.name,
            r.fleet().await
        );
        assert_eventually!(
            within DEADLINE,
            r.readyz().await == 503,
            "{}: /readyz {} with etcd down",
            r.name,
            r.readyz().await
        );
        // A load balancer's probe leaves etcd out: the replica still serves, so it stays in.
        let probe = r.readyz_at("/readyz?exclude=etcd").await;
        assert_eq!(
            probe.status,
            StatusCode::OK,
            "{}: /readyz?exclude=etcd with etcd down: {}",
            r.name,
            probe.text()
        );
        assert_eq!(
            probe.json()["checks"]["etcd"],
            "excluded",
            "{}",
            probe.text()
        );
        let full = r.readyz_at("/readyz").await;
        assert!(
            full.json()["checks"]["etcd"]
                .as_str()
                .is_some_and(|c| c.starts_with("etcd unreachable")),
            "{}: /readyz names the failing check: {}",
            r.name,
            full.text()
        );
        assert_eq!(full.json()["checks"]["serving"], "ok", "{}", full.text());
        assert_eventually!(
            within DEADLINE,
            r.metric("weir_fleet_etcd_up").await == Some(0.0),
            "{}: weir_fleet_etcd_up {:?} with etcd down",
            r.name,
            r.metric("weir_fleet_etcd_up").await
        );
    }
    // …and still serves the last table: same generation, same key → version.
    assert!(
        fleet.agree_on(generation, 5_000).await,
        "the table changed while etcd was down:{}",
        fleet.describe().await
    );
    assert_eq!(
        fleet.versions_by_key(&keys).await,
        versions,
        "traffic changed while etcd was down"
    );

    fleet.etcd.restart().await;

    // Within a few seconds a mutation goes through again (503 until then).
    let accepted = fleet.put_weight_once_etcd_is_back(2, "70%").await;
    let recovered = generation_of(&accepted);
    assert_eq!(
        recovered,
        generation + 1,
        "the refused change took no generation"
    );
    assert_eventually!(
        within DEADLINE,
        fleet.agree_on(recovered, 7_000).await,
        "the replicas never converged after etcd came back:{}",
        fleet.describe().await
    );
    for r in &fleet.replicas {
        assert_eventually!(
            within DEADLINE,
            r.fleet().await["etcd"] == "connected" && r.readyz().await == 200,
            "{}: fleet {} /readyz {}",
            r.name,
            r.fleet().await,
            r.readyz().await
        );
        assert_eventually!(
            within DEADLINE,
            r.metric("weir_fleet_etcd_up").await == Some(1.0),
            "{}: weir_fleet_etcd_up {:?} with etcd back",
            r.name,
            r.metric("weir_fleet_etcd_up").await
        );
    }

    // The chain has the two changes that went through and nothing of the refused one.
    for r in &fleet.replicas {
        assert_eventually!(
            within DEADLINE,
            set_weights(&r.audit()).len() >= 2,
            "{}'s audit log never got the change made after the outage: {:#?}",
            r.name,
            r.audit()
        );
        let records = r.audit();
        let weights: Vec<u64> = set_weights(&records)
            .iter()
            .map(|c| c["after"]["weight"].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(weights, [5_000, 7_000], "{}: {records:#?}", r.name);
        assert!(
            records_with_weight(&records, 2_000).is_empty(),
            "{}: the refused 20% was logged",
            r.name
        );
    }
    fleet.assert_audit_chains_agree().await;
}

// === TLS and etcd users ===

/// A replica's `[state]` table for an etcd that wants TLS with a client certificate and a user.
fn tls_state_table(
    dir: &Path,
    etcd: &str,
    prefix: &str,
    pki: &Pki,
    password_file: &Path,
) -> String {
    format!(
        r#"
[state]
dir = {dir:?}
backend = "etcd"
etcd = [{etcd:?}]
prefix = {prefix:?}
replica = "tls-1"
lease_ttl = "2s"
etcd_ca = {ca:?}
etcd_cert = {cert:?}
etcd_key = {key:?}
etcd_user = "weir"
etcd_password_file = {password:?}
"#,
        dir = dir.display().to_string(),
        ca = pki.path("ca.pem").display().to_string(),
        cert = pki.path("weir.pem").display().to_string(),
        key = pki.path("weir.key").display().to_string(),
        password = password_file.display().to_string(),
    )
}

/// Why a replica with this `[state]` table cannot start (it must not).
async fn start_error(state: &str, v1: &Backend, v2: &Backend) -> String {
    let mut text = format!(
        "[listener]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n{state}\n{}",
        routes("", "")
    );
    text = text.replace("{v1}", &v1.url()).replace("{v2}", &v2.url());
    let config = weir::Config::from_toml_str(&text, "tls.toml").expect("the config is valid");
    match weir::Server::start(config).await {
        Ok(_) => panic!("a replica started with:\n{state}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn replicas_reach_etcd_over_mutual_tls_as_an_etcd_user() {
    let pki = Pki::new();
    let (etcd_cert, etcd_key) = pki.issue("etcd");
    pki.issue("weir");
    let etcd = Etcd::start_tls(EtcdTlsFiles {
        cert: etcd_cert,
        key: etcd_key,
        ca: pki.path("ca.pem"),
    })
    .await;
    let prefix = format!("/weir/test-{}-tls", std::process::id());

    // etcd with auth on: a root user, and a `weir` user that may only touch the fleet's prefix.
    let read = |name: &str| std::fs::read(pki.path(name)).unwrap();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
        .identity(etcd_client::Identity::from_pem(
            read("weir.pem"),
            read("weir.key"),
        ));
    let options = etcd_client::ConnectOptions::new().with_tls(tls);
    let mut admin = etcd_client::Client::connect([etcd.url()], Some(options))
        .await
        .expect("the test's etcd admin connects over TLS");
    admin.user_add("root", "root-password", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.user_add("weir", "s3cret", None).await.unwrap();
    admin.role_add("weir").await.unwrap();
    admin
        .role_grant_permission(
            "weir",
            etcd_client::Permission::read_write(prefix.clone()).with_prefix(),
        )
        .await
        .unwrap();
    admin.user_grant_role("weir", "weir").await.unwrap();
    admin.auth_enable().await.unwrap();

    let v1 = Backend::named(STABLE).await;
    let v2 = Backend::named(CANDIDATE).await;
    let work = temp_dir("fleet-tls");
    let password = work.path().join("etcd-password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let dir = work.path().join("r1");
    std::fs::create_dir_all(&dir).unwrap();
    let state = tls_state_table(&dir, &etcd.url(), &prefix, &pki, &password)
        + "compaction_interval = \"1s\"\n";
    let weir = Weir::start(
        &format!("{state}\n{}", routes("", "")),
        &[("v1", &v1.url()), ("v2", &v2.url())],
    )
    .await;

    // It joined: connected, leading its one-replica fleet, changes committed through etcd.
    let admin_url = |path: &str| format!("http://{}{path}", weir.admin);
    assert_eventually!(
        within DEADLINE,
        get(&http1(), &admin_url("/v1/routes")).await.json()["fleet"]["leader"] == true,
        "the TLS replica never led its fleet: {}",
        get(&http1(), &admin_url("/v1/routes")).await.text()
    );
    let routes_now = get(&http1(), &admin_url("/v1/routes")).await.json();
    assert_eq!(routes_now["fleet"]["etcd"], "connected", "{routes_now}");
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    let put = request(Method::PUT, &admin_url("/v1/routes/chat/weight"))
        .header("authorization", format!("Bearer {}", token.trim()))
        .body(full(r#"{"weight": "25%"}"#))
        .unwrap();
    let reply = send(&http1(), put).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // Read back as root: with auth on, the certificate alone no longer grants anything.
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
        .identity(etcd_client::Identity::from_pem(
            read("weir.pem"),
            read("weir.key"),
        ));
    let options = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_user("root", "root-password");
    let mut root = etcd_client::Client::connect([etcd.url()], Some(options))
        .await
        .expect("root connects");
    let mut stored = root.get(format!("{prefix}/state"), None).await.unwrap();
    let body: Value = serde_json::from_slice(stored.take_kvs()[0].value()).unwrap();
    assert_eq!(body["state"]["routes"][0]["weight"], 2500, "{body}");
    // The leader compacts as the prefix-scoped user too (etcd 3.4 allows it without root).
    let first = Some(etcd_client::GetOptions::new().with_revision(1));
    assert_eventually!(
        within DEADLINE,
        root.get(format!("{prefix}/state"), first.clone())
            .await
            .is_err_and(|e| e.to_string().contains("compacted")),
        "the weir user's leader never compacted etcd's history"
    );

    // A wrong password, a missing client certificate and a prefix the user may not touch are
    // each refused at start, with the reason.
    let wrong = work.path().join("wrong-password");
    std::fs::write(&wrong, "guess").unwrap();
    let elsewhere = work.path().join("r2");
    let error = start_error(
        &tls_state_table(&elsewhere, &etcd.url(), &prefix, &pki, &wrong),
        &v1,
        &v2,
    )
    .await;
    assert!(
        error.contains("etcd") && error.contains("authentication failed"),
        "{error}"
    );
    let no_cert = tls_state_table(&elsewhere, &etcd.url(), &prefix, &pki, &password)
        .lines()
        .filter(|l| !l.starts_with("etcd_cert") && !l.starts_with("etcd_key"))
        .collect::<Vec<_>>()
        .join("\n");
    let error = start_error(&no_cert, &v1, &v2).await;
    assert!(error.contains("etcd is unreachable"), "{error}");
    let other_prefix = tls_state_table(&elsewhere, &etcd.url(), "/weir/not-yours", &pki, &password);
    let error = start_error(&other_prefix, &v1, &v2).await;
    assert!(error.contains("permission denied"), "{error}");
}

// === runtime stage ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_through_one_replica_is_production_on_all_without_writing_the_registry() {
    let registry_dir = temp_dir("fleet-registry");
    let registry = registry_dir.path().join("registry.toml");
    let text = format!(
        r#"
[policy]
approval_roles = []
require_provenance = false
require_sbom = false

[[versions]]
model = "chat"
version = "v1"
digest = "{}"
stage = "production"

[[versions]]
model = "chat"
version = "v2"
digest = "{}"
stage = "approved"
"#,
        "1".repeat(64),
        "2".repeat(64)
    );
    std::fs::write(&registry, &text).unwrap();
    let tables = format!("[registry]\nfile = {:?}", registry.display().to_string());
    let fleet = Fleet::start("runtime-stage", 2, &routes("", &tables), Run::InProcess).await;
    fleet.settle().await;

    let url = fleet.replicas[0].admin_url(&format!("/v1/routes/{ROUTE}/promote"));
    let token = fleet.replicas[0].token();
    let reply = admin_call(&url, Method::POST, Some(&token), None, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let generation = generation_of(&reply);

    let other = &fleet.replicas[1];
    let deadline = Instant::now() + PROPAGATION;
    let routes = loop {
        let routes = other.routes().await;
        if routes["generation"] == generation {
            break routes;
        }
        assert!(Instant::now() < deadline, "never propagated: {routes}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let stable = &route_of(&routes)["registry"]["stable"];
    assert_eq!(stable["version"], CANDIDATE, "{routes}");
    assert_eq!(stable["stage"], "production", "{routes}");
    assert_eq!(stable["file_stage"], "approved", "{routes}");
    assert_eq!(routes["production"][CANDIDATE]["route"], ROUTE, "{routes}");
    assert_eq!(
        std::fs::read_to_string(&registry).unwrap(),
        text,
        "no replica writes the registry file"
    );
}
