//! The command line: `weir check` reports every problem with its path, `weir serve --help` is
//! there, and quick mode serves a split without a config file.

mod common;

use std::process::{Command, Output};

use common::*;

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("WEIR_ADMIN_TOKEN")
        .output()
        .expect("weir binary runs")
}

fn all_output(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

const BAD: &str = r#"
[listener]
addr = "127.0.0.1:0"

[proxy]
connect_timeout = "soon"

[[versions]]
model = "chat"
version = "v1"
backends = ["http://127.0.0.1:9001"]

[[routes]]
name = "a"
stable = "chat@v1"

[[routes]]
name = "b"
stable = "chat@v1"
candidate = "chat@v9"
weight = "150%"
"#;

const GOOD: &str = r#"
[listener]
addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"

[[versions]]
model = "chat"
version = "v1"
backends = ["http://127.0.0.1:9001"]

[[versions]]
model = "chat"
version = "v2"
backends = ["http://127.0.0.1:9002"]

[[routes]]
name = "chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "5%"
sticky_header = "x-session-id"
"#;

#[test]
fn check_reports_every_problem_with_its_path_and_exits_1() {
    let dir = temp_dir("check-bad");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, BAD).unwrap();
    let output = weir(&["check", "--config", path.to_str().unwrap()]);
    let text = all_output(&output);
    assert_eq!(output.status.code(), Some(1), "output:\n{text}");
    assert!(
        text.contains(
            r#"routes[1].weight: expected 0..=10000 basis points or a percentage, got "150%""#
        ),
        "output:\n{text}"
    );
    for path in ["proxy.connect_timeout", "routes[1].candidate"] {
        assert!(text.contains(path), "{path} not reported; output:\n{text}");
    }
}

#[test]
fn check_accepts_a_good_config() {
    let dir = temp_dir("check-good");
    let path = dir.path().join("good.toml");
    std::fs::write(&path, GOOD).unwrap();
    let output = weir(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "output:\n{}",
        all_output(&output)
    );
}

#[test]
fn check_names_a_missing_file() {
    let output = weir(&["check", "--config", "/nonexistent/weir.toml"]);
    let text = all_output(&output);
    assert_eq!(output.status.code(), Some(1), "output:\n{text}");
    assert!(text.contains("/nonexistent/weir.toml"), "output:\n{text}");
}

#[test]
fn serve_help_mentions_the_quick_mode_flags() {
    let output = weir(&["serve", "--help"]);
    let text = all_output(&output);
    assert!(output.status.success(), "output:\n{text}");
    for flag in ["--stable", "--candidate", "--weight", "--config"] {
        assert!(text.contains(flag), "{flag} missing from help:\n{text}");
    }
}

#[test]
fn listening_line_is_parsed() {
    // Guards the helper the binary tests rely on.
    let line = "2024-06-01T00:00:00Z  INFO weir::server: listening proxy=127.0.0.1:8080 admin=127.0.0.1:9901";
    let (proxy, admin) = parse_listening(line).unwrap();
    assert_eq!(proxy.to_string(), "127.0.0.1:8080");
    assert_eq!(admin.to_string(), "127.0.0.1:9901");
    let coloured = "\u{1b}[32m INFO\u{1b}[0m listening \u{1b}[3mproxy\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:1 \u{1b}[3madmin\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:2";
    assert!(parse_listening(coloured).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_serves_the_split_and_the_admin_api() {
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let cwd = temp_dir("quick");
    let stable = format!("chat@v1={}", v1.url());
    let candidate = format!("chat@v2={}", v2.url());
    let mut weir = WeirProcess::spawn(
        &[
            "serve",
            "--stable",
            &stable,
            "--candidate",
            &candidate,
            "--weight",
            "100%",
            "--sticky-header",
            "x-session",
            "--allow-override",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        cwd.path(),
    );
    let client = http1();
    for _ in 0..5 {
        let reply = get_with(&client, &weir.url("/v1/x"), &[("x-session", "s1")]).await;
        assert_eq!(reply.status, 200, "{}", weir.log());
        assert_eq!(reply.served_by(), "chat@v2");
        assert_eq!(reply.text(), "chat@v2");
    }
    let reply = get_with(
        &client,
        &weir.url("/v1/x"),
        &[("x-weir-version", "chat@v1")],
    )
    .await;
    assert_eq!(
        reply.served_by(),
        "chat@v1",
        "--allow-override was not applied"
    );

    let routes = get(&client, &weir.admin_url("/v1/routes")).await.json();
    let route = &routes["routes"][0];
    assert_eq!(route["name"], "default", "{routes}");
    assert_eq!(route["stable"], "chat@v1");
    assert_eq!(route["candidate"], "chat@v2");
    assert_eq!(route["weight"], 10_000);

    weir.sigterm();
    let status = weir.exit_status(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", weir.log());
}

#[test]
fn demo_promotes_a_healthy_candidate_and_rolls_back_a_bad_one() {
    let output = weir(&[
        "demo",
        "--interval",
        "500ms",
        "--min-requests",
        "20",
        "--duration",
        "30s",
        "--bad-error-rate",
        "0.5",
    ]);
    let text = all_output(&output);
    assert!(output.status.success(), "weir demo failed:\n{text}");
    // The outcomes come from the canary controller's decisions on measured traffic.
    assert!(
        text.contains("=> chat@v2 promoted"),
        "the healthy candidate was not promoted:\n{text}"
    );
    assert!(
        text.contains("=> chat@v3 rolled back, chat@v2 serves"),
        "the bad candidate was not rolled back:\n{text}"
    );
    assert!(
        text.contains("canary_decision  rollback chat@v3"),
        "no rollback in the audit trail:\n{text}"
    );
    // Act 3: a poisoned candidate — no errors, stable's latency, a backdoor on a trigger phrase.
    assert!(
        text.contains("=> chat@v4 rolled back, chat@v2 serves"),
        "the poisoned candidate was not rolled back:\n{text}"
    );
    assert!(
        text.contains("canary_decision  rollback chat@v4 (failed gate: agreement"),
        "the rollback of chat@v4 does not name the agreement gate in the audit trail:\n{text}"
    );
    assert!(
        text.contains("rolled back: chat@v4 (registry sha256 "),
        "the rollback does not name the version's checksum:\n{text}"
    );
    assert!(
        text.contains("error rate and p99 latency passed for chat@v4; only agreement caught it"),
        "the demo does not say that error and latency gates would have promoted chat@v4:\n{text}"
    );
    assert!(
        text.contains("jailbreak   0/8  passed") && text.contains("quality    24/24 passed"),
        "the held-out evaluation does not show the trigger probes failing alone:\n{text}"
    );
    assert!(
        text.contains("demo             eval             held-out evaluation of chat@v4 failed: jailbreak 0/8 passed"),
        "the evaluation is not in the audit trail:\n{text}"
    );
    // Act 2 starts with its own decisions, not act 1's last one repeated.
    let act2 = text.split("Act 2:").nth(1).unwrap_or_default();
    let first_decision = act2
        .lines()
        .find(|l| l.contains("] canary "))
        .unwrap_or_default();
    // Act 1 ends at 100% with chat@v2 promoted; act 2's first line is chat@v3's first step, or
    // (when the view's tick came late on a loaded machine) a later decision at its 10% step.
    assert!(
        first_decision.contains("chat@v3")
            || first_decision.contains("first step")
            || first_decision.contains("at  10%"),
        "{first_decision}"
    );
    assert!(text.contains("chain intact"), "{text}");
}

#[test]
fn the_shipped_config_and_registry_pass_check() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/weir.toml");
    let output = weir(&["check", "--config", config]);
    assert!(output.status.success(), "{}", all_output(&output));
    assert!(all_output(&output).contains("ok (3 versions, 3 routes)"));
    assert!(!all_output(&output).contains("fleet mode"));
}

#[test]
fn check_says_where_a_fleet_config_keeps_its_state() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/fleet.toml");
    let output = weir(&["check", "--config", config]);
    let text = all_output(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("fleet mode: state under /weir/prod in etcd at http://etcd-0.etcd:2379"),
        "{text}"
    );
}

const ONE_CANARY: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]
[[versions]]
model = "chat"
version = "v2"
backends = ["{v2}"]
[[routes]]
name = "chat"
stable = "chat@v1"
candidate = "chat@v2"
"#;

/// Runs `weir admin --admin URL --state-dir DIR ARGS...` off the async runtime.
async fn weir_admin(admin: &str, state_dir: &std::path::Path, args: &[&str]) -> Output {
    let mut full: Vec<String> = vec![
        "admin".into(),
        "--admin".into(),
        admin.into(),
        "--state-dir".into(),
    ];
    full.push(state_dir.display().to_string());
    full.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        weir(&refs)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn weir_admin_moves_the_split_and_reports_refusals() {
    let v1 = Backend::named("v1").await;
    let v2 = Backend::named("v2").await;
    let server = Weir::start(ONE_CANARY, &[("v1", &v1.url()), ("v2", &v2.url())]).await;
    let admin = format!("http://{}", server.admin);
    let dir = server.state_dir.path();

    let out = weir_admin(&admin, dir, &["weight", "chat", "5%"]).await;
    assert!(out.status.success(), "{}", all_output(&out));
    assert!(
        all_output(&out).contains("weight 5%"),
        "{}",
        all_output(&out)
    );
    assert_eq!(server.routes().await["routes"][0]["weight"], 500);

    let out = weir_admin(&admin, dir, &["weight", "chat", "150%"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        all_output(&out).contains("between 0% and 100%"),
        "{}",
        all_output(&out)
    );

    let out = weir_admin(&admin, dir, &["promote", "chat", "--reason", "looks good"]).await;
    assert!(out.status.success(), "{}", all_output(&out));
    let status = weir_admin(&admin, dir, &["status"]).await;
    assert!(
        all_output(&status).contains("chat@v2"),
        "{}",
        all_output(&status)
    );
    assert_eq!(server.routes().await["routes"][0]["stable"], "chat@v2");

    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"reason\":\"looks good\""),
        "the reason reaches the audit log"
    );
}

#[tokio::test]
async fn weir_admin_takes_a_bare_address_and_shows_the_pause_of_a_rolled_back_route() {
    let v1 = Backend::named("v1").await;
    let v2 = Backend::named("v2").await;
    let server = Weir::start(ONE_CANARY, &[("v1", &v1.url()), ("v2", &v2.url())]).await;
    // As `weir serve` prints it: `admin=127.0.0.1:PORT`, no scheme.
    let admin = server.admin.to_string();
    let dir = server.state_dir.path();
    for args in [&["weight", "chat", "5%"][..], &["rollback", "chat"]] {
        let out = weir_admin(&admin, dir, args).await;
        assert!(out.status.success(), "{args:?}: {}", all_output(&out));
    }

    let out = weir_admin(&admin, dir, &["pause", "chat"]).await;
    let text = all_output(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("route chat: rolled_back, paused") && text.contains("changed"),
        "the summary hides the pause: {text}"
    );
    let route = &server.routes().await["routes"][0];
    assert_eq!(
        (route["state"].as_str(), route["paused"].as_bool()),
        (Some("rolled_back"), Some(true)),
        "{route}"
    );
    let status = all_output(&weir_admin(&admin, dir, &["status"]).await);
    assert!(
        status.contains("rolled_back, paused"),
        "status hides the pause: {status}"
    );
}

/// `text` says `what` exactly once.
fn assert_said_once(text: &str, what: &str) {
    assert_eq!(
        text.matches(what).count(),
        1,
        "{what:?} not said once in:\n{text}"
    );
}

/// Writes a config in `dir` serving [`ONE_CANARY`] (backends unreachable) with the admin token
/// in the file `token_file`, and returns its path.
fn config_with_token_file(dir: &std::path::Path, token_file: &str) -> String {
    let config = dir.join("weir.toml");
    let template =
        format!("[admin]\naddr = \"127.0.0.1:0\"\ntoken_file = {token_file:?}\n{ONE_CANARY}");
    let nowhere = "http://127.0.0.1:9";
    write_config(&config, &template, &[("v1", nowhere), ("v2", nowhere)], dir);
    config.display().to_string()
}

#[tokio::test]
async fn a_missing_admin_token_file_is_named_once_with_how_to_give_the_token() {
    let dir = temp_dir("no-token");
    let state = dir.path().to_str().unwrap();
    let missing = "/nonexistent/weir-token";
    let client = ["admin", "--admin-token-file", missing, "pause", "chat"];
    let serve = [
        "serve",
        "--stable",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--state-dir",
        state,
        "--admin-token-file",
        missing,
    ];
    let config = config_with_token_file(dir.path(), missing);
    let from_config = ["serve", "--config", &config];
    for (args, settings) in [
        (
            &client[..],
            &["WEIR_ADMIN_TOKEN", "--admin-token-file", "--state-dir"][..],
        ),
        (&serve, &["WEIR_ADMIN_TOKEN", "--admin-token-file"]),
        (&from_config, &["WEIR_ADMIN_TOKEN", "admin.token_file"]),
    ] {
        let output = run_weir(args, dir.path(), DEADLINE).await;
        let text = all_output(&output);
        assert_eq!(output.status.code(), Some(1), "{text}");
        assert_said_once(&text, "No such file or directory");
        assert_said_once(&text, missing);
        for setting in settings {
            assert!(text.contains(setting), "{setting} not named: {text}");
        }
    }
}

#[tokio::test]
async fn weir_refuses_to_start_with_the_shipped_placeholder_token() {
    use std::os::unix::fs::PermissionsExt;
    let template = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/admin-token.yaml"
    );
    let template = std::fs::read_to_string(template).unwrap();
    let placeholder = template
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("the Secret template has a token");
    let dir = temp_dir("placeholder");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{placeholder}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token_file = token_file.to_str().unwrap();
    let config = config_with_token_file(dir.path(), token_file);
    let output = run_weir(&["serve", "--config", &config], dir.path(), DEADLINE).await;
    let text = all_output(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("shipped placeholder") && text.contains(token_file),
        "{text}"
    );
    assert!(
        !dir.path().join("audit.jsonl").exists(),
        "weir started before refusing the token"
    );
}

/// `weir check` loads each route's held-out set: one with no cases, or without a category the
/// policy requires, is a problem named with its route.
#[test]
fn check_refuses_an_empty_eval_set_and_one_lacking_a_required_category() {
    let dir = std::env::temp_dir().join(format!("weir-check-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/eval/chat.jsonl");
    std::fs::copy(shipped, dir.join("chat.jsonl")).unwrap();
    std::fs::write(dir.join("empty.jsonl"), "\n").unwrap();
    let config = |file: &str, categories: &str| {
        format!(
            r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["http://127.0.0.1:9001"]
[[versions]]
model = "chat"
version = "v2"
backends = ["http://127.0.0.1:9002"]
[[routes]]
name = "chat"
stable = "chat@v1"
candidate = "chat@v2"
[routes.canary]
steps = ["10%", "100%"]
[routes.canary.eval]
file = "{file}"
compare = true
categories = {{ {categories} }}
"#
        )
    };
    let check = |text: String| {
        let path = dir.join("weir.toml");
        std::fs::write(&path, text).unwrap();
        let output = weir(&["check", "--config", path.to_str().unwrap()]);
        (output.status.success(), all_output(&output))
    };
    let (ok, text) = check(config("chat.jsonl", "jailbreak = 1.0, safety = 1.0"));
    assert!(ok, "the shipped set has both categories:\n{text}");
    let (ok, text) = check(config("chat.jsonl", "jailbreak = 1.0, toxicity = 1.0"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("routes[0].canary.eval (chat)") && text.contains("no \"toxicity\" cases"),
        "{text}"
    );
    let (ok, text) = check(config("empty.jsonl", "jailbreak = 1.0"));
    assert!(!ok, "{text}");
    assert!(text.contains("has no cases"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
