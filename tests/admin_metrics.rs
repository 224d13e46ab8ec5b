//! The admin listener: `/metrics` is Prometheus text whose counters match exactly the traffic the
//! test sent, `/v1/routes` reflects the configuration, health endpoints answer.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const CONFIG: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{v2}"]

[[versions]]
model = "embed"
version = "e1"
backends = ["{e1}"]

[[routes]]
name = "chat"
prefix = "/v1/chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "50%"

[[routes]]
name = "embed"
prefix = "/v1/embeddings"
stable = "embed@e1"
"#;

struct Setup {
    weir: Weir,
    _backends: Vec<Backend>,
}

async fn setup() -> Setup {
    let v1 = Backend::echo("chat@v1").await;
    let v2 = Backend::echo("chat@v2").await;
    let e1 = Backend::echo("embed@e1").await;
    let weir = Weir::start(
        CONFIG,
        &[("v1", &v1.url()), ("v2", &v2.url()), ("e1", &e1.url())],
    )
    .await;
    Setup {
        weir,
        _backends: vec![v1, v2, e1],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_counters_match_the_traffic_sent() {
    let s = setup().await;
    let client = http1();
    // (route, version, status class) → requests, as observed by the client.
    let mut sent = HashMap::<(String, String, String), usize>::new();
    let plan = [
        ("/v1/chat/completions", 120, 200),
        ("/v1/chat/completions?status=404", 30, 404),
        ("/v1/chat/completions?status=503", 10, 503),
        ("/v1/embeddings", 25, 200),
    ];
    for (path, times, status) in plan {
        for _ in 0..times {
            let reply = get(&client, &s.weir.url(path)).await;
            assert_eq!(reply.status, status, "{path}: {}", reply.text());
            let version = reply.served_by().to_string();
            assert_eq!(reply.json()["name"], version.as_str());
            let route = if path.starts_with("/v1/chat") {
                "chat"
            } else {
                "embed"
            };
            let class = format!("{}xx", status / 100);
            *sent.entry((route.to_string(), version, class)).or_default() += 1;
        }
    }
    let served_by = |version: &str| -> usize {
        sent.iter()
            .filter(|((_, v, _), _)| v == version)
            .map(|(_, n)| n)
            .sum()
    };
    assert!(
        served_by("chat@v1") > 0 && served_by("chat@v2") > 0,
        "50% split sent everything one way: {sent:?}"
    );

    let total: usize = sent.values().sum();
    assert_eventually_eq!(
        s.weir.metric("weir_requests_total", &[]).await,
        Some(total as f64),
        "weir_requests_total summed over all labels"
    );
    let scrape = s.weir.metrics().await;
    for ((route, version, class), n) in &sent {
        let role = if version == "chat@v2" {
            "candidate"
        } else {
            "stable"
        };
        let labels = [
            ("route", route.as_str()),
            ("version", version.as_str()),
            ("role", role),
            ("status_class", class.as_str()),
        ];
        assert_eq!(
            metric(&scrape, "weir_requests_total", &labels),
            Some(*n as f64),
            "weir_requests_total{labels:?}"
        );
    }
    for version in ["chat@v1", "chat@v2", "embed@e1"] {
        let route = if version == "embed@e1" {
            "embed"
        } else {
            "chat"
        };
        let labels = [("route", route), ("version", version)];
        assert_eq!(
            metric(&scrape, "weir_request_duration_seconds_count", &labels),
            Some(served_by(version) as f64),
            "weir_request_duration_seconds_count{labels:?}"
        );
        assert!(
            has_histogram(&scrape, "weir_request_duration_seconds", &labels),
            "weir_request_duration_seconds{labels:?} histogram missing"
        );
        assert!(
            has_histogram(&scrape, "weir_time_to_first_byte_seconds", &labels),
            "weir_time_to_first_byte_seconds{labels:?} histogram missing"
        );
        assert_eq!(
            metric(&scrape, "weir_in_flight_requests", &labels),
            Some(0.0),
            "weir_in_flight_requests{labels:?}"
        );
    }
    assert_eq!(
        metric(&scrape, "weir_request_errors_total", &[]).unwrap_or(0.0),
        0.0,
        "backend 4xx/5xx answers are not proxy errors"
    );
}

#[tokio::test]
async fn routes_endpoint_and_gauges_match_the_config() {
    let s = setup().await;
    let routes = s.weir.routes().await;
    let generation = routes["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("generation is not a number: {routes}"));
    let list = routes["routes"].as_array().expect("routes is an array");
    assert_eq!(list.len(), 2, "{routes}");
    let chat = list
        .iter()
        .find(|r| r["name"] == "chat")
        .expect("chat route");
    assert_eq!(chat["stable"], "chat@v1");
    assert_eq!(chat["candidate"], "chat@v2");
    assert_eq!(chat["weight"], 5000);
    assert!(chat["state"].is_string(), "{chat}");
    let embed = list
        .iter()
        .find(|r| r["name"] == "embed")
        .expect("embed route");
    assert_eq!(embed["stable"], "embed@e1");
    assert!(embed["candidate"].is_null(), "{embed}");
    assert_eq!(embed["weight"], 0);
    assert!(embed["state"].is_string(), "{embed}");

    let scrape = s.weir.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "weir_route_weight_basis_points",
            &[("route", "chat")]
        ),
        Some(5000.0)
    );
    assert_eq!(
        metric(
            &scrape,
            "weir_route_weight_basis_points",
            &[("route", "embed")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&scrape, "weir_routing_generation", &[]),
        Some(generation as f64)
    );
}

#[tokio::test]
async fn health_endpoints_answer() {
    let s = setup().await;
    let client = http1();
    assert_eq!(
        get(&client, &s.weir.admin_url("/healthz")).await.status,
        200
    );
    assert_eventually_eq!(
        get(&client, &s.weir.admin_url("/readyz")).await.status,
        http::StatusCode::OK,
        "/readyz"
    );
    let excluded = get(&client, &s.weir.admin_url("/readyz?exclude=serving")).await;
    assert_eq!(excluded.status, 200, "{}", excluded.text());
    assert_eq!(excluded.json()["checks"]["serving"], "excluded");
    for bad in ["/readyz?exclude=etdc", "/readyz?verbose"] {
        let reply = get(&client, &s.weir.admin_url(bad)).await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.text());
        assert!(
            reply.json()["error"]
                .as_str()
                .unwrap_or_default()
                .contains("exclude"),
            "{bad}: the 400 says what /readyz takes: {}",
            reply.text()
        );
    }
    assert_eq!(
        get(&client, &s.weir.admin_url("/nope")).await.status,
        404,
        "unknown admin path"
    );
    let reply = get(&client, &s.weir.admin_url("/metrics")).await;
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "/metrics content-type {:?}",
        reply.header("content-type")
    );
}

#[tokio::test]
async fn in_flight_gauge_tracks_an_open_stream() {
    const EVENTS: usize = 3;
    let (backend, ack) = lockstep_sse_backend(EVENTS).await;
    let config = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[routes]]
name = "chat"
stable = "chat@v1"
"#;
    let weir = Weir::start(config, &[("v1", &backend.url())]).await;
    let labels = [("route", "chat"), ("version", "chat@v1")];
    let (_head, mut events) = open_stream(&http1(), &weir.url("/v1/stream")).await;
    assert_eq!(
        events.next(Duration::from_secs(5)).await.as_deref(),
        Some("data: 0")
    );
    assert_eventually_eq!(
        weir.metric("weir_in_flight_requests", &labels).await,
        Some(1.0),
        "weir_in_flight_requests"
    );
    for k in 0..EVENTS {
        if k > 0 {
            assert!(events.next(Duration::from_secs(5)).await.is_some());
        }
        let _ = ack.send(k);
    }
    assert_eq!(events.next(Duration::from_secs(5)).await, None);
    assert_eventually_eq!(
        weir.metric("weir_in_flight_requests", &labels).await,
        Some(0.0),
        "weir_in_flight_requests"
    );
    assert_eventually!(
        weir.metric(
            "weir_requests_total",
            &[("version", "chat@v1"), ("status_class", "2xx")]
        )
        .await
            == Some(1.0),
        "the stream was not counted once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_canary_decision_of_every_canary_route_is_exported_at_zero_from_the_start() {
    // Alerts such as `increase(weir_canary_decisions_total{decision="rollback"}[15m]) > 0` see
    // a process's first rollback only if the series existed before it, at zero.
    let canaries: String = ["eu", "us"]
        .iter()
        .map(|region| {
            format!(
                "[[routes]]\nname = \"chat-{region}\"\nprefix = \"/{region}/v1/chat\"\n\
                 stable = \"chat@v1\"\ncandidate = \"chat@v2\"\n\n\
                 [routes.canary]\nsteps = [\"10%\", \"50%\"]\ninterval = \"1h\"\n\n"
            )
        })
        .collect();
    let v1 = Backend::echo("chat@v1").await;
    let v2 = Backend::echo("chat@v2").await;
    let e1 = Backend::echo("embed@e1").await;
    let weir = Weir::start(
        &format!("{CONFIG}\n{canaries}"),
        &[("v1", &v1.url()), ("v2", &v2.url()), ("e1", &e1.url())],
    )
    .await;
    let scrape = weir.metrics().await;
    for route in ["chat-eu", "chat-us"] {
        for decision in ["advance", "hold", "promote", "rollback"] {
            let labels = [("route", route), ("decision", decision)];
            assert_eq!(
                metric(&scrape, "weir_canary_decisions_total", &labels),
                Some(0.0),
                "{route}/{decision} must be exported at 0"
            );
        }
    }
    for route in ["chat", "embed"] {
        assert_eq!(
            metric(&scrape, "weir_canary_decisions_total", &[("route", route)]),
            None,
            "route {route} has no canary, so no decisions"
        );
    }
}
