//! Traffic split through the real proxy: random shares within statistical tolerance, sticky
//! cohorts (header and cookie) that only grow with the weight and reshuffle for a new candidate,
//! and the `x-weir-version` override.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::*;
use http::Method;

const TWO_VERSIONS: &str = r#"
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
weight = "WEIGHT"
"#;

/// Sends `n` GETs (4 at a time, over keep-alive) with the headers `headers(i)` and counts the
/// versions that served them. Every response must be a 200 from the backend its
/// `x-weir-version` names.
async fn count_versions<H>(url: &str, n: usize, headers: H) -> HashMap<String, usize>
where
    H: Fn(usize) -> Vec<(String, String)> + Send + Sync + Clone + 'static,
{
    const WORKERS: usize = 4;
    let client = http1();
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let client = client.clone();
        let url = url.to_string();
        let headers = headers.clone();
        tasks.push(tokio::spawn(async move {
            let mut counts = HashMap::<String, usize>::new();
            for i in (worker..n).step_by(WORKERS) {
                let mut req = request(Method::GET, &url);
                for (k, v) in headers(i) {
                    req = req.header(k, v);
                }
                let reply = send(&client, req.body(empty()).unwrap()).await;
                assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
                let served = reply.served_by().to_string();
                assert_eq!(
                    reply.header("x-backend"),
                    Some(served.as_str()),
                    "request {i}: x-weir-version {served:?} but the body came from {:?}",
                    reply.text()
                );
                *counts.entry(served).or_default() += 1;
            }
            counts
        }));
    }
    let mut total = HashMap::new();
    for task in tasks {
        for (version, count) in task.await.unwrap() {
            *total.entry(version).or_default() += count;
        }
    }
    total
}

/// Asserts that `got` out of `n` is within 5 binomial standard deviations of `basis_points`.
fn assert_share(what: &str, got: usize, n: usize, basis_points: u32) {
    let p = f64::from(basis_points) / 10_000.0;
    let expected = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (got as f64 - expected).abs() <= 5.0 * sigma,
        "{what}: {got} of {n}, expected {expected:.1} ± {:.1} (5σ)",
        5.0 * sigma
    );
}

async fn split_share(weight: &str, basis_points: u32) {
    const N: usize = 4000;
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let weir = Weir::start(
        &TWO_VERSIONS.replace("WEIGHT", weight),
        &[("v1", &v1.url()), ("v2", &v2.url())],
    )
    .await;
    let counts = count_versions(&weir.url("/v1/completions"), N, |_| Vec::new()).await;
    let stable = counts.get("chat@v1").copied().unwrap_or(0);
    let candidate = counts.get("chat@v2").copied().unwrap_or(0);
    assert_eq!(stable + candidate, N, "unexpected versions: {counts:?}");
    assert_eq!(v1.hits() + v2.hits(), N, "backend hits");
    match basis_points {
        0 => assert_eq!(candidate, 0, "weight 0%: {counts:?}"),
        10_000 => assert_eq!(candidate, N, "weight 100%: {counts:?}"),
        bp => assert_share(&format!("candidate share at {weight}"), candidate, N, bp),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_0_percent_never_reaches_candidate() {
    split_share("0%", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_half_percent() {
    split_share("0.5%", 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_10_percent() {
    split_share("10%", 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_50_percent() {
    split_share("50%", 5000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_100_percent_always_reaches_candidate() {
    split_share("100%", 10_000).await;
}

// === sticky keys ===

const STICKY: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{v2}"]

[[versions]]
model = "chat"
version = "v3"
backends = ["{v3}"]

[[routes]]
name = "chat"
stable = "chat@v1"
candidate = "CANDIDATE"
weight = "WEIGHT"
STICKY
"#;

const KEYS: usize = 500;
const REPEATS: usize = 3;

/// Starts a fresh weir with the given candidate, weight and sticky setting, sends every one of
/// `keys` keys `REPEATS` times (with `headers(key, repeat)`), checks that each key always got the
/// same version, and returns the keys that went to the candidate.
async fn cohort<H>(
    candidate: &str,
    weight: &str,
    sticky: &str,
    keys: usize,
    headers: H,
) -> BTreeSet<usize>
where
    H: Fn(usize, usize) -> Vec<(String, String)> + Send + Sync + Clone + 'static,
{
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let v3 = Backend::named("chat@v3").await;
    let config = STICKY
        .replace("CANDIDATE", candidate)
        .replace("WEIGHT", weight)
        .replace("STICKY", sticky);
    let weir = Weir::start(
        &config,
        &[("v1", &v1.url()), ("v2", &v2.url()), ("v3", &v3.url())],
    )
    .await;
    let client = http1();
    let mut tasks = Vec::new();
    const WORKERS: usize = 4;
    for worker in 0..WORKERS {
        let client = client.clone();
        let url = weir.url("/v1/chat");
        let headers = headers.clone();
        let candidate = candidate.to_string();
        tasks.push(tokio::spawn(async move {
            let mut on_candidate = BTreeSet::new();
            for key in (worker..keys).step_by(WORKERS) {
                let mut seen = Vec::new();
                for repeat in 0..REPEATS {
                    let mut req = request(Method::GET, &url);
                    for (k, v) in headers(key, repeat) {
                        req = req.header(k, v);
                    }
                    let reply = send(&client, req.body(empty()).unwrap()).await;
                    assert_eq!(reply.status, 200, "key {key}: {}", reply.text());
                    assert_eq!(reply.header("x-backend"), Some(reply.served_by()));
                    seen.push(reply.served_by().to_string());
                }
                assert!(
                    seen.iter().all(|v| v == &seen[0]),
                    "key {key} moved between versions: {seen:?}"
                );
                assert!(
                    seen[0] == "chat@v1" || seen[0] == candidate,
                    "key {key} served by {seen:?}"
                );
                if seen[0] == candidate {
                    on_candidate.insert(key);
                }
            }
            on_candidate
        }));
    }
    let mut cohort = BTreeSet::new();
    for task in tasks {
        cohort.extend(task.await.unwrap());
    }
    cohort
}

fn session_header(key: usize, _repeat: usize) -> Vec<(String, String)> {
    vec![("x-session".to_string(), format!("user-{key}"))]
}

const STICKY_HEADER: &str = r#"sticky_header = "x-session""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cohort_is_stable_and_only_grows_with_weight() {
    let c5 = cohort("chat@v2", "5%", STICKY_HEADER, KEYS, session_header).await;
    let c20 = cohort("chat@v2", "20%", STICKY_HEADER, KEYS, session_header).await;
    let c50 = cohort("chat@v2", "50%", STICKY_HEADER, KEYS, session_header).await;
    assert_share("cohort at 5%", c5.len(), KEYS, 500);
    assert_share("cohort at 20%", c20.len(), KEYS, 2000);
    assert_share("cohort at 50%", c50.len(), KEYS, 5000);
    let back_at_20: Vec<_> = c5.difference(&c20).collect();
    assert!(
        back_at_20.is_empty(),
        "raising 5% → 20% moved keys back to stable: {back_at_20:?}"
    );
    let back_at_50: Vec<_> = c20.difference(&c50).collect();
    assert!(
        back_at_50.is_empty(),
        "raising 20% → 50% moved keys back to stable: {back_at_50:?}"
    );
    assert!(
        c5.len() < c20.len() && c20.len() < c50.len(),
        "cohort did not grow: {} → {} → {}",
        c5.len(),
        c20.len(),
        c50.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cohort_is_reshuffled_for_a_new_candidate() {
    let v2 = cohort("chat@v2", "50%", STICKY_HEADER, KEYS, session_header).await;
    let v3 = cohort("chat@v3", "50%", STICKY_HEADER, KEYS, session_header).await;
    assert_share("chat@v2 cohort at 50%", v2.len(), KEYS, 5000);
    assert_share("chat@v3 cohort at 50%", v3.len(), KEYS, 5000);
    // Independent cohorts of half the keys each differ in about half the keys (250 ± 11);
    // the same cohort would differ in none.
    let differing = v2.symmetric_difference(&v3).count();
    assert!(
        differing >= 150,
        "a new candidate kept nearly the same cohort: {differing} of {KEYS} keys differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cookie_keeps_each_session_on_one_version() {
    // Other cookies change on every request; only the `session` cookie may decide.
    let cookies = |key: usize, repeat: usize| {
        vec![(
            "cookie".to_string(),
            format!("theme=t{repeat}; session=user-{key}; lang=l{repeat}"),
        )]
    };
    let keys = 200;
    let c = cohort(
        "chat@v2",
        "50%",
        r#"sticky_cookie = "session""#,
        keys,
        cookies,
    )
    .await;
    assert_share("cookie cohort at 50%", c.len(), keys, 5000);
}

// === override ===

const OVERRIDE: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{v2}"]

[[versions]]
model = "chat"
version = "v3"
backends = ["{v3}"]

[[routes]]
name = "pinned"
prefix = "/pinned"
stable = "chat@v1"
candidate = "chat@v2"
weight = 0
allow_override = true

[[routes]]
name = "full"
prefix = "/full"
stable = "chat@v1"
candidate = "chat@v2"
weight = "100%"
allow_override = true

[[routes]]
name = "closed"
prefix = "/closed"
stable = "chat@v1"
candidate = "chat@v2"
weight = 0
"#;

struct OverrideSetup {
    weir: Weir,
    v3: Backend,
    _v1: Backend,
    _v2: Backend,
}

async fn override_setup() -> OverrideSetup {
    let v1 = Backend::echo("chat@v1").await;
    let v2 = Backend::echo("chat@v2").await;
    let v3 = Backend::echo("chat@v3").await;
    let weir = Weir::start(
        OVERRIDE,
        &[("v1", &v1.url()), ("v2", &v2.url()), ("v3", &v3.url())],
    )
    .await;
    OverrideSetup {
        weir,
        v3,
        _v1: v1,
        _v2: v2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_pins_to_the_routes_versions_when_allowed() {
    let s = override_setup().await;
    let client = http1();
    for _ in 0..10 {
        // Without the header the weights decide...
        assert_eq!(
            get(&client, &s.weir.url("/pinned/x")).await.served_by(),
            "chat@v1"
        );
        assert_eq!(
            get(&client, &s.weir.url("/full/x")).await.served_by(),
            "chat@v2"
        );

        // ...with it, the named version serves, against the weight.
        let reply = get_with(
            &client,
            &s.weir.url("/pinned/x"),
            &[("x-weir-version", "chat@v2")],
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.served_by(), "chat@v2");
        let echo = reply.json();
        assert_eq!(echo["name"], "chat@v2");
        assert_eq!(
            echoed_header(&echo, "x-weir-version"),
            Vec::<String>::new(),
            "the override header reached the backend"
        );

        let reply = get_with(
            &client,
            &s.weir.url("/full/x"),
            &[("x-weir-version", "chat@v1")],
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.served_by(), "chat@v1");
        assert_eq!(reply.json()["name"], "chat@v1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_to_a_version_outside_the_route_is_refused() {
    let s = override_setup().await;
    let client = http1();
    for value in ["chat@v3", "nope@v9"] {
        let reply = get_with(
            &client,
            &s.weir.url("/pinned/x"),
            &[("x-weir-version", value)],
        )
        .await;
        assert_weir_error(&reply, 400, "bad_override", None);
    }
    assert_eq!(s.v3.hits(), 0, "a version outside the route was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_is_ignored_when_the_route_does_not_allow_it() {
    let s = override_setup().await;
    let client = http1();
    for value in ["chat@v2", "chat@v3", "nope@v9"] {
        for _ in 0..5 {
            let reply = get_with(
                &client,
                &s.weir.url("/closed/x"),
                &[("x-weir-version", value)],
            )
            .await;
            assert_eq!(reply.status, 200, "override {value}: {}", reply.text());
            assert_eq!(
                reply.served_by(),
                "chat@v1",
                "override {value} was honoured"
            );
            assert_eq!(reply.json()["name"], "chat@v1");
        }
    }
    assert_eq!(s.v3.hits(), 0);
}
