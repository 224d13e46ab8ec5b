//! `weir registry` on the command line, and pins enforced when serving: a refused step exits 1
//! naming its rule; `verify` names the files that differ; serve refuses a pin that breaks a rule.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn weir(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .current_dir(dir)
        .args(args)
        .env("USER", "tester")
        .output()
        .expect("weir binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let output = weir(dir, args);
    assert!(
        output.status.success(),
        "weir {args:?} failed:\n{}",
        text(&output)
    );
    text(&output)
}

fn refused(dir: &Path, args: &[&str]) -> String {
    let output = weir(dir, args);
    assert_eq!(
        output.status.code(),
        Some(1),
        "weir {args:?} should exit 1:\n{}",
        text(&output)
    );
    text(&output)
}

/// A directory artifact plus provenance and SBOM files.
fn workspace() -> TempDir {
    let dir = temp_dir("registry");
    let d = dir.path();
    std::fs::create_dir_all(d.join("model/tokenizer")).unwrap();
    std::fs::write(d.join("model/weights.safetensors"), vec![7u8; 100_000]).unwrap();
    std::fs::write(d.join("model/config.json"), "{\"layers\": 2}").unwrap();
    std::fs::write(d.join("model/tokenizer/vocab.txt"), "a\nb\n").unwrap();
    std::fs::write(d.join("prov.json"), "{\"builder\": \"ci\"}").unwrap();
    std::fs::write(d.join("sbom.json"), "{\"components\": []}").unwrap();
    dir
}

const REG: [&str; 2] = ["--registry", "registry.toml"];

fn add(dir: &Path, version: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "registry",
        REG[0],
        REG[1],
        "add",
        "--model",
        "chat",
        "--version",
        version,
        "--artifact",
        "model",
    ];
    args.extend_from_slice(extra);
    ok(dir, &args)
}

fn stage(dir: &Path, version: &str, to: &str) -> Output {
    weir(
        dir,
        &[
            "registry",
            REG[0],
            REG[1],
            "stage",
            "--model",
            "chat",
            "--version",
            version,
            "--to",
            to,
        ],
    )
}

fn approve(dir: &Path, version: &str, role: &str, days: &str) {
    ok(
        dir,
        &[
            "registry",
            REG[0],
            REG[1],
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
            days,
        ],
    );
}

#[test]
fn verify_names_changed_missing_and_extra_files() {
    let ws = workspace();
    let d = ws.path();
    let added = add(
        d,
        "v1",
        &["--provenance", "prov.json", "--sbom", "sbom.json"],
    );
    assert!(added.contains("directory of 3 files"), "{added}");
    let verify = [
        "registry",
        REG[0],
        REG[1],
        "verify",
        "--model",
        "chat",
        "--version",
        "v1",
        "--artifact",
        "model",
    ];
    assert!(ok(d, &verify).contains("match"));

    std::fs::write(d.join("model/config.json"), "{\"layers\": 3}").unwrap();
    let out = refused(d, &verify);
    assert!(out.contains("differs: config.json"), "{out}");
    assert!(
        out.contains("expected sha256") && out.contains("actual   sha256"),
        "{out}"
    );

    std::fs::write(d.join("model/config.json"), "{\"layers\": 2}").unwrap();
    std::fs::remove_file(d.join("model/tokenizer/vocab.txt")).unwrap();
    assert!(refused(d, &verify).contains("missing: tokenizer/vocab.txt"));

    std::fs::write(d.join("model/tokenizer/vocab.txt"), "a\nb\n").unwrap();
    std::fs::write(d.join("model/backdoor.py"), "import os").unwrap();
    assert!(refused(d, &verify).contains("extra: backdoor.py"));

    std::fs::remove_file(d.join("model/backdoor.py")).unwrap();
    assert!(
        ok(d, &verify).contains("match"),
        "restored artifact verifies again"
    );
}

#[test]
fn each_policy_rule_refuses_with_its_message() {
    let ws = workspace();
    let d = ws.path();
    add(d, "bare", &[]);
    let out = text(&stage(d, "bare", "candidate"));
    assert!(
        out.contains("rule provenance") && out.contains("rule sbom"),
        "{out}"
    );
    assert_eq!(stage(d, "bare", "candidate").status.code(), Some(1));

    add(
        d,
        "v2",
        &["--provenance", "prov.json", "--sbom", "sbom.json"],
    );
    assert!(
        text(&stage(d, "v2", "production")).contains("rule lifecycle"),
        "draft cannot jump to production"
    );
    assert!(stage(d, "v2", "candidate").status.success());
    approve(d, "v2", "platform", "30");
    approve(d, "v2", "product", "0"); // expires at once
    let out = text(&stage(d, "v2", "approved"));
    assert!(
        out.contains("rule approval_expired") && out.contains("role product"),
        "{out}"
    );
    assert!(
        out.contains("rule approval:")
            || out.contains("rule approval: approved needs an approval from role security"),
        "{out}"
    );
    approve(d, "v2", "product", "30");
    approve(d, "v2", "security", "30");
    assert!(
        stage(d, "v2", "approved").status.success(),
        "{}",
        text(&stage(d, "v2", "approved"))
    );
    let listed = ok(d, &["registry", REG[0], REG[1], "list"]);
    assert!(
        listed.contains("chat@v2") && listed.contains("approved"),
        "{listed}"
    );
    assert!(stage(d, "v2", "retired").status.success());
    assert!(
        text(&stage(d, "v2", "production")).contains("rule lifecycle"),
        "retired is final"
    );
}

#[test]
fn latest_and_duplicates_are_not_registered() {
    let ws = workspace();
    let d = ws.path();
    let out = text(&weir(
        d,
        &[
            "registry",
            REG[0],
            REG[1],
            "add",
            "--model",
            "chat",
            "--version",
            "latest",
            "--artifact",
            "model",
        ],
    ));
    assert!(out.contains("never \"latest\""), "{out}");
    add(d, "v1", &[]);
    let out = text(&weir(
        d,
        &[
            "registry",
            REG[0],
            REG[1],
            "add",
            "--model",
            "chat",
            "--version",
            "v1",
            "--artifact",
            "model",
        ],
    ));
    assert!(out.contains("already registered"), "{out}");
}

fn registry_with(d: &Path, stages: &[(&str, &str)]) {
    for (version, _) in stages {
        add(
            d,
            version,
            &["--provenance", "prov.json", "--sbom", "sbom.json"],
        );
    }
    // Approvals let any version walk the lifecycle to where the test wants it.
    for (version, target) in stages {
        for role in ["platform", "product", "security"] {
            approve(d, version, role, "30");
        }
        let path: &[&str] = match *target {
            "draft" => &[],
            "candidate" => &["candidate"],
            "approved" => &["candidate", "approved"],
            "production" => &["candidate", "approved", "production"],
            "deprecated" => &["candidate", "approved", "production", "deprecated"],
            "retired" => &["retired"],
            other => panic!("unknown stage {other}"),
        };
        for step in path {
            assert!(stage(d, version, step).status.success());
        }
    }
}

async fn serve_with(d: &Path, stable: &str, candidate: &str) -> Result<weir::Running, String> {
    let backend = Backend::named("x").await;
    let toml = format!(
        r#"
        [listener]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [state]
        dir = "{state}"
        [registry]
        file = "{registry}"
        [[versions]]
        model = "chat"
        version = "{stable}"
        backends = ["{url}"]
        [[versions]]
        model = "chat"
        version = "{candidate}"
        backends = ["{url}"]
        [[routes]]
        name = "chat"
        stable = "chat@{stable}"
        candidate = "chat@{candidate}"
        weight = "5%"
        "#,
        state = d.join(format!("state-{stable}-{candidate}")).display(),
        registry = d.join("registry.toml").display(),
        url = backend.url(),
    );
    let config = weir::Config::from_toml_str(&toml, "test.toml").unwrap();
    weir::Server::start(config).await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn serve_refuses_pins_that_break_a_rule_naming_the_version() {
    let ws = workspace();
    let d = ws.path();
    registry_with(
        d,
        &[
            ("prod", "production"),
            ("cand", "candidate"),
            ("draft", "draft"),
            ("gone", "retired"),
            ("old", "deprecated"),
        ],
    );

    let running = serve_with(d, "prod", "cand")
        .await
        .expect("production stable + candidate is allowed");
    running.shutdown();
    running.wait().await;

    for (stable, candidate, version, rule) in [
        ("prod", "draft", "chat@draft", "rule: draft"),
        ("prod", "gone", "chat@gone", "rule: retired"),
        ("prod", "unknown", "chat@unknown", "rule: unregistered"),
        ("cand", "prod", "chat@cand", "rule: stage"),
        ("old", "cand", "chat@old", "rule: deprecated"),
    ] {
        let err = serve_with(d, stable, candidate)
            .await
            .expect_err("a broken pin must refuse to start");
        assert!(
            err.contains(version) && err.contains(rule),
            "{stable}/{candidate}: {err}"
        );
    }
}

#[tokio::test]
async fn promotion_needs_the_production_rules_and_records_the_runtime_stage_not_the_file() {
    let ws = workspace();
    let d = ws.path();
    registry_with(d, &[("prod", "production")]);
    add(
        d,
        "next",
        &["--provenance", "prov.json", "--sbom", "sbom.json"],
    );
    assert!(stage(d, "next", "candidate").status.success());
    let running = serve_with(d, "prod", "next").await.expect("starts");
    let token = std::fs::read_to_string(d.join("state-prod-next/admin.token")).unwrap();
    let promote = || {
        request(
            http::Method::POST,
            &format!("http://{}/v1/routes/chat/promote", running.admin_addr()),
        )
        .header("authorization", format!("Bearer {}", token.trim()))
        .body(empty())
        .unwrap()
    };
    let reply = send(&http1(), promote()).await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(reply.text().contains("role security"), "{}", reply.text());
    assert_eq!(
        running.live().state.routes[0].stable,
        "chat@prod",
        "a refused promotion changes nothing"
    );

    for role in ["platform", "product", "security"] {
        approve(d, "next", role, "30");
    }
    let registry_before = std::fs::read(d.join("registry.toml")).unwrap();
    let reply = send(&http1(), promote()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(running.live().state.routes[0].stable, "chat@next");
    assert_eq!(
        running.live().state.routes[0].rollback_target.as_deref(),
        Some("chat@prod")
    );
    assert_eq!(
        std::fs::read(d.join("registry.toml")).unwrap(),
        registry_before,
        "promotion never writes the registry file (reviewed input, often mounted read-only)"
    );

    // The runtime stage is the state's: /v1/routes and `weir registry list --state-dir` say so.
    let routes = send(
        &http1(),
        request(
            http::Method::GET,
            &format!("http://{}/v1/routes", running.admin_addr()),
        )
        .body(empty())
        .unwrap(),
    )
    .await
    .json();
    let stable = &routes["routes"][0]["registry"]["stable"];
    assert_eq!(stable["version"], "chat@next", "{routes}");
    assert_eq!(stable["stage"], "production", "{routes}");
    assert_eq!(stable["file_stage"], "candidate", "{routes}");
    assert_eq!(stable["promoted"]["route"], "chat", "{routes}");
    assert_eq!(stable["promoted"]["from"], "candidate", "{routes}");
    assert_eq!(
        routes["production"]["chat@next"]["route"], "chat",
        "{routes}"
    );
    let file_only = ok(d, &["registry", REG[0], REG[1], "list"]);
    let line = file_only
        .lines()
        .find(|l| l.starts_with("chat@next"))
        .unwrap();
    assert!(line.contains("candidate"), "the file's own stage: {line}");
    let state_dir = d.join("state-prod-next");
    let state_dir = state_dir.to_str().unwrap();
    let listed = ok(
        d,
        &["registry", REG[0], REG[1], "--state-dir", state_dir, "list"],
    );
    let line = listed.lines().find(|l| l.starts_with("chat@next")).unwrap();
    assert!(line.contains("production*"), "the runtime stage: {line}");
    assert!(
        listed.contains("weir promoted it on route chat")
            && listed.contains("still says candidate"),
        "{listed}"
    );
    let shown = ok(
        d,
        &[
            "registry",
            REG[0],
            REG[1],
            "--state-dir",
            state_dir,
            "show",
            "--model",
            "chat",
            "--version",
            "next",
        ],
    );
    assert!(
        shown.contains("# runtime stage: chat@next is production"),
        "{shown}"
    );
    let audit = std::fs::read_to_string(d.join("state-prod-next/audit.jsonl")).unwrap();
    let promote = audit
        .lines()
        .find(|l| l.contains("\"action\":\"promote\""))
        .unwrap();
    assert!(
        promote.contains("runtime stage: chat@next candidate → production"),
        "{promote}"
    );

    // Undoing the promotion takes the runtime stage back.
    let rollback = request(
        http::Method::POST,
        &format!("http://{}/v1/routes/chat/rollback", running.admin_addr()),
    )
    .header("authorization", format!("Bearer {}", token.trim()))
    .body(empty())
    .unwrap();
    let reply = send(&http1(), rollback).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(running.live().state.routes[0].stable, "chat@prod");
    let listed = ok(
        d,
        &["registry", REG[0], REG[1], "--state-dir", state_dir, "list"],
    );
    let line = listed.lines().find(|l| l.starts_with("chat@next")).unwrap();
    assert!(
        !line.contains("production"),
        "the rollback undid it: {line}"
    );
    running.shutdown();
    running.wait().await;
}
