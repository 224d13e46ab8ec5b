//! The routing decision on the hot path: table load (ArcSwap), route match and split.
//! Target: under 100 ns per decision. Run: `cargo bench --bench routing`.

use std::hint::black_box;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use weir::Config;
use weir::Metrics;
use weir::{build_table, RoutingState, VersionSet};

const CONFIG: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
[[versions]]
model = "chat"
version = "v2"
backends = ["http://127.0.0.1:9003"]
[[versions]]
model = "embed"
version = "e1"
backends = ["http://127.0.0.1:9004"]

[[routes]]
name = "embeddings"
prefix = "/v1/embeddings"
stable = "embed@e1"

[[routes]]
name = "chat-sticky"
prefix = "/v1/chat"
host = "sticky.example"
stable = "chat@v1"
candidate = "chat@v2"
weight = "5%"
sticky_header = "x-session-id"

[[routes]]
name = "chat"
prefix = "/v1/chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "5%"
"#;

fn routing(c: &mut Criterion) {
    let config = Config::from_toml_str(CONFIG, "bench").expect("valid bench config");
    let metrics = Metrics::new();
    let state = RoutingState::from_config(&config);
    let table = build_table(&config, &state, &metrics, &mut VersionSet::default()).expect("table");
    let table = ArcSwap::from_pointee(table);

    let plain = HeaderMap::new();
    let mut sticky = HeaderMap::new();
    sticky.insert(
        "x-session-id",
        HeaderValue::from_static("user-4711-session-abcdef"),
    );

    c.bench_function("route_decision_random", |b| {
        b.iter(|| {
            let t = table.load();
            let route = t.find(
                black_box(Some("api.example")),
                black_box("/v1/chat/completions"),
            );
            let target = route
                .expect("route")
                .choose(black_box(&plain))
                .expect("target");
            black_box(target.role);
        })
    });
    c.bench_function("route_decision_sticky", |b| {
        b.iter(|| {
            let t = table.load();
            let route = t.find(
                black_box(Some("sticky.example")),
                black_box("/v1/chat/completions"),
            );
            let target = route
                .expect("route")
                .choose(black_box(&sticky))
                .expect("target");
            black_box(target.role);
        })
    });
}

criterion_group!(benches, routing);
criterion_main!(benches);
