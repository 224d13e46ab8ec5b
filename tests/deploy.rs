//! The deployment files parse and say what they should: the Kubernetes manifests (and the weir
//! config and registry inside the ConfigMap, checked by weir itself), the alert rules and the
//! dashboard. `.ci/run` also runs `promtool check rules` on the alerts.

use std::path::Path;

use serde::Deserialize;
use serde_yaml::Value;

fn docs(path: &str) -> Vec<Value> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

/// Every family weir exports, each with one series so it shows in the exposition.
fn exported() -> String {
    let metrics = weir::metrics::Metrics::new();
    metrics.enable_fleet();
    let _stats = metrics.target("r", "m@v1", weir::metrics::Role::Stable);
    let _shadow = metrics.shadow("r", "m@v2");
    metrics.set_weight("r", 0);
    metrics.set_mismatch("r", "m@v1", "http://b", false);
    metrics.count_canary_decision("r", "hold");
    String::from_utf8_lossy(&metrics.encode()).into_owned()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the manifests"))
}

#[test]
fn the_kubernetes_manifests_parse_and_carry_a_valid_weir_config() {
    let manifests = docs("deploy/kubernetes/weir.yaml");
    let deployment = kind(&manifests, "Deployment");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    // Readiness leaves the fleet checks out, so an etcd outage or a config rollout does not
    // empty the Service (fleet mode).
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"],
        "/readyz?exclude=etcd,fleet_state"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] == true);
    kind(&manifests, "Service");
    assert_eq!(
        kind(&manifests, "PodDisruptionBudget")["spec"]["minAvailable"],
        1
    );

    let data = &kind(&manifests, "ConfigMap")["data"];
    let config =
        weir::Config::from_toml_str(data["weir.toml"].as_str().unwrap(), "ConfigMap weir.toml")
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.admin.addr.port(), 9901);
    let registry =
        weir::registry::Registry::parse(data["registry.toml"].as_str().unwrap()).unwrap();
    for route in &config.routes {
        for label in std::iter::once(&route.stable).chain(&route.candidate) {
            assert!(
                registry.find(label).is_some(),
                "{label} is routed but not in the ConfigMap's registry"
            );
        }
    }

    let verified = docs("deploy/kubernetes/model-server-verified.yaml");
    let init = &kind(&verified, "Deployment")["spec"]["template"]["spec"]["initContainers"][0];
    let args: Vec<&str> = init["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"registry") && args.contains(&"verify"),
        "{args:?}"
    );
}

#[test]
fn the_alert_rules_name_real_metrics() {
    let rules = &docs("deploy/prometheus/alerts.yml")[0]["groups"][0]["rules"];
    let names: Vec<&str> = rules
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for wanted in [
        "WeirBackendVersionMismatch",
        "WeirCandidateErrorRateAboveStable",
        "WeirCanaryRolledBack",
        "WeirDown",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
    let exported = exported();
    for rule in rules.as_sequence().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        for metric in expr
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("weir_"))
        {
            assert!(
                exported.contains(&format!("# TYPE {metric} ")),
                "alert uses {metric}, which weir does not export"
            );
        }
    }
}

#[test]
fn the_dashboard_parses_and_queries_real_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/weir-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let exported = exported();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 7);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for metric in expr
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("weir_"))
            {
                let family = metric.trim_end_matches("_bucket");
                assert!(
                    exported.contains(&format!("# TYPE {family} ")),
                    "panel {} uses {metric}",
                    panel["title"]
                );
            }
        }
    }
}
