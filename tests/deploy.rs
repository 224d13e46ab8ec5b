//! The deployment files parse and say what they should: the Kubernetes manifests (every object a
//! pod uses is defined, the weir config and registry they mount are checked by weir itself, state
//! is persistent, several replicas only in fleet mode), the Dockerfile and .dockerignore (checked
//! without a container engine), the alert rules and the dashboard. `.ci/run` also runs
//! `kubernetes-validate --strict` on the manifests and `promtool check rules` on the alerts.

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
    let metrics = weir::Metrics::new();
    metrics.enable_fleet();
    let mlflow = metrics.enable_mlflow();
    mlflow.refused.with_label_values(&["r"]).set(0);
    mlflow.refusals.with_label_values(&["r"]);
    let _stats = metrics.target("r", "m@v1", weir::Role::Stable);
    metrics.shadow("r", "m@v2").record_agreement(true);
    metrics.set_weight("r", 0);
    metrics.set_mismatch("r", "m@v1", "http://b", false);
    metrics.canary_route("r");
    String::from_utf8_lossy(&metrics.encode()).into_owned()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the manifests"))
}

// === Kubernetes ===

/// Every object of every manifest in deploy/kubernetes/, with the file it came from.
fn manifests() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
        .into_iter()
        .flat_map(|file| {
            let path = format!("deploy/kubernetes/{file}");
            docs(&path)
                .into_iter()
                .filter(|d| !d.is_null())
                .map(move |d| (path.clone(), d))
        })
        .collect()
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or("?")
}

fn name_of_value(name: &Value) -> &str {
    name.as_str().unwrap_or("?")
}

fn find<'a>(all: &'a [(String, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    all.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && name_of(d) == name)
}

fn strs(value: &Value) -> Vec<&str> {
    value
        .as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The objects that run pods, with their file.
fn workloads(all: &[(String, Value)]) -> Vec<(&str, &Value)> {
    all.iter()
        .filter(|(_, d)| {
            ["Deployment", "StatefulSet", "DaemonSet", "Job"]
                .iter()
                .any(|k| d["kind"] == *k)
        })
        .map(|(file, d)| (file.as_str(), d))
        .collect()
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn containers(workload: &Value) -> Vec<&Value> {
    let spec = pod_spec(workload);
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec[*k].as_sequence())
        .flatten()
        .collect()
}

/// Where a path inside a container comes from.
#[derive(Debug, PartialEq)]
enum Source {
    ConfigMap {
        name: String,
        key: String,
    },
    Secret {
        name: String,
        key: String,
    },
    /// A PersistentVolumeClaim: a defined one, or a StatefulSet's claim template.
    Claim(String),
    /// Anything else (`emptyDir`, `hostPath`, ...), by its volume type.
    Other(String),
}

/// The key of a ConfigMap or Secret volume source that appears as `file` in its mount.
fn key_in(source: &Value, file: &str) -> Option<String> {
    match source["items"].as_sequence() {
        Some(items) => items
            .iter()
            .find(|item| item["path"] == file)
            .and_then(|item| item["key"].as_str())
            .map(str::to_string),
        None => Some(file.to_string()),
    }
}

/// What backs `path` in `container` of `workload`, and whether it is mounted read-only.
fn source_of(workload: &Value, container: &Value, path: &str) -> (Source, bool) {
    let mount = container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|m| {
            let at = m["mountPath"].as_str().unwrap_or("");
            path == at || path.starts_with(&format!("{}/", at.trim_end_matches('/')))
        })
        .max_by_key(|m| m["mountPath"].as_str().unwrap_or("").len())
        .unwrap_or_else(|| {
            panic!(
                "{}: {path} is on no volume of container {}",
                name_of(workload),
                name_of_value(&container["name"])
            )
        });
    let read_only = mount["readOnly"] == true;
    let at = mount["mountPath"].as_str().unwrap().trim_end_matches('/');
    let file = path[at.len()..].trim_start_matches('/');
    let volume_name = mount["name"].as_str().unwrap();
    let claim_template = workload["spec"]["volumeClaimTemplates"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|t| name_of(t) == volume_name);
    if claim_template {
        return (Source::Claim(volume_name.to_string()), read_only);
    }
    let volume = pod_spec(workload)["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == volume_name)
        .unwrap_or_else(|| panic!("{}: no volume {volume_name}", name_of(workload)));
    let from_config_map = |source: &Value| {
        key_in(source, file).map(|key| Source::ConfigMap {
            name: source["name"].as_str().unwrap_or("?").to_string(),
            key,
        })
    };
    let from_secret = |source: &Value, name: &Value| {
        key_in(source, file).map(|key| Source::Secret {
            name: name.as_str().unwrap_or("?").to_string(),
            key,
        })
    };
    let source = if !volume["configMap"].is_null() {
        from_config_map(&volume["configMap"])
    } else if !volume["secret"].is_null() {
        from_secret(&volume["secret"], &volume["secret"]["secretName"])
    } else if !volume["projected"].is_null() {
        volume["projected"]["sources"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find_map(|s| {
                if !s["configMap"].is_null() {
                    from_config_map(&s["configMap"])
                        .filter(|_| s["configMap"]["items"].is_sequence())
                } else if !s["secret"].is_null() {
                    from_secret(&s["secret"], &s["secret"]["name"])
                        .filter(|_| s["secret"]["items"].is_sequence())
                } else {
                    None
                }
            })
    } else if !volume["persistentVolumeClaim"].is_null() {
        let claim = &volume["persistentVolumeClaim"]["claimName"];
        Some(Source::Claim(claim.as_str().unwrap_or("?").to_string()))
    } else {
        let kind = volume
            .as_mapping()
            .and_then(|m| m.keys().filter_map(Value::as_str).find(|k| *k != "name"))
            .unwrap_or("?");
        Some(Source::Other(kind.to_string()))
    };
    let source = source.unwrap_or_else(|| {
        panic!(
            "{}: volume {volume_name} has no item for {path}",
            name_of(workload)
        )
    });
    (source, read_only)
}

/// The text a ConfigMap or Secret gives a mounted file; panics naming what is missing.
fn mounted_text<'a>(all: &'a [(String, Value)], source: &Source) -> &'a str {
    let (kind, name, key) = match source {
        Source::ConfigMap { name, key } => ("ConfigMap", name, key),
        Source::Secret { name, key } => ("Secret", name, key),
        other => panic!("expected a ConfigMap or Secret file, got {other:?}"),
    };
    let object = find(all, kind, name).unwrap_or_else(|| panic!("{kind} {name} is not defined"));
    ["data", "stringData"]
        .iter()
        .find_map(|field| object[*field][key.as_str()].as_str())
        .unwrap_or_else(|| panic!("{kind} {name} has no key {key}"))
}

/// The value after `flag` in `args` (`--flag VALUE` or `--flag=VALUE`).
fn flag<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            args.get(i + 1).copied()
        } else {
            a.strip_prefix(flag).and_then(|v| v.strip_prefix('='))
        }
    })
}

/// Whether `host:port` names a Service defined in the manifests (`NAME` or, for a StatefulSet
/// pod, `POD.SERVICE` with POD one of the set's pods), exposing `port`.
fn assert_service_reaches(all: &[(String, Value)], host: &str, port: u16, user: &str) {
    let (pod, service_name) = match host.split_once('.') {
        Some((pod, service)) => (Some(pod), service),
        None => (None, host),
    };
    let service = find(all, "Service", service_name).unwrap_or_else(|| {
        panic!("{user} reaches {host}:{port}, but no Service {service_name} is defined")
    });
    assert!(
        service["spec"]["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|p| p["port"].as_u64() == Some(u64::from(port))),
        "{user} reaches {host}:{port}: Service {service_name} has no port {port}"
    );
    if let Some(pod) = pod {
        assert_eq!(
            service["spec"]["clusterIP"], "None",
            "{user} reaches pod {host}: Service {service_name} must be headless"
        );
        let (set, ordinal) = pod.rsplit_once('-').expect("a StatefulSet pod name");
        let set = find(all, "StatefulSet", set)
            .unwrap_or_else(|| panic!("{user} reaches {host}: no StatefulSet {set}"));
        assert_eq!(set["spec"]["serviceName"], service_name, "{host}");
        let ordinal: u64 = ordinal.parse().expect("a pod ordinal");
        assert!(
            ordinal < set["spec"]["replicas"].as_u64().unwrap_or(1),
            "{user} reaches {host}, beyond StatefulSet {}'s replicas",
            name_of(set)
        );
    }
}

fn host_port(url: &str) -> (String, u16) {
    let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    (uri.host().unwrap().to_string(), port)
}

#[test]
fn the_kubernetes_manifests_parse_and_carry_a_valid_weir_config() {
    let all = manifests();
    let (mut fleets, mut singles) = (0, 0);
    for (file, workload) in workloads(&all) {
        let name = name_of(workload);
        let spec = pod_spec(workload);
        for container in &containers(workload) {
            let args = strs(&container["args"]);
            if args.first() != Some(&"serve") {
                continue;
            }
            let at = format!("{file}: {name}");
            assert!(spec["securityContext"]["runAsNonRoot"] == true, "{at}");
            assert_eq!(
                container["livenessProbe"]["httpGet"]["path"], "/healthz",
                "{at}"
            );
            let readiness = container["readinessProbe"]["httpGet"]["path"].as_str();
            assert!(readiness.is_some_and(|p| p.starts_with("/readyz")), "{at}");

            // The config comes from a ConfigMap and is one weir accepts.
            let config_path =
                flag(&args, "--config").unwrap_or_else(|| panic!("{at}: no --config"));
            let (source, _) = source_of(workload, container, config_path);
            assert!(
                matches!(source, Source::ConfigMap { .. }),
                "{at}: {source:?}"
            );
            let config = weir::Config::from_toml_str(
                mounted_text(&all, &source),
                &format!("{at} {config_path}"),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(config.admin.addr.port(), 9901, "{at}");
            let ports: Vec<u64> = container["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|p| p["containerPort"].as_u64())
                .collect();
            assert!(
                ports.contains(&u64::from(config.listener.addr.port())),
                "{at}: {ports:?}"
            );

            // The registry: a read-only mounted file that registers every routed version.
            let registry_path = config
                .registry
                .as_ref()
                .unwrap_or_else(|| panic!("{at}: no [registry]"));
            let (source, read_only) =
                source_of(workload, container, registry_path.to_str().unwrap());
            assert!(
                read_only,
                "{at}: the registry is reviewed input, mounted read-only"
            );
            let registry = weir::Registry::parse(mounted_text(&all, &source))
                .unwrap_or_else(|e| panic!("{at}: registry: {e}"));
            for route in &config.routes {
                for label in std::iter::once(&route.stable).chain(&route.candidate) {
                    assert!(
                        registry.find(label).is_some(),
                        "{at}: {label} is routed but not in the registry"
                    );
                }
            }
            for version in &config.versions {
                for backend in &version.backends {
                    let (host, port) = host_port(&backend.to_string());
                    assert_service_reaches(&all, &host, port, &at);
                }
            }

            // The token from a Secret, the state on a persistent volume.
            let token = config
                .admin
                .token_file
                .as_ref()
                .unwrap_or_else(|| panic!("{at}: no token_file"));
            let (source, _) = source_of(workload, container, token.to_str().unwrap());
            assert!(
                matches!(source, Source::Secret { .. }),
                "{at}: the token file comes from {source:?}"
            );
            mounted_text(&all, &source);
            let (source, read_only) =
                source_of(workload, container, config.state_dir.to_str().unwrap());
            assert!(
                matches!(source, Source::Claim(_)) && !read_only,
                "{at}: the state dir {} is on {source:?}, not a writable persistent volume",
                config.state_dir.display()
            );

            // One canary controller per state: several replicas only in fleet mode.
            let replicas = workload["spec"]["replicas"].as_u64().unwrap_or(1);
            match &config.fleet {
                Some(fleet) => {
                    fleets += 1;
                    assert!(replicas >= 2, "{at}: a fleet of {replicas}");
                    for endpoint in &fleet.endpoints {
                        let (host, port) = host_port(endpoint);
                        assert_service_reaches(&all, &host, port, &at);
                    }
                    let selector = &workload["spec"]["selector"]["matchLabels"];
                    assert!(
                        all.iter().any(|(_, d)| d["kind"] == "PodDisruptionBudget"
                            && &d["spec"]["selector"]["matchLabels"] == selector),
                        "{at}: no PodDisruptionBudget for the fleet"
                    );
                    assert_eq!(readiness, Some("/readyz?exclude=etcd,fleet_state"), "{at}");
                }
                None => {
                    singles += 1;
                    assert_eq!(replicas, 1, "{at}: {replicas} replicas in file mode would be {replicas} canary controllers over {replicas} states");
                    if workload["kind"] == "Deployment" {
                        assert_eq!(
                            workload["spec"]["strategy"]["type"], "Recreate",
                            "{at}: a rolling update runs two pods over one state"
                        );
                    }
                }
            }
        }
    }
    assert!(
        fleets >= 1 && singles >= 1,
        "a fleet and a single-replica layout: {fleets} / {singles}"
    );

    // The model servers verify their artifact against the same registry.
    let verified = docs("deploy/kubernetes/model-server-verified.yaml");
    let init = &kind(&verified, "Deployment")["spec"]["template"]["spec"]["initContainers"][0];
    let args = strs(&init["args"]);
    assert!(
        args.contains(&"registry") && args.contains(&"verify"),
        "{args:?}"
    );
}

#[test]
fn every_object_a_kubernetes_pod_spec_references_is_defined() {
    let all = manifests();
    let must_define = |kind: &str, name: &Value, by: &str| {
        let name = name
            .as_str()
            .unwrap_or_else(|| panic!("{by}: a {kind} reference without a name"));
        assert!(
            find(&all, kind, name).is_some(),
            "{by} uses {kind} {name}, which no manifest defines"
        );
    };
    let mut checked = 0;
    for (file, workload) in workloads(&all) {
        let by = format!(
            "{file}: {} {}",
            workload["kind"].as_str().unwrap(),
            name_of(workload)
        );
        let spec = pod_spec(workload);
        if !spec["serviceAccountName"].is_null() {
            must_define("ServiceAccount", &spec["serviceAccountName"], &by);
        }
        if !workload["spec"]["serviceName"].is_null() {
            must_define("Service", &workload["spec"]["serviceName"], &by);
        }
        let templates: Vec<&str> = workload["spec"]["volumeClaimTemplates"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(name_of)
            .collect();
        let volumes = spec["volumes"].as_sequence().cloned().unwrap_or_default();
        for volume in &volumes {
            checked += 1;
            if !volume["configMap"].is_null() {
                must_define("ConfigMap", &volume["configMap"]["name"], &by);
            }
            if !volume["secret"].is_null() {
                must_define("Secret", &volume["secret"]["secretName"], &by);
            }
            if !volume["persistentVolumeClaim"].is_null() {
                must_define(
                    "PersistentVolumeClaim",
                    &volume["persistentVolumeClaim"]["claimName"],
                    &by,
                );
            }
            for source in volume["projected"]["sources"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                if !source["configMap"].is_null() {
                    must_define("ConfigMap", &source["configMap"]["name"], &by);
                }
                if !source["secret"].is_null() {
                    must_define("Secret", &source["secret"]["name"], &by);
                }
            }
            assert!(
                volume["emptyDir"].is_null(),
                "{by}: volume {} is an emptyDir",
                name_of_value(&volume["name"])
            );
        }
        for container in containers(workload) {
            for mount in container["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                let name = mount["name"].as_str().unwrap();
                assert!(
                    templates.contains(&name) || volumes.iter().any(|v| v["name"] == name),
                    "{by}: container {} mounts volume {name}, which the pod does not have",
                    name_of_value(&container["name"])
                );
            }
            for env in container["env"].as_sequence().into_iter().flatten() {
                let from = &env["valueFrom"];
                if !from["configMapKeyRef"].is_null() {
                    must_define("ConfigMap", &from["configMapKeyRef"]["name"], &by);
                }
                if !from["secretKeyRef"].is_null() {
                    must_define("Secret", &from["secretKeyRef"]["name"], &by);
                }
            }
            for from in container["envFrom"].as_sequence().into_iter().flatten() {
                if !from["configMapRef"].is_null() {
                    must_define("ConfigMap", &from["configMapRef"]["name"], &by);
                }
                if !from["secretRef"].is_null() {
                    must_define("Secret", &from["secretRef"]["name"], &by);
                }
            }
            // Images are pinned: a tag, never `latest`.
            let image = container["image"].as_str().unwrap_or("");
            let tag = image
                .rsplit_once(':')
                .map(|(_, t)| t)
                .filter(|t| !t.contains('/'));
            assert!(
                tag.is_some_and(|t| t != "latest"),
                "{by}: image {image:?} is not pinned"
            );
        }
    }
    assert!(checked >= 5, "only {checked} volumes checked");

    // The fleet's etcd: several members, each on its own persistent volume.
    let etcd = find(&all, "StatefulSet", "etcd").expect("the fleet ships its etcd");
    assert!(etcd["spec"]["replicas"].as_u64().unwrap() >= 3);
    let data = &containers(etcd)[0];
    let args = strs(&data["args"]);
    let dir = flag(&args, "--data-dir").expect("etcd --data-dir");
    assert!(
        matches!(source_of(etcd, data, dir).0, Source::Claim(_)),
        "etcd's data is not persistent"
    );
}

#[test]
fn the_admin_token_secret_is_a_marked_template() {
    let all = manifests();
    let (file, secret) = all
        .iter()
        .find(|(_, d)| d["kind"] == "Secret" && name_of(d) == "weir-admin-token")
        .expect("the admin token Secret is defined");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    assert!(text.contains("TEMPLATE"), "{file} says it is a template");
    assert!(
        text.contains("kubectl create secret generic weir-admin-token"),
        "{file} says how to create the real one"
    );
    let token = secret["stringData"]["token"].as_str().unwrap();
    assert!(
        token.contains("REPLACE"),
        "{file}: the token is a placeholder: {token}"
    );
}

#[test]
fn the_shipped_registry_lets_the_routed_candidate_be_promoted() {
    let all = manifests();
    let registry = find(&all, "ConfigMap", "weir-registry").expect("ConfigMap weir-registry");
    let registry =
        weir::Registry::parse(registry["data"]["registry.toml"].as_str().unwrap()).unwrap();
    let now = std::time::SystemTime::now();
    for (file, config_map) in &all {
        let Some(text) = config_map["data"]["weir.toml"].as_str() else {
            continue;
        };
        let config = weir::Config::from_toml_str(text, file).unwrap_or_else(|e| panic!("{e}"));
        for candidate in config.routes.iter().filter_map(|r| r.candidate.as_ref()) {
            let version = registry.find(candidate).unwrap();
            weir::check_promotion(&registry.policy, version, now).unwrap_or_else(|refusals| {
                panic!(
                    "{file}: the canary could never promote {candidate}; renew the approvals in \
                     deploy/kubernetes/common.yaml: {refusals:?}"
                )
            });
        }
    }
}

// === Docker ===

/// The Dockerfile's instructions (continuation lines joined, comments dropped), each as
/// (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile");
    let text = std::fs::read_to_string(path).unwrap();
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (word, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                instructions.push((word.to_ascii_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    instructions
}

/// Whether `.dockerignore` keeps `path` (relative to the context) out of the build context:
/// the last matching pattern decides, `!` re-includes, a pattern matching a parent directory
/// matches everything under it, `*` stays within one path segment and `**` spans any number.
fn dockerignored(patterns: &[String], path: &str) -> bool {
    fn segments_match(pattern: &[&str], path: &[&str]) -> bool {
        match (pattern.first(), path.first()) {
            (None, _) => true, // the pattern named a parent of `path`
            (Some(&"**"), _) => {
                (0..=path.len()).any(|skip| segments_match(&pattern[1..], &path[skip..]))
            }
            (Some(_), None) => false,
            (Some(p), Some(s)) => {
                glob(p.as_bytes(), s.as_bytes()) && segments_match(&pattern[1..], &path[1..])
            }
        }
    }
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
            (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let path: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    let mut ignored = false;
    for pattern in patterns {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern.as_str()),
        };
        let pattern: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
        if !pattern.is_empty() && segments_match(&pattern, &path) {
            ignored = !negated;
        }
    }
    ignored
}

fn dockerignore() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(".dockerignore");
    std::fs::read_to_string(path)
        .expect("a .dockerignore beside the build context's root")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_dockerignore_keeps_build_output_history_and_state_out_of_the_context() {
    let patterns = dockerignore();
    for path in [
        "target",
        "target/release/weir",
        ".git/HEAD",
        "weir-state/admin.token",
        "vendor/etcd-client/regen/target/debug/regen",
    ] {
        assert!(
            dockerignored(&patterns, path),
            "{path} would be in the build context"
        );
    }
    for path in ["Cargo.toml", "src/main.rs", "vendor/etcd-client/src/lib.rs"] {
        assert!(
            !dockerignored(&patterns, path),
            "{path} is left out of the build context"
        );
    }
    // The matcher itself: negation, `**` and `*` within a segment.
    let rules = [
        "docs".to_string(),
        "!docs/keep.md".to_string(),
        "**/*.tmp".to_string(),
    ];
    assert!(dockerignored(&rules, "docs/a.md") && !dockerignored(&rules, "docs/keep.md"));
    assert!(dockerignored(&rules, "a/b/c.tmp") && !dockerignored(&rules, "a/b.tmpx"));
}

#[test]
fn the_dockerfile_builds_with_the_ci_command_from_files_in_the_context_and_runs_as_non_root() {
    const BUILD: &str = "cargo build --release --locked --bin weir";
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let patterns = dockerignore();
    let instructions = dockerfile();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (word, _))| word == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build: {instructions:?}");

    // Every COPY from the context names something there that .dockerignore lets in.
    let mut copied = Vec::new();
    for (word, args) in &instructions {
        if word != "COPY" || args.contains("--from=") {
            continue;
        }
        assert!(
            !args.trim_start().starts_with('['),
            "COPY in JSON form: {args}"
        );
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let (_, sources) = words.split_last().expect("COPY SRC... DEST");
        for source in sources {
            let source = source.trim_start_matches("./");
            assert!(
                root.join(source).exists(),
                "COPY {source}: not in the repository"
            );
            assert!(
                !dockerignored(&patterns, source),
                "COPY {source}: excluded by .dockerignore"
            );
            copied.push(source.to_string());
        }
    }
    // What `cargo build` needs: the manifest, the lock file, the sources, the vendored
    // etcd-client (patched in by [patch.crates-io]) and every [[bench]] target's file.
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap()).unwrap();
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".to_string(),
        "src".to_string(),
    ];
    for patch in manifest["patch"]["crates-io"].as_table().unwrap().values() {
        needed.push(patch["path"].as_str().unwrap().to_string());
    }
    for bench in manifest
        .get("bench")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
    {
        let path = bench
            .get("path")
            .and_then(|p| p.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("benches/{}.rs", bench["name"].as_str().unwrap()));
        needed.push(path);
    }
    for path in &needed {
        assert!(
            copied
                .iter()
                .any(|c| path == c || path.starts_with(&format!("{}/", c.trim_end_matches('/')))),
            "the build needs {path}, which no COPY brings in ({copied:?})"
        );
        assert!(
            !dockerignored(&patterns, path),
            "the build needs {path}; .dockerignore drops it"
        );
    }

    // The build runs the command CI proves without protoc, as written there.
    let builds: Vec<&String> = instructions
        .iter()
        .filter(|(word, args)| word == "RUN" && args.contains("cargo build"))
        .map(|(_, args)| args)
        .collect();
    assert_eq!(builds.len(), 1, "one cargo build: {builds:?}");
    let command = builds[0]
        .split("&&")
        .map(str::trim)
        .find(|c| c.starts_with("cargo build"))
        .unwrap();
    assert_eq!(command, BUILD, "the Dockerfile's build command");
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains(BUILD)),
        ".ci/run does not run `{BUILD}`"
    );

    // The final stage runs as a numeric non-root uid.
    let last = &instructions[*stages.last().unwrap()..];
    let user = last
        .iter()
        .rfind(|(word, _)| word == "USER")
        .map(|(_, args)| args.as_str())
        .expect("the final stage sets USER");
    let uid: u32 = user.split(':').next().unwrap().parse().unwrap_or_else(|_| {
        panic!("USER {user}: a numeric uid lets Kubernetes check runAsNonRoot")
    });
    assert_ne!(uid, 0, "the final stage runs as root");
}

// === alerts and dashboard ===

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
        "WeirMlflowPinRefused",
        "WeirMlflowUnreachable",
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

/// `promtool test rules deploy/prometheus/alerts.test.yml` runs in `.ci/run`; this checks that
/// the unit tests cover every alert, each both firing and silent.
#[test]
fn every_alert_has_a_promtool_test_that_fires_it_and_one_that_keeps_it_silent() {
    let rules = &docs("deploy/prometheus/alerts.yml")[0]["groups"][0]["rules"];
    let tests = &docs("deploy/prometheus/alerts.test.yml")[0];
    assert_eq!(tests["rule_files"][0], "alerts.yml");
    let cases: Vec<&Value> = tests["tests"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().unwrap())
        .collect();
    for rule in rules.as_sequence().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        let expected = |fires: bool| {
            cases.iter().any(|c| {
                c["alertname"] == name && c["exp_alerts"].as_sequence().unwrap().is_empty() != fires
            })
        };
        assert!(expected(true), "no promtool test fires {name}");
        assert!(expected(false), "no promtool test keeps {name} silent");
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
