//! Comparing a candidate's shadow answer with the stable answer, off the hot path.
//!
//! Each comparator answers agree, disagree, or error (it could not judge: unparsable body,
//! missing field). A comparison agrees when every comparator that could judge agreed.

use std::collections::HashMap;

use serde_json::Value;

use crate::config::{Comparator, CompareConfig};

/// One side of a comparison: what a version answered.
#[derive(Clone, Debug, Default)]
pub struct Answer {
    pub status: u16,
    pub event_stream: bool,
    pub body: Vec<u8>,
    /// A gRPC answer's status (`grpc-status`, from its head or its trailers).
    pub grpc_status: Option<u32>,
}

/// The gRPC status a response's headers or trailers carry (`grpc-status`), if any.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    let value = headers.get("grpc-status")?;
    std::str::from_utf8(value.as_bytes())
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Agree,
    Disagree,
    /// The comparator could not judge (unparsable or missing content).
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Agree => "agree",
            Verdict::Disagree => "disagree",
            Verdict::Error => "error",
        }
    }
}

/// The comparators for a request path when the route names none: chat and completions get
/// status + text, embeddings status + vector, anything else status + exact.
pub fn default_comparators(path: &str) -> &'static [Comparator] {
    if path.contains("/embeddings") {
        &[Comparator::Status, Comparator::Vector]
    } else if path.contains("/completions") {
        &[Comparator::Status, Comparator::Text]
    } else {
        &[Comparator::Status, Comparator::Exact]
    }
}

/// Runs one comparator; returns its verdict and, on disagreement, a short human-readable note.
pub fn compare(
    comparator: Comparator,
    config: &CompareConfig,
    stable: &Answer,
    shadow: &Answer,
) -> (Verdict, String) {
    match comparator {
        Comparator::Status => {
            // A gRPC answer's status is its grpc-status; HTTP says 200 either way.
            let grpc = |a: &Answer| a.grpc_status.unwrap_or(0);
            let same = stable.status / 100 == shadow.status / 100 && grpc(stable) == grpc(shadow);
            verdict(same, || match (stable.grpc_status, shadow.grpc_status) {
                (None, None) => format!("status {} vs {}", stable.status, shadow.status),
                _ => format!(
                    "status {} grpc-status {} vs {} grpc-status {}",
                    stable.status,
                    grpc(stable),
                    shadow.status,
                    grpc(shadow)
                ),
            })
        }
        Comparator::Exact => verdict(stable.body == shadow.body, || {
            format!(
                "bodies differ ({} vs {} bytes)",
                stable.body.len(),
                shadow.body.len()
            )
        }),
        Comparator::Json => compare_json(config, stable, shadow),
        Comparator::Text => match (generated_text(stable), generated_text(shadow)) {
            (Some(a), Some(b)) => {
                let similarity = text_similarity(&a, &b);
                verdict(similarity >= config.text_threshold, || {
                    format!(
                        "text similarity {similarity:.2} < {}: {:?} vs {:?}",
                        config.text_threshold,
                        clip(&a),
                        clip(&b)
                    )
                })
            }
            _ => (Verdict::Error, "no generated text found".into()),
        },
        Comparator::Vector => match (embeddings(&stable.body), embeddings(&shadow.body)) {
            (Some(a), Some(b)) if a.len() == b.len() => {
                let worst = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| cosine(x, y))
                    .fold(f64::INFINITY, f64::min);
                verdict(worst >= config.vector_threshold, || {
                    format!("cosine similarity {worst:.4} < {}", config.vector_threshold)
                })
            }
            (Some(a), Some(b)) => (
                Verdict::Disagree,
                format!("{} vs {} embeddings", a.len(), b.len()),
            ),
            _ => (
                Verdict::Error,
                "no embeddings found at /data/N/embedding".into(),
            ),
        },
    }
}

fn verdict(agree: bool, note: impl FnOnce() -> String) -> (Verdict, String) {
    if agree {
        (Verdict::Agree, String::new())
    } else {
        (Verdict::Disagree, note())
    }
}

fn clip(text: &str) -> String {
    let mut out: String = text.chars().take(80).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

fn compare_json(config: &CompareConfig, stable: &Answer, shadow: &Answer) -> (Verdict, String) {
    let (Ok(a), Ok(b)) = (
        serde_json::from_slice::<Value>(&stable.body),
        serde_json::from_slice::<Value>(&shadow.body),
    ) else {
        return (Verdict::Error, "a body is not JSON".into());
    };
    for pointer in &config.json_pointers {
        let (x, y) = (a.pointer(pointer), b.pointer(pointer));
        let equal = match (x, y) {
            (Some(Value::Number(x)), Some(Value::Number(y))) => {
                let (x, y) = (
                    x.as_f64().unwrap_or(f64::NAN),
                    y.as_f64().unwrap_or(f64::NAN),
                );
                (x - y).abs() <= config.number_tolerance * x.abs().max(y.abs()).max(1.0)
            }
            (x, y) => x == y,
        };
        if !equal {
            return (
                Verdict::Disagree,
                format!("{pointer}: {} vs {}", show(x), show(y)),
            );
        }
    }
    (Verdict::Agree, String::new())
}

fn show(v: Option<&Value>) -> String {
    v.map_or_else(|| "missing".into(), |v| clip(&v.to_string()))
}

/// The text a chat or completion answer generated: reassembled from `data:` deltas for an event
/// stream, else `/choices/0/message/content` (or `/choices/0/text`).
pub fn generated_text(answer: &Answer) -> Option<String> {
    let text = std::str::from_utf8(&answer.body).ok()?;
    if answer.event_stream || text.trim_start().starts_with("data:") {
        let mut out = String::new();
        let mut any = false;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                continue;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let piece = chunk
                .pointer("/choices/0/delta/content")
                .or_else(|| chunk.pointer("/choices/0/text"))
                .and_then(Value::as_str);
            if let Some(piece) = piece {
                out.push_str(piece);
                any = true;
            }
        }
        return any.then_some(out);
    }
    let json: Value = serde_json::from_str(text).ok()?;
    json.pointer("/choices/0/message/content")
        .or_else(|| json.pointer("/choices/0/text"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Token-level similarity of two texts: lowercased alphanumeric tokens compared as multisets
/// (Dice coefficient: 2·|common| / (|a| + |b|)), 1.0 for two empty texts.
pub fn text_similarity(a: &str, b: &str) -> f64 {
    let tokens = |s: &str| -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for token in s
            .split(|c: char| !c.is_alphanumeric())
            .filter(|t| !t.is_empty())
        {
            *counts.entry(token.to_lowercase()).or_insert(0) += 1;
        }
        counts
    };
    let (ta, tb) = (tokens(a), tokens(b));
    let (na, nb): (usize, usize) = (ta.values().sum(), tb.values().sum());
    if na + nb == 0 {
        return 1.0;
    }
    let common: usize = ta
        .iter()
        .map(|(t, n)| (*n).min(*tb.get(t).unwrap_or(&0)))
        .sum();
    2.0 * common as f64 / (na + nb) as f64
}

fn embeddings(body: &[u8]) -> Option<Vec<Vec<f64>>> {
    let json: Value = serde_json::from_slice(body).ok()?;
    let data = json.get("data")?.as_array()?;
    let vectors: Option<Vec<Vec<f64>>> = data
        .iter()
        .map(|item| {
            item.get("embedding")?
                .as_array()?
                .iter()
                .map(Value::as_f64)
                .collect::<Option<Vec<f64>>>()
        })
        .collect();
    vectors.filter(|v| !v.is_empty())
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator == 0.0 {
        return if norm(a) == norm(b) { 1.0 } else { 0.0 };
    }
    dot / denominator
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            event_stream: body.starts_with("data:"),
            body: body.as_bytes().to_vec(),
            grpc_status: None,
        }
    }

    #[test]
    fn the_status_comparator_compares_grpc_statuses_behind_http_200() {
        let config = CompareConfig::default();
        let grpc = |code: Option<u32>| Answer {
            grpc_status: code,
            ..answer(200, "\0\0\0\0\0")
        };
        let (ok, _) = compare(Comparator::Status, &config, &grpc(Some(0)), &grpc(None));
        assert_eq!(ok, Verdict::Agree, "OK and no status are both success");
        let (failed, note) = compare(Comparator::Status, &config, &grpc(Some(0)), &grpc(Some(13)));
        assert_eq!(failed, Verdict::Disagree);
        assert_eq!(note, "status 200 grpc-status 0 vs 200 grpc-status 13");
    }

    fn chat(content: &str) -> String {
        serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).to_string()
    }

    fn stream(pieces: &[&str]) -> String {
        let mut out = String::new();
        for p in pieces {
            out.push_str(&format!(
                "data: {}\n\n",
                serde_json::json!({"choices": [{"delta": {"content": p}}]})
            ));
        }
        out.push_str("data: [DONE]\n\n");
        out
    }

    #[test]
    fn text_agrees_on_equal_answers_plain_and_streamed() {
        let config = CompareConfig::default();
        let same = compare(
            Comparator::Text,
            &config,
            &answer(200, &chat("The capital of France is Paris.")),
            &answer(200, &stream(&["The capital ", "of France ", "is Paris."])),
        );
        assert_eq!(same.0, Verdict::Agree);
        let different = compare(
            Comparator::Text,
            &config,
            &answer(200, &chat("The capital of France is Paris.")),
            &answer(200, &stream(&["Bananas ", "are yellow."])),
        );
        assert_eq!(different.0, Verdict::Disagree);
        assert!(different.1.contains("similarity"), "{}", different.1);
        let unreadable = compare(
            Comparator::Text,
            &config,
            &answer(200, "<html>"),
            &answer(200, &chat("x")),
        );
        assert_eq!(unreadable.0, Verdict::Error);
    }

    #[test]
    fn similarity_is_normalised_over_tokens() {
        assert_eq!(text_similarity("Hello, World!", "hello world"), 1.0);
        assert_eq!(text_similarity("", ""), 1.0);
        assert_eq!(text_similarity("a b c d", "a b c e"), 0.75);
        assert_eq!(text_similarity("a", ""), 0.0);
    }

    #[test]
    fn status_exact_json_and_vector() {
        let c = CompareConfig {
            json_pointers: vec!["/choices/0/finish_reason".into(), "/usage/score".into()],
            number_tolerance: 1e-3,
            ..CompareConfig::default()
        };
        assert_eq!(
            compare(Comparator::Status, &c, &answer(200, ""), &answer(201, "")).0,
            Verdict::Agree
        );
        assert_eq!(
            compare(Comparator::Status, &c, &answer(200, ""), &answer(500, "")).0,
            Verdict::Disagree
        );
        assert_eq!(
            compare(Comparator::Exact, &c, &answer(200, "x"), &answer(200, "x")).0,
            Verdict::Agree
        );
        assert_eq!(
            compare(Comparator::Exact, &c, &answer(200, "x"), &answer(200, "y")).0,
            Verdict::Disagree
        );
        let j = |reason: &str, score: f64| {
            serde_json::json!({"choices": [{"finish_reason": reason}], "usage": {"score": score}})
                .to_string()
        };
        assert_eq!(
            compare(
                Comparator::Json,
                &c,
                &answer(200, &j("stop", 1.0)),
                &answer(200, &j("stop", 1.0005))
            )
            .0,
            Verdict::Agree
        );
        assert_eq!(
            compare(
                Comparator::Json,
                &c,
                &answer(200, &j("stop", 1.0)),
                &answer(200, &j("stop", 1.1))
            )
            .0,
            Verdict::Disagree
        );
        assert_eq!(
            compare(
                Comparator::Json,
                &c,
                &answer(200, &j("stop", 1.0)),
                &answer(200, &j("length", 1.0))
            )
            .0,
            Verdict::Disagree
        );
        let e = |v: &[f64]| serde_json::json!({"data": [{"embedding": v}]}).to_string();
        assert_eq!(
            compare(
                Comparator::Vector,
                &c,
                &answer(200, &e(&[1.0, 0.0, 1.0])),
                &answer(200, &e(&[1.0, 0.001, 1.0]))
            )
            .0,
            Verdict::Agree
        );
        assert_eq!(
            compare(
                Comparator::Vector,
                &c,
                &answer(200, &e(&[1.0, 0.0])),
                &answer(200, &e(&[0.0, 1.0]))
            )
            .0,
            Verdict::Disagree
        );
        assert_eq!(
            compare(
                Comparator::Vector,
                &c,
                &answer(200, "{}"),
                &answer(200, &e(&[1.0]))
            )
            .0,
            Verdict::Error
        );
    }

    #[test]
    fn defaults_follow_the_path() {
        assert_eq!(
            default_comparators("/v1/chat/completions"),
            [Comparator::Status, Comparator::Text]
        );
        assert_eq!(
            default_comparators("/v1/embeddings"),
            [Comparator::Status, Comparator::Vector]
        );
        assert_eq!(
            default_comparators("/other"),
            [Comparator::Status, Comparator::Exact]
        );
    }
}
