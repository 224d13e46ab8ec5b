//! What an operator is told when a change cannot be made: errors that fit the way weir runs
//! (quick mode has no config file to edit), and summaries that say everything the state holds.

mod common;

use common::*;
use http::Method;

/// Starts quick mode (`weir serve --stable ... --candidate ...`) in-process.
async fn quick(state: &std::path::Path, v1: &Backend, v2: &Backend) -> weir::Running {
    let config = weir::QuickMode {
        stable: format!("chat@v1={}", v1.url()),
        candidate: Some(format!("chat@v2={}", v2.url())),
        weight: Some("10%".into()),
        listen: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        state_dir: Some(state.to_path_buf()),
        ..Default::default()
    }
    .into_config()
    .expect("a valid quick-mode spec");
    weir::Server::start(config).await.expect("weir starts")
}

fn admin_call(running: &weir::Running, state: &std::path::Path, path: &str) -> http::Request<Body> {
    let token = std::fs::read_to_string(state.join("admin.token")).expect("the generated token");
    request(
        Method::POST,
        &format!("http://{}{path}", running.admin_addr()),
    )
    .header("authorization", format!("Bearer {}", token.trim()))
    .body(empty())
    .unwrap()
}

#[tokio::test]
async fn quick_mode_says_to_restart_with_a_candidate_not_to_edit_a_config_it_does_not_have() {
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let state = temp_dir("quick-no-candidate");
    let running = quick(state.path(), &v1, &v2).await;
    let promote = "/v1/routes/default/promote";
    let reply = send(&http1(), admin_call(&running, state.path(), promote)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let reply = send(&http1(), admin_call(&running, state.path(), promote)).await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    let error = reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        !error.contains("in the config and reload"),
        "quick mode has no config to edit: {error}"
    );
    for needed in [
        "route default has no candidate",
        "without a config file",
        "restart",
        "--candidate MODEL@VERSION=URL",
        "`weir admin rollback default` returns to chat@v1",
    ] {
        assert!(error.contains(needed), "{needed:?} missing from: {error}");
    }
    running.shutdown();
    running.wait().await;
}

#[tokio::test]
async fn a_config_file_route_without_a_candidate_says_to_set_one_and_reload() {
    let v1 = Backend::named("chat@v1").await;
    let weir = Weir::start(
        r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[routes]]
name = "chat"
stable = "chat@v1"
"#,
        &[("v1", &v1.url())],
    )
    .await;
    let reply = weir
        .admin(
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "5%"}"#),
        )
        .await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    let error = reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains(
            "route chat has no candidate: set `candidate` for it in the config and reload"
        ),
        "{error}"
    );
}

#[tokio::test]
async fn a_promotion_that_cannot_be_recorded_is_refused_with_a_5xx_naming_the_state_file() {
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let weir = Weir::start(
        r#"
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
weight = "100%"
"#,
        &[("v1", &v1.url()), ("v2", &v2.url())],
    )
    .await;
    // A directory where the state's temp file goes: no write succeeds, even for root.
    let blocker = weir.state_dir.path().join("routing-state.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let audit_before = weir.audit().len();

    let reply = weir
        .admin(Method::POST, "/v1/routes/chat/promote", None)
        .await;
    assert_eq!(reply.status, 500, "{}", reply.text());
    let error = reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("could not be made durable") && error.contains("routing-state.json"),
        "names the cause and the file: {error}"
    );
    let route = weir.route("chat").await;
    assert_eq!(route["stable"], "chat@v1", "nothing changed: {route}");
    assert_eq!(route["candidate"], "chat@v2", "{route}");
    assert_eq!(weir.audit().len(), audit_before, "nothing was recorded");

    std::fs::remove_dir(&blocker).unwrap();
    let reply = weir
        .admin(Method::POST, "/v1/routes/chat/promote", None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(weir.route("chat").await["stable"], "chat@v2");
}
