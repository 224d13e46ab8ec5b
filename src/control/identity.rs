//! Backend identity probe: each backend is asked which model it serves, and one that answers
//! anything but the registry's identity (or digest) for its version is taken out of rotation.
//!
//! Invariant: with a probe configured, a backend takes traffic only while its last answer was
//! the expected identity; a version with no such backend fails closed (503 `unverified`).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::shutdown::stopped;

use super::command::Actor;
use super::pins::load_registry;
use super::Writer;
use crate::config::{BackendProtocol, IdentityProbe, IdentitySource};
use crate::grpc;
use crate::upstream::{Backend, Version};

/// Largest probe answer read.
const MAX_PROBE_BODY: usize = 1024 * 1024;

type ProbeClient = Client<HttpConnector, Full<Bytes>>;

/// One version to check, with what it must report and where it is routed.
struct Expected {
    version: Arc<Version>,
    /// Accepted answers: the registry identity (default `model@version`) and the digest.
    accepted: Vec<String>,
    routes: Vec<String>,
}

/// What one backend said.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Identity(String),
    /// It answered, but without an identity where the probe looks.
    Missing(String),
    /// It could not be asked.
    Unreachable(String),
}

/// The prober: its HTTP clients (HTTP/1.1, and h2c for `protocol = "http2"` versions and the
/// gRPC health probe) and each backend's last verdict, so changes (and a first mismatch) are
/// reported once.
#[derive(Debug)]
pub struct Prober {
    http1: ProbeClient,
    http2: ProbeClient,
    verdicts: tokio::sync::Mutex<HashMap<(String, String), bool>>,
}

impl Default for Prober {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Prober {
            http1: Client::builder(TokioExecutor::new()).build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            verdicts: tokio::sync::Mutex::new(HashMap::new()),
        }
    }
}

impl Prober {
    fn client(&self, probe: &IdentityProbe, version: &Version) -> &ProbeClient {
        if probe.source == IdentitySource::GrpcHealth || version.protocol == BackendProtocol::Http2
        {
            &self.http2
        } else {
            &self.http1
        }
    }
}

/// Probes every routed backend now; returns how many are verified.
pub async fn probe_once(writer: &Writer, prober: &Prober) -> usize {
    let config = writer.config().await;
    let Some(probe) = config.identity.clone() else {
        return 0;
    };
    let registry = match load_registry(&config) {
        Ok(registry) => registry,
        Err(e) => {
            tracing::error!(error = %e, "identity probe: cannot read the registry; keeping the last verdicts");
            return 0;
        }
    };
    let mut expected: HashMap<String, Expected> = HashMap::new();
    let table = writer.table().load_full();
    for route in &table.routes {
        for target in std::iter::once(&route.stable).chain(&route.candidate) {
            let label = target.version.label.to_string();
            let entry = expected.entry(label.clone()).or_insert_with(|| {
                let accepted = match registry.as_ref().and_then(|r| r.find(&label)) {
                    Some(v) => vec![
                        v.identity(),
                        v.digest.clone(),
                        format!("sha256:{}", v.digest),
                    ],
                    None => vec![label.clone()],
                };
                Expected {
                    version: Arc::clone(&target.version),
                    accepted,
                    routes: Vec::new(),
                }
            });
            entry.routes.push(route.name.to_string());
        }
    }
    let mut verified = 0;
    for (label, want) in &expected {
        for backend in want.version.backends.iter() {
            let client = prober.client(&probe, &want.version);
            let answer = match probe.source {
                IdentitySource::GrpcHealth => {
                    ask_grpc_health(client, &probe, backend, &want.accepted).await
                }
                _ => ask(client, &probe, backend).await,
            };
            let ok = matches!(&answer, Answer::Identity(id) if want.accepted.contains(id));
            if ok {
                verified += 1;
            }
            backend.set_verified(ok);
            let mismatched = matches!(answer, Answer::Identity(_) | Answer::Missing(_)) && !ok;
            let url = format!("{}://{}", backend.scheme, backend.authority);
            for route in &want.routes {
                writer
                    .metrics()
                    .set_mismatch(route, label, &url, mismatched);
            }
            let previous = prober
                .verdicts
                .lock()
                .await
                .insert((label.clone(), url.clone()), ok);
            // Report a change, and a first verdict that is not a pass.
            if previous.map_or(!ok, |was| was != ok) {
                report_change(writer, label, &url, &want.accepted[0], &answer, ok).await;
            }
        }
    }
    verified
}

async fn report_change(
    writer: &Writer,
    label: &str,
    url: &str,
    expected: &str,
    answer: &Answer,
    ok: bool,
) {
    let (action, reported) = match answer {
        Answer::Identity(id) if ok => ("identity_verified", id.clone()),
        Answer::Identity(id) => ("identity_mismatch", id.clone()),
        Answer::Missing(why) => ("identity_mismatch", why.clone()),
        Answer::Unreachable(why) => ("identity_unreachable", why.clone()),
    };
    let detail =
        json!({"version": label, "backend": url, "expected": expected, "reported": reported});
    let reason = match action {
        "identity_verified" => format!("backend {url} reports {reported}: back in rotation for {label}"),
        "identity_mismatch" => format!("backend {url} of {label} reports {reported:?}, the registry expects {expected:?}: out of rotation"),
        _ => format!("backend {url} of {label} could not be probed ({reported}): out of rotation until it answers"),
    };
    if ok {
        tracing::info!(version = label, backend = url, "{reason}");
    } else {
        tracing::error!(version = label, backend = url, expected, reported = %reported, "{reason}");
    }
    if let Err(e) = writer
        .record(&Actor::IdentityProbe, action, None, detail, &reason)
        .await
    {
        tracing::error!(error = %e, "cannot record the identity change in the audit log");
    }
}

async fn ask(client: &ProbeClient, probe: &IdentityProbe, backend: &Backend) -> Answer {
    let uri: Uri = match format!("{}://{}{}", backend.scheme, backend.authority, probe.path).parse()
    {
        Ok(uri) => uri,
        Err(e) => return Answer::Unreachable(format!("bad probe URL: {e}")),
    };
    let request = Request::get(uri)
        .header("x-weir-probe", "identity")
        .body(Full::default())
        .expect("a GET with a parsed URI is valid");
    let exchange = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Ok(Answer::Missing(format!("status {}", response.status())));
        }
        if let IdentitySource::Header(name) = &probe.source {
            return Ok(
                match response.headers().get(name).and_then(|v| v.to_str().ok()) {
                    Some(id) => Answer::Identity(id.trim().to_string()),
                    None => Answer::Missing(format!("no {name} header")),
                },
            );
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_PROBE_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(identity_from_json(&body, &probe.source))
    };
    match tokio::time::timeout(probe.timeout, exchange).await {
        Err(_) => Answer::Unreachable(format!("no answer within {:?}", probe.timeout)),
        Ok(Err(e)) => Answer::Unreachable(e),
        Ok(Ok(answer)) => answer,
    }
}

/// Asks the backend's gRPC health service about each accepted identity in turn (the registry's
/// `model@version` first, then the digest): the first it reports SERVING is its identity.
async fn ask_grpc_health(
    client: &ProbeClient,
    probe: &IdentityProbe,
    backend: &Backend,
    accepted: &[String],
) -> Answer {
    let uri: Uri = match format!("{}://{}{}", backend.scheme, backend.authority, probe.path).parse()
    {
        Ok(uri) => uri,
        Err(e) => return Answer::Unreachable(format!("bad probe URL: {e}")),
    };
    let mut reports = Vec::new();
    for service in accepted {
        let request = Request::post(uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-weir-probe", "identity")
            .body(Full::new(grpc::health_check_request(service)))
            .expect("a POST with a parsed URI is valid");
        let exchange = async {
            let response = client.request(request).await.map_err(|e| e.to_string())?;
            let (head, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_PROBE_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            let code = crate::shadow::compare::grpc_status(&head.headers).or_else(|| {
                body.trailers()
                    .and_then(crate::shadow::compare::grpc_status)
            });
            Ok::<_, String>(match (head.status.is_success(), code) {
                (false, _) => Err(format!("status {}", head.status)),
                (true, Some(0)) => grpc::serving_status(&body.to_bytes()),
                (true, Some(5)) => Err("NOT_FOUND".to_string()),
                (true, Some(code)) => Err(format!("grpc-status {code}")),
                (true, None) => Err("no grpc-status".to_string()),
            })
        };
        match tokio::time::timeout(probe.timeout, exchange).await {
            Err(_) => return Answer::Unreachable(format!("no answer within {:?}", probe.timeout)),
            Ok(Err(e)) => return Answer::Unreachable(e),
            Ok(Ok(Ok(status))) if status == "SERVING" => return Answer::Identity(service.clone()),
            Ok(Ok(Ok(status))) | Ok(Ok(Err(status))) => {
                reports.push(format!("{service}: {status}"))
            }
        }
    }
    Answer::Missing(format!("gRPC health reports {}", reports.join(", ")))
}

fn identity_from_json(body: &[u8], source: &IdentitySource) -> Answer {
    let IdentitySource::JsonPointer(pointer) = source else {
        return Answer::Missing("not a JSON probe".into());
    };
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return Answer::Missing("the answer is not JSON".into());
    };
    match json.pointer(pointer) {
        Some(Value::String(id)) => Answer::Identity(id.clone()),
        Some(other) => Answer::Identity(other.to_string()),
        None => Answer::Missing(format!("nothing at {pointer}")),
    }
}

/// Probes at every interval and after every table swap, until `stop`.
pub async fn run(writer: Arc<Writer>, prober: Arc<Prober>, mut stop: watch::Receiver<bool>) {
    loop {
        let interval = match writer.config().await.identity {
            Some(probe) => probe.interval,
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = writer.swapped() => {}
            _ = stopped(&mut stop) => return,
        }
        probe_once(&writer, &prober).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_read_from_json_pointers() {
        let body = br#"{"object":"list","data":[{"id":"chat@v2","object":"model"}]}"#;
        let pointer = IdentitySource::JsonPointer("/data/0/id".into());
        assert_eq!(
            identity_from_json(body, &pointer),
            Answer::Identity("chat@v2".into())
        );
        let missing = IdentitySource::JsonPointer("/data/1/id".into());
        assert!(matches!(
            identity_from_json(body, &missing),
            Answer::Missing(_)
        ));
        assert!(matches!(
            identity_from_json(b"<html>", &pointer),
            Answer::Missing(_)
        ));
    }
}
