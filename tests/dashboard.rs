//! The live dashboard on the admin listener (issue 23): its files and their headers, what it
//! reads (`/v1/history`, `/v1/audit`, `/v1/auth`), and — in a real headless chromium — that it
//! shows a running weir, follows it live, keeps its controls hidden until the admin token is
//! given, and that a rollback from the page goes through the admin API and its audit log.
//!
//! The browser tests need chromium (`WEIR_CHROMIUM`, else `chromium`); see
//! `common/browser.rs` for when they skip. `cargo test --test dashboard -- --ignored screenshot`
//! writes `docs/dashboard.png` from a running `weir demo`.

mod common;

use std::time::Duration;

use common::browser::{chromium, dump_dom, screenshot, Browser};
use common::*;
use http::{Method, StatusCode};
use serde_json::Value;

/// The policy the brief and the docs name, exactly.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the page's script sends with every change (`send` in assets/dashboard/app.js).
const PAGE_BODY: &str = r#"{"reason":"from the weir dashboard"}"#;

/// `chat@v1` on `{v1}` and `chat@v2` on `{v2}`, followed by `routes`.
macro_rules! two_versions {
    ($routes:literal) => {
        concat!(
            r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{v2}"]
"#,
            $routes
        )
    };
}

/// chat@v1 stable, chat@v2 a candidate at 5% and shadowed on every stable request, and no canary
/// policy.
const SPLIT: &str = two_versions!(
    r#"
[[routes]]
name = "chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "5%"
mirror = "100%"
"#
);

/// The same, under a canary that runs the held-out set `{eval}` against the candidate, takes its
/// first step at once and then waits for far more traffic than the test sends (so it advances
/// once, with its reason and evidence, and then holds).
const CANARY: &str = two_versions!(
    r#"
[[routes]]
name = "chat"
stable = "chat@v1"
candidate = "chat@v2"

[routes.canary]
steps = ["10%", "50%", "100%"]
interval = "1s"
min_requests = 1000000
progress_deadline = "10m"

[routes.canary.eval]
file = "{eval}"
threshold = 1.0
"#
);

async fn start(template: &str) -> (Weir, [Backend; 2]) {
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let weir = Weir::start(template, &[("v1", &v1.url()), ("v2", &v2.url())]).await;
    (weir, [v1, v2])
}

/// [`CANARY`] with a held-out set of three cases the candidate (which answers with its name)
/// passes.
async fn start_canary() -> (Weir, [Backend; 2], TempDir) {
    let dir = temp_dir("dashboard-eval");
    let file = dir.path().join("cases.jsonl");
    let case = |i: usize| {
        serde_json::json!({
            "name": format!("names itself {i}"),
            "request": {"path": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "who are you?"}]}},
            "expect": {"status": 200, "contains": "chat@v2"},
        })
        .to_string()
    };
    std::fs::write(&file, (0..3).map(case).collect::<Vec<_>>().join("\n")).unwrap();
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let eval = file.display().to_string();
    let backends = [("v1", v1.url()), ("v2", v2.url()), ("eval", eval)];
    let pairs: Vec<(&str, &str)> = backends.iter().map(|(n, u)| (*n, u.as_str())).collect();
    let weir = Weir::start(CANARY, &pairs).await;
    (weir, [v1, v2], dir)
}

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply
        .header(name)
        .unwrap_or_else(|| panic!("no {name} header"))
}

// === without a browser ===

#[tokio::test]
async fn the_page_and_its_files_carry_a_strict_csp_and_answer_only_get_and_head() {
    let (weir, _backends) = start(SPLIT).await;
    let client = http1();
    for (path, content_type) in [
        ("/", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let reply = get(&client, &weir.admin_url(path)).await;
        assert_eq!(reply.status, StatusCode::OK, "GET {path}");
        assert!(
            header(&reply, "content-type").starts_with(content_type),
            "GET {path}"
        );
        assert_eq!(header(&reply, "content-security-policy"), CSP, "GET {path}");
        assert_eq!(header(&reply, "x-content-type-options"), "nosniff");
        assert_eq!(header(&reply, "referrer-policy"), "no-referrer");
        assert!(!reply.body.is_empty(), "GET {path} has a body");
        // Nothing from elsewhere: no absolute URL but the SVG namespace, no inline code.
        let text = reply.text().replace("http://www.w3.org/2000/svg", "");
        for external in ["http://", "https://", "//fonts", "@import", "url("] {
            assert!(!text.contains(external), "{path} names {external:?}");
        }
        if content_type == "text/html" {
            assert!(!text.contains("style="), "{path}: an inline style");
            assert!(!text.contains("<style"), "{path}: an inline style sheet");
            assert_eq!(
                text.matches("<script").count(),
                text.matches("<script src=\"/ui/app.js\"").count(),
                "{path}: a script that is not /ui/app.js"
            );
        }
    }

    let head = send(
        &client,
        request(Method::HEAD, &weir.admin_url("/"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty(), "HEAD answers without a body");
    assert_eq!(header(&head, "content-security-policy"), CSP);

    for (method, path) in [
        (Method::POST, "/"),
        (Method::PUT, "/ui/app.js"),
        (Method::DELETE, "/ui/style.css"),
        (Method::POST, "/ui/"),
    ] {
        let reply = send(
            &client,
            request(method.clone(), &weir.admin_url(path))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(header(&reply, "allow"), "GET, HEAD", "{method} {path}");
        assert!(reply.json()["error"].as_str().is_some(), "{method} {path}");
    }
}

#[tokio::test]
async fn a_change_sent_the_way_the_page_sends_it_without_the_token_gets_the_apis_401() {
    let (weir, _backends) = start(SPLIT).await;
    let generation = weir.generation().await;
    let records = weir.audit().len();
    let weight_body = r#"{"reason":"from the weir dashboard","weight":"50%"}"#;
    for (method, path, body) in [
        (Method::POST, "/v1/routes/chat/rollback", PAGE_BODY),
        (Method::POST, "/v1/routes/chat/promote", PAGE_BODY),
        (Method::POST, "/v1/routes/chat/pause", PAGE_BODY),
        (Method::POST, "/v1/routes/chat/resume", PAGE_BODY),
        (Method::PUT, "/v1/routes/chat/weight", weight_body),
    ] {
        let url = weir.admin_url(path);
        let page = admin_call(&url, method.clone(), None, Some(body), &[]).await;
        let api = admin_call(&url, method.clone(), None, None, &[]).await;
        assert_eq!(
            page.status,
            StatusCode::UNAUTHORIZED,
            "{method} {path}: {}",
            page.text()
        );
        assert_eq!(header(&page, "www-authenticate"), "Bearer");
        assert_eq!(
            page.json(),
            api.json(),
            "{method} {path}: the page gets the API's answer"
        );
    }
    let auth = weir.admin_url("/v1/auth");
    let anonymous = admin_call(&auth, Method::GET, None, None, &[]).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let wrong = admin_call(&auth, Method::GET, Some("not-the-token"), None, &[]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.json(), anonymous.json());
    let right = admin_call(&auth, Method::GET, Some(&weir.token()), None, &[]).await;
    assert_eq!(right.status, StatusCode::OK, "{}", right.text());
    assert!(right.json()["actor"]
        .as_str()
        .is_some_and(|a| a.starts_with("admin:")));

    assert_eq!(
        weir.generation().await,
        generation,
        "a refused change changed the table"
    );
    assert_eq!(
        weir.audit().len(),
        records,
        "a refused change was audited as a change"
    );
    assert_eq!(weir.route("chat").await["weight"], 500);
}

#[tokio::test]
async fn the_history_counts_each_versions_traffic_and_the_audit_view_verifies_the_chain() {
    let (weir, _backends) = start(SPLIT).await;
    let client = http1();
    // The sampler takes its baseline at start (both series listed, no samples yet); traffic
    // after it shows in the next sample.
    assert_eventually!(
        get(&client, &weir.admin_url("/v1/history")).await.json()["routes"][0]["versions"]
            .as_array()
            .is_some_and(|v| v.len() == 2),
        "the sampler never took its baseline"
    );
    for _ in 0..40 {
        let reply = get(&client, &weir.url("/v1/chat")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let mut counted: u64;
    assert_eventually!(
        within Duration::from_secs(15),
        {
            let history = get(&client, &weir.admin_url("/v1/history")).await.json();
            counted = history["routes"][0]["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|v| v["samples"].as_array().cloned().unwrap_or_default())
                .map(|s| s["requests"].as_u64().unwrap_or(0))
                .sum::<u64>();
            counted == 40
        },
        "/v1/history never counted the 40 requests (counted {counted})"
    );
    let history = get(&client, &weir.admin_url("/v1/history")).await.json();
    assert_eq!(history["every_seconds"], 5);
    assert_eq!(history["kept"], 180);
    let versions = history["routes"][0]["versions"].as_array().unwrap();
    let labels: Vec<&str> = versions
        .iter()
        .filter_map(|v| v["version"].as_str())
        .collect();
    assert_eq!(labels, ["chat@v1", "chat@v2"]);
    let busy = versions
        .iter()
        .flat_map(|v| v["samples"].as_array().unwrap())
        .find(|s| s["requests"].as_u64() > Some(0))
        .unwrap();
    assert!(busy["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{busy}");
    assert!(busy["seconds"].as_f64().is_some_and(|s| s > 0.0), "{busy}");
    let agreement = history["routes"][0]["agreement"].as_array().unwrap();
    assert!(
        agreement.iter().any(|a| a["compared"].as_u64() > Some(0)),
        "the mirrored route's agreement is not sampled: {agreement:?}"
    );

    weir.admin(
        Method::PUT,
        "/v1/routes/chat/weight",
        Some(r#"{"weight": "20%"}"#),
    )
    .await;
    let audit = get(&client, &weir.admin_url("/v1/audit?limit=2"))
        .await
        .json();
    assert_eq!(audit["intact"], true, "{audit}");
    assert_eq!(audit["head_checked"], true, "{audit}");
    assert_eq!(audit["records"], weir.audit().len() as u64);
    let recent = audit["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 2);
    assert_eq!(recent[1]["action"], "set_weight");
    assert_eq!(recent[1], *weir.audit().last().unwrap());
    let bad = get(&client, &weir.admin_url("/v1/audit?limit=lots")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let alone = get(&client, &weir.admin_url("/v1/fleet")).await;
    assert_eq!(
        alone.json(),
        serde_json::json!({"fleet": null}),
        "outside fleet mode"
    );

    let missing = get(&client, &weir.admin_url("/v1/nothing")).await.json();
    let endpoints: Vec<&str> = missing["detail"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for listed in [
        "GET /",
        "GET /v1/fleet",
        "GET /v1/history",
        "GET /v1/audit",
        "GET /v1/auth",
    ] {
        assert!(
            endpoints.contains(&listed),
            "the 404 does not list {listed}"
        );
    }
}

// === in a browser ===

/// `.controls` boxes and whether any is shown, as the page has them now.
const CONTROLS_SHOWN: &str =
    "[...document.querySelectorAll('.controls')].filter((c) => !c.hidden && c.offsetParent !== null).length";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_running_weir_read_only_and_a_reload_shows_a_new_weight() {
    let Some(bin) = chromium() else { return };
    let (weir, _backends) = start(SPLIT).await;
    let url = weir.admin_url("/");
    let dom = dump_dom(&bin, &url, Duration::from_secs(3)).await;
    assert!(dom.contains(r#"id="route-chat""#), "no route card:\n{dom}");
    for shown in [
        "Route chat",
        "chat@v1",
        "chat@v2",
        ">5%<",
        "generation 1",
        "No canary policy",
        "Shadow: mirroring 100%",
    ] {
        assert!(
            dom.contains(shown),
            "the page does not show {shown:?}:\n{dom}"
        );
    }
    assert!(
        dom.contains(r#"<div class="controls" hidden="">"#),
        "the controls are not hidden without a token:\n{dom}"
    );
    assert!(!dom.contains(r#"<div class="controls">"#));

    weir.admin(
        Method::PUT,
        "/v1/routes/chat/weight",
        Some(r#"{"weight": "0.5%"}"#),
    )
    .await;
    let dom = dump_dom(&bin, &url, Duration::from_secs(3)).await;
    assert!(
        dom.contains(">0.5%<"),
        "the new weight is not shown:\n{dom}"
    );
    assert!(dom.contains("generation 2"), "{dom}");
    assert!(
        dom.contains("set_weight"),
        "the audit record is not listed:\n{dom}"
    );
}

/// [`SPLIT`] as replica `replica` of a fleet in `etcd`, with its own state directory.
async fn start_replica(etcd: &str, replica: &str) -> (Weir, [Backend; 2], TempDir) {
    let dir = temp_dir("dashboard-fleet");
    let config = format!(
        "[state]\ndir = {:?}\nbackend = \"etcd\"\netcd = [{etcd:?}]\nprefix = \"/weir-dashboard\"\nreplica = {replica:?}\nlease_ttl = \"2s\"\n{SPLIT}",
        dir.path().display().to_string(),
    );
    let (weir, backends) = start(&config).await;
    (weir, backends, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_fleet_mode_the_page_shows_every_live_replica_its_health_and_who_leads() {
    let Some(bin) = chromium() else { return };
    let etcd = common::etcd::Etcd::start().await;
    let (a, _a_backends, _a_dir) = start_replica(&etcd.url(), "replica-a").await;
    assert_eventually!(
        a.routes().await["fleet"]["leader"] == true,
        "the first replica never led: {}",
        a.routes().await["fleet"]
    );
    let (b, _b_backends, _b_dir) = start_replica(&etcd.url(), "replica-b").await;
    let client = http1();
    assert_eventually!(
        get(&client, &b.admin_url("/v1/fleet")).await.json()["fleet"]["replicas"]
            .as_array()
            .is_some_and(|r| r.len() == 2),
        "replica-b never saw both replicas: {}",
        get(&client, &b.admin_url("/v1/fleet")).await.text()
    );
    let view = get(&client, &b.admin_url("/v1/fleet")).await.json();
    assert_eq!(view["fleet"]["leader"], "replica-a", "{view}");

    // replica-b's page: both replicas, who leads, their health, and whose view it is.
    let dom = dump_dom(&bin, &b.admin_url("/"), Duration::from_secs(4)).await;
    let fleet = dom
        .split(r#"<section id="fleet""#)
        .nth(1)
        .and_then(|s| s.split("</section>").next())
        .unwrap_or_else(|| panic!("no fleet section:\n{dom}"));
    assert!(
        !fleet.starts_with(" aria-labelledby=\"fleet-title\" hidden"),
        "the fleet section is hidden:\n{fleet}"
    );
    let row = |replica: &str| {
        fleet
            .split(&format!(r#"<tr data-replica="{replica}">"#))
            .nth(1)
            .and_then(|s| s.split("</tr>").next())
            .unwrap_or_else(|| panic!("no row for {replica}:\n{fleet}"))
            .to_string()
    };
    let (row_a, row_b) = (row("replica-a"), row("replica-b"));
    assert!(
        row_a.contains(">leader<") && row_a.contains(">current<"),
        "{row_a}"
    );
    assert!(
        row_b.contains(">follower<") && row_b.contains("(this one)"),
        "{row_b}"
    );
    for shown in [
        "This replica, <code>replica-b</code>",
        ">etcd connected<",
        "/weir-dashboard",
        "this replica's own",
    ] {
        assert!(
            fleet.contains(shown),
            "the fleet section does not show {shown:?}:\n{fleet}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_the_canary_live_and_a_rollback_from_it_is_applied_and_audited() {
    let Some(bin) = chromium() else { return };
    let (weir, _backends, _eval_dir) = start_canary().await;
    let origin = weir.admin_url("");
    let mut page = Browser::launch(&bin).await;
    page.goto(&weir.admin_url("/")).await;
    page.wait_for(
        "document.querySelector('#route-chat')",
        "the route card appears",
    )
    .await;

    // The canary's first decision, with its reason and the weight it moved to.
    let decision = page
        .wait_for(
            "[...document.querySelectorAll('#route-chat .decision')].map((d) => d.textContent) \
             .find((d) => d.includes('advance'))",
            "the canary's first decision is shown",
        )
        .await;
    let decision = decision.as_str().unwrap().to_string();
    assert!(decision.contains("chat@v2 at 0%"), "{decision}");
    assert!(
        decision.contains("first step: step to 10%"),
        "the reason is not shown: {decision}"
    );
    page.wait_for(
        "document.querySelector('#route-chat .weight').textContent === '10%'",
        "the first step's weight is shown",
    )
    .await;
    assert!(
        decision.contains("eval"),
        "the eval gate is not shown: {decision}"
    );
    let eval = page
        .wait_for(
            "document.querySelector('#route-chat .eval') && document.querySelector('#route-chat .eval').textContent",
            "the last held-out evaluation is shown",
        )
        .await;
    let eval = eval.as_str().unwrap();
    assert!(eval.contains("Last held-out evaluation passed"), "{eval}");
    assert!(
        eval.contains("chat@v2: 3 of 3 cases passed (100%, 100% needed)"),
        "{eval}"
    );
    let plan = page
        .eval("document.querySelector('#route-chat .plan').textContent")
        .await;
    let plan = plan.as_str().unwrap();
    assert!(plan.contains("step 1 of 3"), "{plan}");
    assert!(
        plan.contains("1. 10% (now)") && plan.contains("3. 100%"),
        "{plan}"
    );
    // Numbers are written for people.
    let formatted = page
        .eval(
            "(({percent, basisPoints, millis, rate}) => [percent(0.005), basisPoints(50), millis(12.3), \
             millis(0.4), millis(1530), rate(3240)])(window.weirDashboard.format)",
        )
        .await;
    assert_eq!(
        formatted,
        serde_json::json!(["0.5%", "0.5%", "12 ms", "400 µs", "1.5 s", "3.2k req/s"])
    );
    assert_eq!(
        page.eval(CONTROLS_SHOWN).await,
        0,
        "controls shown without a token"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('button[data-action]').length")
            .await
            .as_u64(),
        Some(4),
        "promote, roll back, pause and set weight are in the page (hidden)"
    );

    // An admin elsewhere moves the weight: the open page follows without a reload.
    weir.admin(Method::POST, "/v1/routes/chat/pause", None)
        .await;
    weir.admin(
        Method::PUT,
        "/v1/routes/chat/weight",
        Some(r#"{"weight": "20%"}"#),
    )
    .await;
    page.wait_for(
        "document.querySelector('#route-chat .weight').textContent === '20%' \
         && document.querySelector('#route-chat h2').textContent.includes('paused')",
        "the page shows the new weight and the pause",
    )
    .await;
    assert_eq!(
        page.errors(),
        Vec::<String>::new(),
        "console errors while loading and updating"
    );

    // Without a token the page's own code path gets the API's 401, and nothing changes.
    let refused = page
        .eval("window.weirDashboard.send('chat', 'rollback')")
        .await;
    let api = admin_call(
        &weir.admin_url("/v1/routes/chat/rollback"),
        Method::POST,
        None,
        None,
        &[],
    )
    .await;
    assert_eq!(refused["status"], 401, "{refused}");
    assert_eq!(
        refused["body"],
        api.json(),
        "the page gets the API's own 401"
    );
    assert_eq!(weir.route("chat").await["weight"], 2000);

    // A wrong token unlocks nothing; the right one shows the controls.
    page.eval("document.querySelector('#token').value = 'wrong'; document.querySelector('#token-unlock').click()")
        .await;
    page.wait_for(
        "document.querySelector('#notice').textContent.includes('refused')",
        "the wrong token is refused",
    )
    .await;
    assert_eq!(page.eval(CONTROLS_SHOWN).await, 0);
    let token = weir.token();
    page.eval(&format!(
        "document.querySelector('#token').value = {}; document.querySelector('#token-unlock').click()",
        serde_json::to_string(&token).unwrap()
    ))
    .await;
    page.wait_for(CONTROLS_SHOWN, "the controls appear with the token")
        .await;
    assert_eq!(
        page.eval("document.querySelector('#token').value").await,
        "",
        "the token stays in the field"
    );

    // Roll back from the page, by keyboard: the confirmation names the route and both versions.
    page.eval(
        "document.querySelector('button[data-route=\"chat\"][data-action=\"rollback\"]').focus()",
    )
    .await;
    page.press_enter().await;
    let confirmation = page
        .wait_for(
            "document.querySelector('#confirm').open && document.querySelector('#confirm').textContent",
            "the confirmation opens",
        )
        .await;
    let confirmation = confirmation.as_str().unwrap();
    for named in ["chat", "chat@v1", "chat@v2", "goes to 0%"] {
        assert!(
            confirmation.contains(named),
            "the confirmation does not name {named}: {confirmation}"
        );
    }
    assert_eq!(
        weir.route("chat").await["weight"],
        2000,
        "nothing happens before confirming"
    );
    assert_eq!(
        page.eval("document.activeElement.id").await,
        "confirm-no",
        "Cancel has the focus"
    );
    page.eval("document.querySelector('#confirm-yes').focus()")
        .await;
    page.press_enter().await;
    assert_eventually!(
        weir.route("chat").await["state"] == "rolled_back",
        "the rollback from the page was not applied: {}",
        weir.route("chat").await
    );
    assert_eq!(weir.route("chat").await["weight"], 0);
    let record = weir
        .audit()
        .into_iter()
        .rev()
        .find(|r| r["action"] == "rollback")
        .expect("the rollback is in the audit log");
    let actor = admin_call(
        &weir.admin_url("/v1/auth"),
        Method::GET,
        Some(&token),
        None,
        &[],
    )
    .await
    .json()["actor"]
        .clone();
    assert_eq!(record["actor"], actor, "{record}");
    assert_eq!(record["reason"], "from the weir dashboard", "{record}");
    page.wait_for(
        "document.querySelector('#route-chat h2').textContent.includes('rolled back') \
         && document.querySelector('#notice').textContent.includes('applied')",
        "the page shows the rollback",
    )
    .await;
    assert_eq!(
        page.eval("document.querySelector('#rollback-chat').disabled")
            .await,
        true,
        "nothing is left to roll back, and the button says so"
    );

    // Only the 401s the test asked for were errors; every request went to the admin listener.
    let unexpected: Vec<String> = page
        .errors()
        .into_iter()
        .filter(|e| !e.contains("401"))
        .collect();
    assert_eq!(unexpected, Vec::<String>::new());
    let requested = page.requested();
    assert!(
        requested.iter().any(|u| u.ends_with("/ui/app.js")),
        "{requested:?}"
    );
    for url in &requested {
        assert!(
            url.starts_with(&format!("{origin}/"))
                || url == "about:blank"
                || url.starts_with("data:"),
            "a request off the admin origin: {url}"
        );
    }
}

/// Writes docs/dashboard.png from a running `weir demo` during its first canary (run by hand:
/// `cargo test --test dashboard -- --ignored screenshot`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes docs/dashboard.png from a running demo; run by hand"]
async fn screenshot_of_the_demo() {
    use std::io::BufRead;
    let bin = chromium().expect("the screenshot needs chromium");
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["demo", "--interval", "20s", "--duration", "5m"])
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("weir demo starts");
    let stdout = std::io::BufReader::new(demo.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if let Some(url) = line.trim().strip_prefix("dashboard") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let dashboard = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("weir demo prints its dashboard URL");
    let client = http1();
    let routes = format!("{dashboard}v1/routes");
    let history = format!("{dashboard}v1/history");
    // Into the second step, with half a minute of samples behind it.
    assert_eventually!(
        within Duration::from_secs(120),
        get(&client, &routes).await.json()["routes"][0]["weight"] == 5000
            && get(&client, &history).await.json()["routes"][0]["versions"][0]["samples"]
                .as_array()
                .is_some_and(|s| s.len() >= 6),
        "the demo's canary never reached 50% with samples behind it"
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
    screenshot(&bin, &dashboard, Duration::from_secs(3), &out).await;
    let _ = demo.kill();
    let _ = demo.wait();
    let png = std::fs::read(&out).unwrap();
    assert!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        out.display()
    );
}
