//! The shipped single-replica Kubernetes layout, run for real: the weir.toml of
//! deploy/kubernetes/weir-single.yaml and the registry of deploy/kubernetes/common.yaml, with
//! their paths mapped to a scratch directory (the registry read-only, as its ConfigMap mount is),
//! backends pointed at in-process model servers and the canary's interval and minimum sample
//! shortened, served by the `weir serve --config` binary. A healthy candidate goes through every
//! step to promotion, a failing one is rolled back; the audit log records each decision once and
//! nothing is retried.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, Response};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

const ROUTE: &str = "chat";
const STABLE: &str = "chat@v1";
const CANDIDATE: &str = "chat@v2";
/// The canary's window here (the shipped one is 5 minutes).
const INTERVAL: Duration = Duration::from_millis(300);
/// A whole canary through five steps on a busy 2-core machine.
const CANARY_DEADLINE: Duration = Duration::from_secs(90);

/// The two canaries share two cores; one at a time keeps their windows comparable.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// === the shipped layout ===

fn manifest(file: &str) -> Vec<serde_yaml::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

/// `data[key]` of ConfigMap `name` in `file`.
fn config_map_file(file: &str, name: &str, key: &str) -> String {
    manifest(file)
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
        .and_then(|d| d["data"][key].as_str())
        .unwrap_or_else(|| panic!("{file}: no ConfigMap {name} with {key}"))
        .to_string()
}

/// A scratch directory standing in for the pod's file system, with the shipped config in it.
struct Pod {
    dir: TempDir,
    config: PathBuf,
    registry: PathBuf,
    registry_bytes: Vec<u8>,
    state_dir: PathBuf,
}

/// Makes the registry's directory writable again when the test ends, so it can be removed.
struct Unlocked(PathBuf);

impl Drop for Unlocked {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
    }
}

/// Maps an absolute path of the pod to the scratch directory, by its mount.
fn map_path(path: &str, mounts: &[(&str, PathBuf)]) -> PathBuf {
    mounts
        .iter()
        .filter_map(|(at, to)| match path.strip_prefix(at)? {
            "" => Some(to.clone()),
            rest => rest.strip_prefix('/').map(|rest| to.join(rest)),
        })
        .next()
        .unwrap_or_else(|| panic!("the shipped config names {path}, which no mount here maps"))
}

/// Whether a config key names a file or directory.
fn is_path_key(key: &str) -> bool {
    const TLS: [&str; 9] = [
        "cert",
        "key",
        "ca",
        "client_ca",
        "client_cert",
        "client_key",
        "etcd_ca",
        "etcd_cert",
        "etcd_key",
    ];
    key == "dir" || key == "file" || key.ends_with("_file") || TLS.contains(&key)
}

/// Rewrites every file and directory the config names through `mounts`; any other string that
/// looks like a pod path is a key this mapping does not know, and fails the test.
fn map_paths(key: &str, value: &mut toml::Value, mounts: &[(&str, PathBuf)]) {
    match value {
        toml::Value::String(s) if is_path_key(key) => {
            *s = map_path(s, mounts).display().to_string();
        }
        toml::Value::String(s) => assert!(
            !(s.starts_with("/etc") || s.starts_with("/var")),
            "{key} = {s:?} looks like a path: map it"
        ),
        toml::Value::Array(items) => items.iter_mut().for_each(|v| map_paths(key, v, mounts)),
        toml::Value::Table(table) => table.iter_mut().for_each(|(k, v)| map_paths(k, v, mounts)),
        _ => {}
    }
}

impl Pod {
    /// The shipped config with its mounts mapped into a scratch directory, `backends` (label →
    /// URL) in place of the model Services, and the canary's window shortened.
    fn shipped(backends: &[(&str, String)]) -> (Pod, Unlocked) {
        let text = config_map_file(
            "deploy/kubernetes/weir-single.yaml",
            "weir-single-config",
            "weir.toml",
        );
        let registry_text = config_map_file(
            "deploy/kubernetes/common.yaml",
            "weir-registry",
            "registry.toml",
        );
        let dir = temp_dir("deploy-canary");
        let etc = dir.path().join("etc");
        let volume = dir.path().join("state"); // the PVC, mounted at /var/lib/weir
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&volume).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "deploy-canary-test-token\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();

        let mut config: toml::Value = toml::from_str(&text).expect("the shipped weir.toml");
        map_paths(
            "",
            &mut config,
            &[
                ("/etc/weir-token/token", token),
                ("/etc/weir", etc.clone()),
                ("/var/lib/weir", volume),
            ],
        );
        config["listener"]["addr"] = "127.0.0.1:0".into();
        config["admin"]["addr"] = "127.0.0.1:0".into();
        for version in config["versions"].as_array_mut().unwrap() {
            let label = format!(
                "{}@{}",
                version["model"].as_str().unwrap(),
                version["version"].as_str().unwrap()
            );
            let url = backends
                .iter()
                .find(|(l, _)| *l == label)
                .unwrap_or_else(|| panic!("no test backend for {label}"));
            version["backends"] = toml::Value::Array(vec![url.1.clone().into()]);
        }
        let route = config["routes"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|r| r["name"].as_str() == Some(ROUTE))
            .expect("the shipped route");
        let canary = route["canary"]
            .as_table_mut()
            .expect("the shipped canary policy");
        canary.insert(
            "interval".into(),
            format!("{}ms", INTERVAL.as_millis()).into(),
        );
        canary.insert("min_requests".into(), 20.into());

        let registry = PathBuf::from(config["registry"]["file"].as_str().unwrap());
        let state_dir = PathBuf::from(config["state"]["dir"].as_str().unwrap());
        let config_path = etc.join("weir.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        std::fs::write(&registry, &registry_text).unwrap();
        // Read-only as its ConfigMap mount is. Root (CI) can still write it, so the tests also
        // compare its bytes afterwards.
        std::fs::set_permissions(&registry, std::fs::Permissions::from_mode(0o444)).unwrap();
        std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o555)).unwrap();
        let unlocked = Unlocked(etc);
        let pod = Pod {
            dir,
            config: config_path,
            registry,
            registry_bytes: registry_text.into_bytes(),
            state_dir,
        };
        (pod, unlocked)
    }

    fn serve(&self) -> WeirProcess {
        WeirProcess::spawn(
            &["serve", "--config", self.config.to_str().unwrap()],
            self.dir.path(),
        )
    }

    fn assert_registry_untouched(&self) {
        let bytes = std::fs::read(&self.registry).unwrap();
        assert!(
            bytes == self.registry_bytes,
            "the read-only registry was rewritten:\n{}",
            String::from_utf8_lossy(&bytes)
        );
        let mode = std::fs::metadata(&self.registry)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444, "the registry's mode changed");
        let leftovers: Vec<_> = std::fs::read_dir(self.registry.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "weir.toml" && n != "registry.toml")
            .collect();
        assert!(
            leftovers.is_empty(),
            "weir wrote beside the registry: {leftovers:?}"
        );
    }

    fn audit(&self) -> Vec<Value> {
        audit_records(&self.state_dir)
    }
}

// === model servers ===

/// An OpenAI-style model server reporting `label` on `GET /v1/models` (the shipped identity
/// probe) and answering chat completions, with a 500 when `failing`.
async fn model_server(label: &'static str, failing: bool) -> Backend {
    Backend::start(move |req| async move {
        let path = req.uri().path().to_string();
        let _ = req.into_body().collect().await;
        let (status, body) = if path == "/v1/models" {
            (
                200,
                json!({"object": "list", "data": [{"id": label, "object": "model"}]}),
            )
        } else if failing {
            (500, json!({"error": {"message": "model crashed"}}))
        } else {
            let message =
                json!({"role": "assistant", "content": "The capital of France is Paris."});
            (
                200,
                json!({"object": "chat.completion", "choices": [{"index": 0, "message": message}]}),
            )
        };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap()
    })
    .await
}

// === traffic ===

/// Chat completions sent by background workers until stopped, counted by the version and
/// status that answered.
struct Load {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    served: Arc<Mutex<Vec<(String, u16)>>>,
    lost: Arc<AtomicUsize>,
}

impl Load {
    fn start(url: String, workers: usize) -> Load {
        let (stop, stopped) = watch::channel(false);
        let served = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(AtomicUsize::new(0));
        let client = http1();
        let tasks = (0..workers)
            .map(|worker| {
                let (client, stopped, url) = (client.clone(), stopped.clone(), url.clone());
                let (served, lost) = (served.clone(), lost.clone());
                tokio::spawn(async move {
                    let mut i = 0usize;
                    while !*stopped.borrow() {
                        i += 1;
                        let body = json!({
                            "model": "chat",
                            "messages": [{"role": "user", "content": format!("capital of France? {worker}/{i}")}],
                        });
                        let req = request(Method::POST, &url)
                            .header("content-type", "application/json")
                            .body(full(body.to_string()))
                            .unwrap();
                        let answered = tokio::time::timeout(DEADLINE, async {
                            let response = client.request(req).await.ok()?;
                            let status = response.status().as_u16();
                            let version = response
                                .headers()
                                .get("x-weir-version")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            response.into_body().collect().await.ok()?;
                            Some((version, status))
                        })
                        .await;
                        match answered {
                            Ok(Some(seen)) => served.lock().unwrap().push(seen),
                            _ => {
                                lost.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            served,
            lost,
        }
    }

    /// Stops the workers and returns every (version, status) answered.
    async fn stop(self) -> Vec<(String, u16)> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("load workers stop")
                .expect("a load worker panicked");
        }
        let lost = self.lost.load(Ordering::SeqCst);
        assert_eq!(lost, 0, "{lost} requests got no response");
        let served = self.served.lock().unwrap().clone();
        served
    }
}

// === what weir says ===

async fn route(weir: &WeirProcess) -> Value {
    let reply = get(&http1(), &weir.admin_url("/v1/routes")).await;
    assert_eq!(reply.status, 200, "GET /v1/routes: {}", reply.text());
    reply.json()["routes"]
        .as_array()
        .expect("/v1/routes has routes")
        .iter()
        .find(|r| r["name"] == ROUTE)
        .cloned()
        .expect("the shipped route is served")
}

async fn decisions_counted(weir: &WeirProcess, decision: &str) -> f64 {
    let text = get(&http1(), &weir.admin_url("/metrics")).await.text();
    metric(
        &parse_metrics(&text),
        "weir_canary_decisions_total",
        &[("route", ROUTE), ("decision", decision)],
    )
    .unwrap_or(0.0)
}

/// The route's canary decisions in the audit log, by name.
fn decisions(audit: &[Value]) -> Vec<String> {
    audit
        .iter()
        .filter(|r| r["action"] == "canary_decision" && r["route"] == ROUTE)
        .map(|r| r["after"]["decision"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The routing changes the canary controller made, by action.
fn canary_changes(audit: &[Value]) -> Vec<String> {
    audit
        .iter()
        .filter(|r| r["actor"] == "canary" && r["action"] != "canary_decision")
        .map(|r| r["action"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// For failure messages: the decisions so far and what weir logged about the canary.
fn story(pod: &Pod, weir: &WeirProcess) -> String {
    let log: String = weir
        .log()
        .lines()
        .filter(|l| l.contains("canary") || l.contains("ERROR") || l.contains("WARN"))
        .take(40)
        .map(|l| format!("\n  {l}"))
        .collect();
    format!("\ndecisions: {:?}\nlog:{log}", decisions(&pod.audit()))
}

/// Polls for three canary windows that the controller does not decide `decision` again.
async fn assert_no_more(weir: &WeirProcess, decision: &str, count: f64) {
    let until = Instant::now() + 3 * INTERVAL;
    while Instant::now() < until {
        assert_eq!(
            decisions_counted(weir, decision).await,
            count,
            "weir_canary_decisions_total{{decision={decision:?}}} moved after the {decision}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops weir gracefully and checks what every run must leave behind: the audit chain verifies,
/// the registry is as shipped, no refusal was logged.
async fn stop_and_check(pod: &Pod, mut weir: WeirProcess) -> Vec<Value> {
    weir.sigterm();
    let status = weir.exit_status(DEADLINE).await;
    assert!(
        status.success(),
        "weir exited with {status}:\n{}",
        weir.log()
    );
    let log = weir.log();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
    assert!(refused.is_empty(), "weir refused something: {refused:#?}");
    pod.assert_registry_untouched();
    let audit_file = pod.state_dir.join("audit.jsonl");
    let verify = run_weir(
        &["audit", "verify", audit_file.to_str().unwrap()],
        pod.dir.path(),
        DEADLINE,
    )
    .await;
    assert!(
        verify.status.success(),
        "weir audit verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let audit = pod.audit();
    assert_eq!(
        audit.last().unwrap()["action"],
        "stop",
        "the stop record closes the log"
    );
    audit
}

// === the canaries ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_config_promotes_a_healthy_candidate_with_the_registry_read_only() {
    let _one = ONE_AT_A_TIME.lock().await;
    let v1 = model_server(STABLE, false).await;
    let v2 = model_server(CANDIDATE, false).await;
    let (pod, _unlocked) = Pod::shipped(&[(STABLE, v1.url()), (CANDIDATE, v2.url())]);
    let weir = pod.serve();
    let load = Load::start(weir.url("/v1/chat/completions"), 4);

    let deadline = Instant::now() + CANARY_DEADLINE;
    while route(&weir).await["stable"] != CANDIDATE {
        if Instant::now() >= deadline {
            panic!(
                "the candidate was never promoted: {}{}",
                route(&weir).await,
                story(&pod, &weir)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = route(&weir).await;
    assert_eq!(promoted["candidate"], Value::Null, "{promoted}");
    assert_eq!(promoted["state"], "stable", "{promoted}");
    assert_eq!(promoted["rollback_target"], STABLE, "{promoted}");
    assert_eq!(decisions_counted(&weir, "promote").await, 1.0);
    assert_no_more(&weir, "promote", 1.0).await;
    let served = load.stop().await;
    assert!(
        served.iter().all(|(_, status)| *status == 200),
        "a healthy canary answers every request"
    );
    let reply = get(&http1(), &weir.url("/v1/models")).await;
    assert_eq!(reply.served_by(), CANDIDATE, "the promoted version serves");

    let audit = stop_and_check(&pod, weir).await;
    let made = decisions(&audit);
    let acts: Vec<&String> = made.iter().filter(|d| *d != "hold").collect();
    assert_eq!(
        acts,
        ["advance", "advance", "advance", "advance", "advance", "promote"],
        "one advance per shipped step, then one promotion: {made:?}"
    );
    assert_eq!(
        canary_changes(&audit),
        [
            "set_weight",
            "set_weight",
            "set_weight",
            "set_weight",
            "set_weight",
            "promote"
        ]
    );
    let promote = audit
        .iter()
        .find(|r| r["action"] == "promote")
        .expect("the promotion is audited");
    assert_eq!(promote["after"]["stable"], CANDIDATE, "{promote}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_config_rolls_back_a_failing_candidate_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let v1 = model_server(STABLE, false).await;
    let v2 = model_server(CANDIDATE, true).await;
    let (pod, _unlocked) = Pod::shipped(&[(STABLE, v1.url()), (CANDIDATE, v2.url())]);
    let weir = pod.serve();
    let load = Load::start(weir.url("/v1/chat/completions"), 4);

    let deadline = Instant::now() + CANARY_DEADLINE;
    while route(&weir).await["state"] != "rolled_back" {
        if Instant::now() >= deadline {
            panic!(
                "the candidate was never rolled back: {}{}",
                route(&weir).await,
                story(&pod, &weir)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rolled_back = route(&weir).await;
    assert_eq!(rolled_back["stable"], STABLE, "{rolled_back}");
    assert_eq!(rolled_back["weight"], 0, "{rolled_back}");
    assert_eq!(decisions_counted(&weir, "rollback").await, 1.0);
    assert_no_more(&weir, "rollback", 1.0).await;
    let served = load.stop().await;
    assert!(
        served.iter().any(|(v, s)| v == CANDIDATE && *s == 500),
        "the candidate's failures reached clients before the rollback"
    );
    for _ in 0..50 {
        let reply = get(&http1(), &weir.url("/v1/models")).await;
        assert_eq!(reply.served_by(), STABLE, "only the prior version serves");
    }

    let audit = stop_and_check(&pod, weir).await;
    let made = decisions(&audit);
    let acts: Vec<&String> = made.iter().filter(|d| *d != "hold").collect();
    assert_eq!(
        acts,
        ["advance", "rollback"],
        "the first step, then one rollback: {made:?}"
    );
    assert_eq!(canary_changes(&audit), ["set_weight", "rollback"]);
    let rollback = audit
        .iter()
        .find(|r| r["action"] == "canary_decision" && r["after"]["decision"] == "rollback")
        .unwrap();
    assert_eq!(rollback["after"]["version"], CANDIDATE, "{rollback}");
    assert!(
        rollback["reason"]
            .as_str()
            .unwrap_or("")
            .contains("error_rate"),
        "{rollback}"
    );
}
