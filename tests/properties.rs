//! Property tests on what users and clients type: percentages, config files, headers and admin
//! JSON. Whatever the input, weir answers with a value or a clear error, never a panic.

mod common;

use common::*;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use weir::strip_hop_by_hop;
use weir::{format_percent, parse_percent};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_basis_point_survives_a_round_trip(bp in 0u16..=10_000) {
        prop_assert_eq!(parse_percent(&format_percent(bp)), Ok(bp));
        prop_assert_eq!(parse_percent(&format!("{}%", f64::from(bp) / 100.0)), Ok(bp));
    }

    #[test]
    fn percent_parsing_never_panics_and_stays_in_range(text in ".{0,12}") {
        if let Ok(bp) = parse_percent(&text) {
            prop_assert!(bp <= 10_000);
        }
    }

    #[test]
    fn config_parsing_never_panics(text in "(\\[\\[?[a-z_.]{1,12}\\]\\]?\n|[a-z_]{1,12} = (\"[^\"\n]{0,12}\"|-?[0-9]{1,6}|\\[\\]|true)\n){0,12}") {
        let _ = weir::Config::from_toml_str(&text, "prop.toml");
    }

    #[test]
    fn any_weight_in_a_config_is_accepted_in_range_or_refused_with_its_path(weight in prop_oneof![
        (-20_000i64..20_000).prop_map(|n| n.to_string()),
        (0u32..20_000).prop_map(|n| format!("\"{}%\"", f64::from(n) / 100.0)),
        ".{0,8}".prop_map(|s| format!("{s:?}")),
    ]) {
        let text = format!(
            "[[versions]]\nmodel = \"m\"\nversion = \"v1\"\nbackends = [\"http://127.0.0.1:1\"]\n\
             [[versions]]\nmodel = \"m\"\nversion = \"v2\"\nbackends = [\"http://127.0.0.1:2\"]\n\
             [[routes]]\nname = \"r\"\nstable = \"m@v1\"\ncandidate = \"m@v2\"\nweight = {weight}\n"
        );
        match weir::Config::from_toml_str(&text, "prop.toml") {
            Ok(config) => prop_assert!(config.routes[0].weight <= 10_000),
            Err(e) => prop_assert!(
                e.problems.iter().any(|p| p.path == "routes[0].weight" || p.path.starts_with("line ")),
                "{e}"
            ),
        }
    }

    #[test]
    fn hop_by_hop_headers_never_pass_and_end_to_end_ones_always_do(
        named in proptest::collection::vec("x-[a-z]{1,8}", 0..4),
        kept in proptest::collection::vec("y-[a-z]{1,8}", 0..4),
    ) {
        let mut headers = HeaderMap::new();
        for name in ["keep-alive", "transfer-encoding", "te", "upgrade", "proxy-authorization", "trailer", "proxy-connection"] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        for name in &named {
            headers.insert(HeaderName::try_from(name.as_str()).unwrap(), HeaderValue::from_static("1"));
        }
        for name in &kept {
            headers.insert(HeaderName::try_from(name.as_str()).unwrap(), HeaderValue::from_static("1"));
        }
        headers.insert(http::header::CONNECTION, HeaderValue::from_str(&named.join(", ")).unwrap_or(HeaderValue::from_static("close")));
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        for name in &kept {
            prop_assert!(left.contains(&name.as_str()), "{name} was dropped");
        }
        for name in left {
            prop_assert!(name.starts_with("y-"), "{name} passed");
        }
    }
}

#[tokio::test]
async fn admin_json_of_any_shape_gets_a_4xx_or_a_200_and_never_breaks_the_table() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let v1 = Backend::named("v1").await;
    let v2 = Backend::named("v2").await;
    let config = r#"
        [[versions]]
        model = "m"
        version = "v1"
        backends = ["{v1}"]
        [[versions]]
        model = "m"
        version = "v2"
        backends = ["{v2}"]
        [[routes]]
        name = "r"
        stable = "m@v1"
        candidate = "m@v2"
    "#;
    let weir = Weir::start(config, &[("v1", &v1.url()), ("v2", &v2.url())]).await;
    let token = std::fs::read_to_string(weir.state_dir.path().join("admin.token")).unwrap();
    let json_value = proptest::arbitrary::any::<u8>().prop_flat_map(|_| {
        prop_oneof![
            Just("null".to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<f64>().prop_map(|f| if f.is_finite() {
                f.to_string()
            } else {
                "1e999".into()
            }),
            any::<i64>().prop_map(|i| i.to_string()),
            ".{0,10}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        ]
    });
    let body = prop_oneof![
        (
            prop_oneof![
                Just("weight"),
                Just("basis_points"),
                Just("reason"),
                Just("wieght")
            ],
            json_value.clone()
        )
            .prop_map(|(k, v)| format!("{{\"{k}\": {v}}}")),
        json_value,
        ".{0,20}",
    ];
    let mut runner = TestRunner::default();
    let client = http1();
    for _ in 0..200 {
        let body = body.new_tree(&mut runner).unwrap().current();
        let request = request(http::Method::PUT, &weir.admin_url("/v1/routes/r/weight"))
            .header("authorization", format!("Bearer {}", token.trim()))
            .body(full(body.clone()))
            .unwrap();
        let reply = send(&client, request).await;
        let status = reply.status.as_u16();
        assert!(
            status == 200 || (400..500).contains(&status),
            "{body:?} → {status} {}",
            reply.text()
        );
        if status != 200 {
            assert!(
                reply.json()["error"]
                    .as_str()
                    .is_some_and(|e| !e.is_empty()),
                "{body:?}: {}",
                reply.text()
            );
        }
        let weight = weir.routes().await["routes"][0]["weight"].as_u64().unwrap();
        assert!(weight <= 10_000);
    }
    assert_eq!(
        get(&client, &weir.url("/")).await.status,
        200,
        "still serving"
    );
}
