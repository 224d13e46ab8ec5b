//! The MLflow Model Registry as weir's source of pins, against a real `mlflow server` (the
//! binary in `$WEIR_MLFLOW`; `.ci/run` installs it in a venv of its own): aliases pin the
//! routes, a moved challenger starts a canary, a version whose tags or artifact fail the policy
//! is refused while traffic stays on the last good pin, promotions and rollbacks move the
//! champion alias in MLflow, and an MLflow outage leaves traffic alone while refusing changes.
//!
//! Each test starts its own MLflow (about 10 s) on a free loopback port with a SQLite store in a
//! temporary directory; versions are registered with `weir registry --mlflow`, as users would.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};

use common::*;

/// How long MLflow gets to answer `/health` after it is started.
const MLFLOW_START: Duration = Duration::from_secs(120);
/// How long a change in MLflow gets to reach weir (the re-read interval is 1 s).
const FOLLOW: Duration = Duration::from_secs(15);
const ROUTE: &str = "chat";

// === a real MLflow tracking server ===

struct Mlflow {
    child: Option<Child>,
    /// Kills MLflow's process group should this test process die without dropping it.
    watchdog: Option<Child>,
    dir: TempDir,
    port: u16,
}

fn mlflow_binary() -> PathBuf {
    let tool = std::env::var_os("WEIR_MLFLOW").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/mlflow-venv/bin/mlflow"),
        PathBuf::from,
    );
    assert!(
        tool.exists(),
        "{} is missing: these tests start a real MLflow server; run .ci/run once (it installs \
         mlflow==3.17.2 into target/mlflow-venv), or set WEIR_MLFLOW to an mlflow binary",
        tool.display()
    );
    tool
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Mlflow {
    async fn start() -> Mlflow {
        let mut mlflow = Mlflow {
            child: None,
            watchdog: None,
            dir: temp_dir("mlflow"),
            port: 0,
        };
        for attempt in 1..=3 {
            mlflow.port = free_port();
            mlflow.spawn();
            match mlflow.wait_healthy().await {
                Ok(()) => return mlflow,
                Err(why) if attempt < 3 => {
                    eprintln!("MLflow attempt {attempt} failed ({why}); trying another port");
                    mlflow.stop();
                }
                Err(why) => panic!("MLflow did not start: {why}\n{}", mlflow.log_tail()),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mlflow.log"))
            .unwrap();
        let child = Command::new(mlflow_binary())
            .args(["server", "--backend-store-uri"])
            .arg(format!(
                "sqlite:///{}",
                self.dir.path().join("store.db").display()
            ))
            .arg("--default-artifact-root")
            .arg(self.dir.path().join("artifacts"))
            .args(["--host", "127.0.0.1", "--workers", "1", "--port"])
            .arg(self.port.to_string())
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", mlflow_binary().display()));
        let group = child.id();
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; kill -KILL -{group} 2>/dev/null",
                std::process::id()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh runs");
        self.child = Some(child);
        self.watchdog = Some(watchdog);
    }

    async fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + MLFLOW_START;
        let client = http1();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                return Err(format!("mlflow server exited: {status}"));
            }
            let probe = request(Method::GET, &format!("{}/health", self.url()))
                .body(empty())
                .unwrap();
            if let Ok(Ok(response)) =
                tokio::time::timeout(Duration::from_secs(2), client.request(probe)).await
            {
                if response.status() == StatusCode::OK {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("/health not OK within {MLFLOW_START:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills MLflow (its whole process group) and waits for it; its store stays.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    /// Starts MLflow again on the same port and store.
    async fn restart(&mut self) {
        self.stop();
        self.spawn();
        if let Err(why) = self.wait_healthy().await {
            panic!(
                "MLflow did not come back on port {}: {why}\n{}",
                self.port,
                self.log_tail()
            );
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("mlflow.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// One REST call; a failure status fails the test.
    async fn call(&self, method: Method, endpoint: &str, body: Value) -> Value {
        let reply = self.try_call(method.clone(), endpoint, body).await;
        assert!(
            reply.status.is_success(),
            "MLflow {method} {endpoint}: {} {}",
            reply.status,
            reply.text()
        );
        reply.json()
    }

    async fn try_call(&self, method: Method, endpoint: &str, body: Value) -> Reply {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.url());
        let req = if method == Method::GET {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(
                    body.as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())),
                )
                .finish();
            request(method, &format!("{url}?{query}")).body(empty())
        } else {
            request(method, &url)
                .header("content-type", "application/json")
                .body(full(body.to_string()))
        };
        send(&http1(), req.unwrap()).await
    }

    async fn create_model(&self, name: &str) {
        self.call(
            Method::POST,
            "registered-models/create",
            json!({"name": name}),
        )
        .await;
    }

    /// A new version of `name` (MLflow numbers them 1, 2, …); returns its number.
    async fn create_version(&self, name: &str) -> String {
        let created = self
            .call(
                Method::POST,
                "model-versions/create",
                json!({"name": name, "source": format!("s3://models/{name}/new")}),
            )
            .await;
        created["model_version"]["version"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn set_alias(&self, name: &str, alias: &str, version: &str) {
        self.call(
            Method::POST,
            "registered-models/alias",
            json!({"name": name, "alias": alias, "version": version}),
        )
        .await;
    }

    /// The version `alias` names, None when it is not set.
    async fn alias(&self, name: &str, alias: &str) -> Option<String> {
        let reply = self
            .try_call(
                Method::GET,
                "registered-models/alias",
                json!({"name": name, "alias": alias}),
            )
            .await;
        if reply.status == StatusCode::BAD_REQUEST && reply.text().contains("not found") {
            return None;
        }
        assert!(reply.status.is_success(), "alias {alias}: {}", reply.text());
        Some(
            reply.json()["model_version"]["version"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    }

    async fn set_tag(&self, name: &str, version: &str, key: &str, value: &str) {
        self.call(
            Method::POST,
            "model-versions/set-tag",
            json!({"name": name, "version": version, "key": key, "value": value}),
        )
        .await;
    }

    async fn tags(&self, name: &str, version: &str) -> Value {
        let got = self
            .call(
                Method::GET,
                "model-versions/get",
                json!({"name": name, "version": version}),
            )
            .await;
        let mut tags = serde_json::Map::new();
        for t in got["model_version"]["tags"]
            .as_array()
            .into_iter()
            .flatten()
        {
            tags.insert(t["key"].as_str().unwrap().into(), t["value"].clone());
        }
        Value::Object(tags)
    }
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        self.stop();
    }
}

// === registering versions with `weir registry --mlflow` ===

/// A directory with one model artifact per version, provenance and SBOM files.
struct Workspace {
    dir: TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = temp_dir("mlflow-ws");
        std::fs::write(dir.path().join("prov.json"), "{\"builder\": \"ci\"}").unwrap();
        std::fs::write(dir.path().join("sbom.json"), "{\"components\": []}").unwrap();
        Workspace { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `model-N/` with weights and config unique to `version`.
    fn artifact(&self, version: &str) -> PathBuf {
        let dir = self.path().join(format!("model-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("weights.safetensors"),
            pattern(
                10_000,
                version.len() as u64 * 31 + version.as_bytes()[0] as u64,
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("config.json"),
            format!("{{\"version\": {version:?}}}"),
        )
        .unwrap();
        dir
    }

    fn weir(&self, mlflow: &Mlflow, args: &[&str]) -> Output {
        let url = mlflow.url();
        let mut all = vec!["registry", "--mlflow", &url];
        all.extend_from_slice(args);
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .current_dir(self.path())
            .args(&all)
            .env("USER", "tester")
            .env("NO_COLOR", "1")
            .output()
            .expect("weir runs")
    }

    fn ok(&self, mlflow: &Mlflow, args: &[&str]) -> String {
        let out = self.weir(mlflow, args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "weir registry {args:?}:\n{text}");
        text
    }

    /// Registers MLflow version `version` of `chat` (which must exist there) with a digest of
    /// its artifact, provenance, SBOM and backends, approves it by every role and walks it to
    /// `stage`. Returns the artifact's digest.
    fn register(&self, mlflow: &Mlflow, version: &str, backend: &str, stage: &str) -> String {
        let artifact = self.artifact(version);
        let artifact = artifact.to_str().unwrap();
        let added = self.ok(
            mlflow,
            &[
                "add",
                "--model",
                "chat",
                "--version",
                version,
                "--artifact",
                artifact,
                "--provenance",
                "prov.json",
                "--sbom",
                "sbom.json",
                "--backends",
                backend,
            ],
        );
        let digest = added
            .split("sha256 ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("add printed no digest: {added}"))
            .to_string();
        for role in ["platform", "product", "security"] {
            self.ok(
                mlflow,
                &[
                    "approve",
                    "--model",
                    "chat",
                    "--version",
                    version,
                    "--role",
                    role,
                    "--by",
                    "alice",
                    "--days",
                    "30",
                ],
            );
        }
        let walk: &[&str] = match stage {
            "candidate" => &["candidate"],
            "approved" => &["candidate", "approved"],
            "production" => &["candidate", "approved", "production"],
            other => panic!("unknown stage {other}"),
        };
        for step in walk {
            self.ok(
                mlflow,
                &[
                    "stage",
                    "--model",
                    "chat",
                    "--version",
                    version,
                    "--to",
                    step,
                ],
            );
        }
        digest
    }
}

/// `chat` in MLflow with versions 1..=n, each registered at its stage and served by its
/// backend; returns the digests by version number.
async fn model_with(mlflow: &Mlflow, ws: &Workspace, versions: &[(&str, &Backend)]) -> Vec<String> {
    mlflow.create_model("chat").await;
    let mut digests = Vec::new();
    for (i, (stage, backend)) in versions.iter().enumerate() {
        let number = mlflow.create_version("chat").await;
        assert_eq!(number, (i + 1).to_string());
        digests.push(ws.register(mlflow, &number, &backend.url(), stage));
    }
    digests
}

/// An MLflow-pinned route; `extra` goes into the route table (weight, canary).
fn config(mlflow: &Mlflow, extra: &str) -> String {
    format!(
        r#"
[registry]
mlflow = "{}"
mlflow_interval = "1s"
mlflow_timeout = "2s"

[[routes]]
name = "chat"
prefix = "/"
mlflow_model = "chat"
{extra}
"#,
        mlflow.url()
    )
}

/// Which versions answered `n` requests.
/// `weir check` of the MLflow-pinned config, run in `dir`: whether it passed, and its output.
fn check(mlflow: &Mlflow, dir: &Path, args: &[&str]) -> (bool, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, config(mlflow, "")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .current_dir(dir)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .args(args)
        .output()
        .expect("weir runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn served(weir: &Weir, n: usize) -> std::collections::BTreeMap<String, usize> {
    let client = http1();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let reply = get(&client, &weir.url("/v1/chat/completions")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        *seen.entry(reply.served_by().to_string()).or_insert(0) += 1;
    }
    seen
}

fn of_action<'a>(records: &'a [Value], action: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["action"] == action).collect()
}

fn position(records: &[Value], action: &str) -> usize {
    records
        .iter()
        .position(|r| r["action"] == action)
        .unwrap_or_else(|| panic!("no {action} record in {records:#?}"))
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_pin_the_route_and_a_moved_challenger_starts_a_canary_that_moves_the_champion() {
    let mlflow = Mlflow::start().await;
    let ws = Workspace::new();
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    let digests = model_with(&mlflow, &ws, &[("production", &v1), ("candidate", &v2)]).await;
    mlflow.set_alias("chat", "champion", "1").await;

    let canary = r#"
[routes.canary]
steps = ["50%", "100%"]
interval = "300ms"
min_requests = 20
max_p99_ratio = 50.0
progress_deadline = "20s"
"#;
    let weir = Weir::start(&config(&mlflow, canary), &[]).await;
    let route = weir.route(ROUTE).await;
    assert_eq!(route["stable"], "chat@1", "{route}");
    assert_eq!(route["candidate"], Value::Null, "{route}");
    assert_eq!(
        served(&weir, 10).await.keys().collect::<Vec<_>>(),
        ["chat@1"]
    );

    // Moving challenger in MLflow starts the canary within the re-read interval.
    mlflow.set_alias("chat", "challenger", "2").await;
    assert_eventually!(
        within FOLLOW,
        weir.route(ROUTE).await["candidate"] == "chat@2",
        "challenger never became the candidate: {}",
        weir.route(ROUTE).await
    );
    let records = weir.audit();
    let sync = of_action(&records, "mlflow_sync");
    let sync = sync
        .iter()
        .find(|r| r.to_string().contains("chat@2"))
        .unwrap_or_else(|| panic!("no mlflow_sync record names chat@2: {records:#?}"));
    assert_eq!(sync["actor"], "mlflow", "{sync}");
    assert!(
        sync["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(&digests[1]),
        "the sync record names the version's digest {}: {sync}",
        digests[1]
    );

    // Traffic lets the canary judge and promote; the promotion moves champion in MLflow.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let url = weir.url("/v1/chat/completions");
        tokio::spawn(async move {
            let client = http1();
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                statuses.push(get(&client, &url).await.status);
            }
            statuses
        })
    };
    assert_eventually!(
        within Duration::from_secs(60),
        weir.route(ROUTE).await["stable"] == "chat@2",
        "the canary never promoted chat@2: {}\n{:#?}",
        weir.route(ROUTE).await,
        weir.audit()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "every request during the canary succeeded"
    );
    assert_eq!(mlflow.alias("chat", "champion").await.as_deref(), Some("2"));
    assert_eq!(mlflow.alias("chat", "challenger").await, None);
    let records = weir.audit();
    let intent = position(&records, "mlflow_alias");
    let promote = position(&records, "promote");
    assert!(
        intent < promote,
        "the intent to move the alias is recorded before the promotion"
    );
    assert_eq!(records[promote]["actor"], "canary", "{}", records[promote]);

    // The next reads see what weir wrote: no flip back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let route = weir.route(ROUTE).await;
    assert_eq!(route["stable"], "chat@2", "{route}");
    assert_eq!(
        served(&weir, 10).await.keys().collect::<Vec<_>>(),
        ["chat@2"]
    );

    // Rollback moves champion back to the prior version, audited the same way.
    let reply = weir
        .admin(Method::POST, "/v1/routes/chat/rollback", None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(mlflow.alias("chat", "champion").await.as_deref(), Some("1"));
    let records = weir.audit();
    let rollback = position(&records, "rollback");
    let intents: Vec<usize> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r["action"] == "mlflow_alias")
        .map(|(i, _)| i)
        .collect();
    assert!(
        intents.len() == 2 && intents[1] < rollback && intents[1] > promote,
        "an intent record precedes the rollback: {records:#?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(weir.route(ROUTE).await["stable"], "chat@1");
    assert_eq!(
        served(&weir, 10).await.keys().collect::<Vec<_>>(),
        ["chat@1"]
    );
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_failing_policy_are_refused_and_traffic_stays_on_the_last_good_pin() {
    let mlflow = Mlflow::start().await;
    let ws = Workspace::new();
    let backends = [
        Backend::named("v1").await,
        Backend::named("v2").await,
        Backend::named("v3").await,
        Backend::named("v4").await,
        Backend::named("v5").await,
    ];
    model_with(
        &mlflow,
        &ws,
        &[("production", &backends[0]), ("candidate", &backends[1])],
    )
    .await;
    // 3: created in MLflow, never given a digest.
    assert_eq!(mlflow.create_version("chat").await, "3");
    mlflow
        .set_tag("chat", "3", "weir.backends", &backends[2].url())
        .await;
    mlflow.set_tag("chat", "3", "weir.stage", "candidate").await;
    // 4: approved, and then its approvals expired.
    assert_eq!(mlflow.create_version("chat").await, "4");
    ws.register(&mlflow, "4", &backends[3].url(), "approved");
    let expired = json!([
        {"by": "alice", "role": "platform", "at": "2026-01-01T00:00:00Z", "expires_at": "2026-02-01T00:00:00Z"},
        {"by": "alice", "role": "product", "at": "2026-01-01T00:00:00Z", "expires_at": "2026-02-01T00:00:00Z"},
        {"by": "alice", "role": "security", "at": "2026-01-01T00:00:00Z", "expires_at": "2026-02-01T00:00:00Z"}
    ]);
    mlflow
        .set_tag("chat", "4", "weir.approvals", &expired.to_string())
        .await;
    // 5: registered, then a file of its artifact was replaced.
    assert_eq!(mlflow.create_version("chat").await, "5");
    ws.register(&mlflow, "5", &backends[4].url(), "candidate");
    std::fs::write(ws.path().join("model-5/weights.safetensors"), b"poisoned").unwrap();

    mlflow.set_alias("chat", "champion", "1").await;
    mlflow.set_alias("chat", "challenger", "2").await;
    let weir = Weir::start(&config(&mlflow, "weight = \"50%\""), &[]).await;
    let route = weir.route(ROUTE).await;
    assert_eq!(
        (&route["stable"], &route["candidate"]),
        (&json!("chat@1"), &json!("chat@2")),
        "{route}"
    );
    assert_eq!(
        weir.metric("weir_mlflow_pin_refused", &[("route", ROUTE)])
            .await,
        Some(0.0)
    );

    let (ok, out) = check(&mlflow, ws.path(), &[]);
    assert!(
        ok && out.contains("MLflow pins stable chat@1") && out.contains("candidate chat@2"),
        "weir check reads the aliases and names the pins: {out}"
    );

    let cases = [
        ("3", "weir.sha256"),
        ("4", "expired"),
        ("5", "tampered or replaced"),
    ];
    for (n, (version, why)) in cases.iter().enumerate() {
        mlflow.set_alias("chat", "challenger", version).await;
        assert_eventually!(
            within FOLLOW,
            of_action(&weir.audit(), "mlflow_refused").len() == n + 1,
            "challenger → {version} was never refused: {:#?}",
            weir.audit()
        );
        let records = weir.audit();
        let refused = of_action(&records, "mlflow_refused")[n];
        let reason = refused["reason"].as_str().unwrap();
        assert!(
            reason.contains(&format!("chat@{version}")) && reason.contains(why),
            "the refusal of chat@{version} names why ({why}): {reason}"
        );
        assert_eq!(refused["route"], ROUTE);
        let (ok, out) = check(&mlflow, ws.path(), &[]);
        assert!(
            !ok && out.contains("routes[0].mlflow_model (chat)")
                && out.contains(&format!("chat@{version}"))
                && out.contains(why),
            "weir check fails on the refused alias, naming why ({why}): {out}"
        );
        assert_eq!(
            weir.metric("weir_mlflow_pin_refused", &[("route", ROUTE)])
                .await,
            Some(1.0),
            "the refusal is alerted on"
        );
        let route = weir.route(ROUTE).await;
        assert_eq!(route["candidate"], "chat@2", "last good pin kept: {route}");
        let seen = served(&weir, 30).await;
        assert!(
            seen.keys().all(|v| v == "chat@1" || v == "chat@2"),
            "only the last good pins serve: {seen:?}"
        );
        // Refused once, not at every read.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(of_action(&weir.audit(), "mlflow_refused").len(), n + 1);
    }
    assert_eq!(
        backends[2].hits() + backends[3].hits() + backends[4].hits(),
        0
    );
    assert_eq!(
        weir.metric("weir_mlflow_refusals_total", &[("route", ROUTE)])
            .await,
        Some(3.0)
    );

    // A challenger that passes again clears the alert.
    mlflow.set_alias("chat", "challenger", "2").await;
    assert_eventually!(
        within FOLLOW,
        weir.metric("weir_mlflow_pin_refused", &[("route", ROUTE)])
            .await
            == Some(0.0),
        "the refusal never cleared"
    );
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlflow_away_keeps_traffic_refuses_changes_and_converges_when_back() {
    let mut mlflow = Mlflow::start().await;
    let ws = Workspace::new();
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    model_with(&mlflow, &ws, &[("production", &v1), ("candidate", &v2)]).await;
    mlflow.set_alias("chat", "champion", "1").await;
    mlflow.set_alias("chat", "challenger", "2").await;

    let state = temp_dir("state");
    let file = state.path().join("weir.toml");
    let template = config(&mlflow, "weight = \"50%\"");
    write_config(&file, &template, &[], state.path());
    let weir = Weir::start_file(&file, state).await;
    let ready = get(&http1(), &weir.admin_url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["checks"]["mlflow"], "ok");

    mlflow.stop();
    assert_eventually!(
        within FOLLOW,
        get(&http1(), &weir.admin_url("/readyz")).await.status == StatusCode::SERVICE_UNAVAILABLE,
        "readiness never reported MLflow away"
    );
    let ready = get(&http1(), &weir.admin_url("/readyz")).await;
    let checks = &ready.json()["checks"];
    assert!(
        checks["mlflow"]
            .as_str()
            .unwrap()
            .contains("MLflow unreachable"),
        "{checks}"
    );
    let excluded = get(&http1(), &weir.admin_url("/readyz?exclude=mlflow")).await;
    assert_eq!(excluded.status, StatusCode::OK, "{}", excluded.text());
    assert_eq!(weir.metric("weir_mlflow_up", &[]).await, Some(0.0));
    let (ok, out) = check(&mlflow, ws.path(), &[]);
    assert!(
        !ok && out.contains("cannot read the aliases from MLflow") && out.contains("--offline"),
        "weir check says MLflow cannot be read: {out}"
    );
    let (ok, out) = check(&mlflow, ws.path(), &["--offline"]);
    assert!(ok && out.contains("not contacted"), "{out}");

    // Traffic goes on on the last pins.
    let seen = served(&weir, 40).await;
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["chat@1", "chat@2"],
        "{seen:?}"
    );
    // A promotion needs MLflow: refused, not applied.
    let generation = weir.generation().await;
    let reply = weir
        .admin(Method::POST, "/v1/routes/chat/promote", None)
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["outcome"], "not_applied", "{}", reply.text());
    assert!(reply.text().contains("MLflow"), "{}", reply.text());
    assert_eq!(weir.generation().await, generation);
    assert_eq!(weir.route(ROUTE).await["stable"], "chat@1");
    // A reload keeps the pins and says why.
    let reply = weir.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(reply.text().contains("MLflow"), "{}", reply.text());
    let route = weir.route(ROUTE).await;
    assert_eq!(
        (&route["stable"], &route["candidate"]),
        (&json!("chat@1"), &json!("chat@2")),
        "{route}"
    );

    // A restart while MLflow is away serves the pins it last served.
    let state = weir.stop().await;
    let weir = Weir::start_file(&file, state).await;
    let route = weir.route(ROUTE).await;
    assert_eq!(
        (&route["stable"], &route["candidate"]),
        (&json!("chat@1"), &json!("chat@2")),
        "cached pins after a restart: {route}"
    );
    assert_eq!(
        served(&weir, 40).await.keys().collect::<Vec<_>>(),
        ["chat@1", "chat@2"]
    );
    assert_eq!(
        get(&http1(), &weir.admin_url("/readyz")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // MLflow back: ready again, and changes there and from weir flow once more.
    mlflow.restart().await;
    assert_eventually!(
        within FOLLOW,
        get(&http1(), &weir.admin_url("/readyz")).await.status == StatusCode::OK,
        "readiness never came back with MLflow"
    );
    assert_eq!(weir.metric("weir_mlflow_up", &[]).await, Some(1.0));
    let reply = weir
        .admin(Method::POST, "/v1/routes/chat/promote", None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(mlflow.alias("chat", "champion").await.as_deref(), Some("2"));
    assert_eq!(mlflow.alias("chat", "challenger").await, None);
    let records = weir.audit();
    assert!(position(&records, "mlflow_alias") < position(&records, "promote"));
    assert_eq!(
        served(&weir, 10).await.keys().collect::<Vec<_>>(),
        ["chat@2"]
    );
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_serves_the_champion_and_refuses_to_start_without_one() {
    let mlflow = Mlflow::start().await;
    let ws = Workspace::new();
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    let digests = model_with(&mlflow, &ws, &[("production", &v1), ("candidate", &v2)]).await;
    let tags = mlflow.tags("chat", "1").await;
    assert_eq!(tags["weir.sha256"], digests[0].as_str(), "{tags}");
    assert_eq!(tags["weir.stage"], "production", "{tags}");
    assert_eq!(tags["weir.backends"], v1.url().as_str(), "{tags}");

    // No champion yet: weir does not start, and says which alias to set.
    let url = mlflow.url();
    let state = temp_dir("quick");
    let state_path = state.path().to_str().unwrap().to_string();
    let args = [
        "serve",
        "--mlflow",
        &url,
        "--mlflow-model",
        "chat",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--state-dir",
        &state_path,
    ];
    let out = run_weir(&args, ws.path(), Duration::from_secs(30)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("champion"), "{stderr}");

    mlflow.set_alias("chat", "champion", "1").await;
    mlflow.set_alias("chat", "challenger", "2").await;
    let mut weir = WeirProcess::spawn(&[&args[..], &["--weight", "50%"]].concat(), ws.path());
    let client = http1();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let reply = get(&client, &weir.url("/v1/chat/completions")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        seen.insert(reply.served_by().to_string());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["chat@1", "chat@2"],
        "{}",
        weir.log()
    );
    weir.sigterm();
    assert!(weir.exit_status(Duration::from_secs(20)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_model_tag_renames_the_model_on_a_route_by_model() {
    let mlflow = Mlflow::start().await;
    let ws = Workspace::new();
    let echo = Backend::echo("v1").await;
    model_with(&mlflow, &ws, &[("production", &echo)]).await;
    mlflow
        .set_tag("chat", "1", "weir.served_model", "chat-2024-07-15")
        .await;
    mlflow.set_alias("chat", "champion", "1").await;
    let weir = Weir::start(&config(&mlflow, "model = \"chat\""), &[]).await;
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(weir.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(full(r#"{"model": "chat", "messages": []}"#))
        .unwrap();
    let reply = send(&http1(), req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.served_by(), "chat@1");
    assert_eq!(
        reply.json()["body"],
        r#"{"model": "chat-2024-07-15", "messages": []}"#,
        "the version's weir.served_model tag names the model for its servers"
    );
    weir.stop().await;
}
