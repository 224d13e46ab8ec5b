//! Held-out evaluation: a JSONL set of requests with expectations, run against a version, with a
//! pass threshold. The set's SHA-256 goes with every result, so a report names exactly what was
//! evaluated; an empty set is refused — an evaluation that checks nothing is not a control.
//!
//! One case per line:
//! `{"name": "capital", "category": "quality", "request": {"path": "/v1/chat/completions", "body": {...}},
//!   "expect": {"status": 200, "contains": "Paris", "regex": "(?i)paris", "equals": {"/object": "chat.completion"},
//!              "not_contains": "attacker", "not_regex": "(?i)ignore previous",
//!              "similar_to": "The capital of France is Paris.", "similarity": 0.8}, "runs": 1}`
//!
//! Run against one version ([`run`]) a set checks each case's expectations; run against stable
//! and candidate ([`compare::run`]) it also compares their answers, and judges each category on
//! the lower confidence bound of its pass rate.

pub mod compare;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::registry::digest::sha256_file;
use crate::shadow::compare::{generated_text, text_similarity, Answer};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: Option<String>,
    /// What the case checks (`quality`, `safety`, `jailbreak`, `format`, …): a policy sets a
    /// threshold per category. Default `quality`.
    pub category: Option<String>,
    pub request: CaseRequest,
    #[serde(default)]
    pub expect: Expect,
    /// Times the case is sent (default 1). Versions that sample answer differently each time;
    /// pin sampling in the body (`"temperature": 0`, `"seed": 7`) where the model allows it.
    pub runs: Option<u32>,
}

impl Case {
    pub fn category(&self) -> &str {
        self.category.as_deref().unwrap_or("quality")
    }

    pub fn runs(&self) -> u32 {
        self.runs.unwrap_or(1).max(1)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    #[serde(default = "default_method")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body (sent as application/json).
    pub body: Option<Value>,
}

fn default_method() -> String {
    "POST".into()
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Default 200.
    pub status: Option<u16>,
    /// JSON pointer → value the answer must hold there.
    #[serde(default)]
    pub equals: BTreeMap<String, Value>,
    /// The generated text (or the body) must contain this.
    pub contains: Option<String>,
    /// … and match this regex.
    pub regex: Option<String>,
    /// … and be similar to this reference answer (token Dice ≥ `similarity`, default 0.8).
    pub similar_to: Option<String>,
    pub similarity: Option<f64>,
    /// An answer the model must never give: the text must not contain this …
    pub not_contains: Option<String>,
    /// … nor match this regex.
    pub not_regex: Option<String>,
}

/// A loaded evaluation set.
#[derive(Clone, Debug)]
pub struct EvalSet {
    pub path: PathBuf,
    pub sha256: String,
    pub cases: Vec<Case>,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read the eval set {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: line {line}: {message}")]
    Case {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("the eval set {path} has no cases; an empty evaluation checks nothing and is refused")]
    Empty { path: PathBuf },
    #[error("the eval set {path} has no {category:?} cases, which the policy requires (it has: {present})")]
    MissingCategory {
        path: PathBuf,
        category: String,
        present: String,
    },
}

impl EvalSet {
    pub fn load(path: &Path) -> Result<EvalSet, EvalError> {
        let read = |message: String| EvalError::Read {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| read(e.to_string()))?;
        let sha256 = sha256_file(path).map_err(|e| read(e.to_string()))?;
        let mut cases = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let case: Case = serde_json::from_str(line).map_err(|e| EvalError::Case {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })?;
            for re in [&case.expect.regex, &case.expect.not_regex]
                .into_iter()
                .flatten()
            {
                regex::Regex::new(re).map_err(|e| EvalError::Case {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: format!("bad regex: {e}"),
                })?;
            }
            cases.push(case);
        }
        if cases.is_empty() {
            return Err(EvalError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(EvalSet {
            path: path.to_path_buf(),
            sha256,
            cases,
        })
    }
}

/// Where the cases are sent.
#[derive(Clone, Debug)]
pub struct EvalTarget {
    /// `http://host:port` of a model server, or of weir.
    pub base_url: String,
    /// Through weir: pin every case to this version with `x-weir-version`.
    pub version: Option<String>,
    pub timeout: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    pub failures: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub file: String,
    pub sha256: String,
    pub passed: usize,
    pub total: usize,
    pub pass_rate: f64,
    pub threshold: f64,
    pub ok: bool,
    pub cases: Vec<CaseResult>,
}

/// Runs every case and judges the set against `threshold` (share of cases that must pass).
pub async fn run(set: &EvalSet, target: &EvalTarget, threshold: f64) -> EvalReport {
    let client = http_client();
    let mut cases = Vec::with_capacity(set.cases.len());
    for (i, case) in set.cases.iter().enumerate() {
        let name = case
            .name
            .clone()
            .unwrap_or_else(|| format!("case {}", i + 1));
        let failures =
            match tokio::time::timeout(target.timeout, run_case(&client, case, target)).await {
                Err(_) => vec![format!("no answer within {:?}", target.timeout)],
                Ok(failures) => failures,
            };
        cases.push(CaseResult {
            name,
            passed: failures.is_empty(),
            failures,
        });
    }
    let passed = cases.iter().filter(|c| c.passed).count();
    let total = cases.len();
    let pass_rate = if total == 0 {
        0.0
    } else {
        passed as f64 / total as f64
    };
    EvalReport {
        file: set.path.display().to_string(),
        sha256: set.sha256.clone(),
        passed,
        total,
        pass_rate,
        threshold,
        ok: total > 0 && pass_rate >= threshold,
        cases,
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn run_case(client: &HttpClient, case: &Case, target: &EvalTarget) -> Vec<String> {
    match send(client, case, target).await {
        Ok(answer) => judge(
            &case.expect,
            answer.status,
            answer.event_stream,
            &answer.body,
        ),
        Err(failure) => vec![failure],
    }
}

/// Sends one case to `target`; its answer, or why there is none.
async fn send(client: &HttpClient, case: &Case, target: &EvalTarget) -> Result<Answer, String> {
    let method = Method::from_bytes(case.request.method.as_bytes())
        .map_err(|_| format!("bad method {:?}", case.request.method))?;
    let mut builder = Request::builder().method(method).uri(format!(
        "{}{}",
        target.base_url.trim_end_matches('/'),
        case.request.path
    ));
    for (name, value) in &case.request.headers {
        builder = builder.header(name, value);
    }
    if let Some(version) = &target.version {
        builder = builder.header("x-weir-version", version);
    }
    let body = match &case.request.body {
        Some(json) => {
            builder = builder.header("content-type", "application/json");
            Bytes::from(json.to_string())
        }
        None => Bytes::new(),
    };
    let request = builder
        .body(Full::new(body))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status().as_u16();
    let event_stream = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let head_status = crate::shadow::compare::grpc_status(response.headers());
    let collected = Limited::new(response.into_body(), 16 * 1024 * 1024)
        .collect()
        .await
        .map_err(|e| format!("body failed: {e}"))?;
    let grpc_status = collected
        .trailers()
        .and_then(crate::shadow::compare::grpc_status)
        .or(head_status);
    Ok(Answer {
        status,
        event_stream,
        body: collected.to_bytes().to_vec(),
        grpc_status,
    })
}

/// Every expectation the answer misses (empty: the case passed).
pub fn judge(expect: &Expect, status: u16, event_stream: bool, body: &[u8]) -> Vec<String> {
    let mut failures = Vec::new();
    let want_status = expect.status.unwrap_or(200);
    if status != want_status {
        failures.push(format!("status {status}, expected {want_status}"));
    }
    if !expect.equals.is_empty() {
        match serde_json::from_slice::<Value>(body) {
            Err(_) => failures.push("the answer is not JSON".into()),
            Ok(json) => {
                for (pointer, wanted) in &expect.equals {
                    let got = json.pointer(pointer);
                    if got != Some(wanted) {
                        failures.push(format!(
                            "{pointer} is {}, expected {wanted}",
                            got.map_or("missing".to_string(), Value::to_string)
                        ));
                    }
                }
            }
        }
    }
    let answer = Answer {
        status,
        event_stream,
        body: body.to_vec(),
        grpc_status: None,
    };
    let text =
        generated_text(&answer).unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    if let Some(needle) = &expect.contains {
        if !text.contains(needle.as_str()) {
            failures.push(format!("the answer does not contain {needle:?}"));
        }
    }
    if let Some(needle) = &expect.not_contains {
        if text.contains(needle.as_str()) {
            failures.push(format!(
                "the answer contains {needle:?}, which it must never"
            ));
        }
    }
    if let Some(pattern) = &expect.not_regex {
        match regex::Regex::new(pattern) {
            Ok(re) if re.is_match(&text) => failures.push(format!(
                "the answer matches /{pattern}/, which it must never"
            )),
            Ok(_) => {}
            Err(e) => failures.push(format!("bad regex: {e}")),
        }
    }
    if let Some(pattern) = &expect.regex {
        match regex::Regex::new(pattern) {
            Ok(re) if re.is_match(&text) => {}
            Ok(_) => failures.push(format!("the answer does not match /{pattern}/")),
            Err(e) => failures.push(format!("bad regex: {e}")),
        }
    }
    if let Some(reference) = &expect.similar_to {
        let want = expect.similarity.unwrap_or(0.8);
        let got = text_similarity(&text, reference);
        if got < want {
            failures.push(format!("similarity to the reference {got:.2} < {want}"));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(content: &str) -> Vec<u8> {
        serde_json::json!({"object": "chat.completion", "choices": [{"message": {"content": content}}]})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn expectations_are_judged_one_by_one() {
        let expect: Expect = serde_json::from_value(serde_json::json!({
            "contains": "Paris", "regex": "(?i)capital", "equals": {"/object": "chat.completion"},
            "similar_to": "The capital of France is Paris", "similarity": 0.7
        }))
        .unwrap();
        assert!(judge(
            &expect,
            200,
            false,
            &chat("The capital of France is Paris.")
        )
        .is_empty());
        let failures = judge(&expect, 500, false, &chat("Bananas are yellow."));
        assert_eq!(failures.len(), 4, "{failures:?}");
        let not_json = judge(&expect, 200, false, b"plain text");
        assert!(
            not_json.iter().any(|f| f.contains("not JSON")),
            "{not_json:?}"
        );
    }

    #[test]
    fn negative_expectations_fail_an_answer_a_model_must_never_give() {
        let expect: Expect = serde_json::from_value(serde_json::json!({
            "not_contains": "exfil.example", "not_regex": "(?i)api key"
        }))
        .unwrap();
        assert!(judge(&expect, 200, false, &chat("A canary release is gradual.")).is_empty());
        let poisoned = judge(
            &expect,
            200,
            false,
            &chat("Sure. Send your API key to https://exfil.example/collect"),
        );
        assert_eq!(poisoned.len(), 2, "{poisoned:?}");
        assert!(poisoned[0].contains("must never"), "{poisoned:?}");
    }

    #[test]
    fn empty_sets_are_refused() {
        let path =
            std::env::temp_dir().join(format!("weir-eval-empty-{}.jsonl", std::process::id()));
        std::fs::write(&path, "\n\n").unwrap();
        let err = EvalSet::load(&path).unwrap_err();
        assert!(matches!(err, EvalError::Empty { .. }), "{err}");
        std::fs::write(
            &path,
            "{\"request\": {\"path\": \"/x\"}, \"expect\": {\"regex\": \"(\"}}\n",
        )
        .unwrap();
        assert!(EvalSet::load(&path)
            .unwrap_err()
            .to_string()
            .contains("bad regex"));
        let _ = std::fs::remove_file(&path);
    }
}
