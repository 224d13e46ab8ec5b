//! The MLflow Model Registry as a registry source: its REST API (aliases, versions, tags), and
//! the `weir.*` version tags that carry what MLflow itself does not hold — the artifact's
//! SHA-256, the approval stage, approvals, provenance, SBOM, signature and backends.
//!
//! Invariant: a version is a registry entry only when its tags say everything the policy needs;
//! one without a digest tag, or with a tag that does not parse, is refused with the tag's name,
//! never served on defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Approval, Exception, ModelVersion, Reference, SignatureRecord, Stage};
use crate::config::{BackendTls, MlflowConfig};

/// The tags weir reads and writes on an MLflow model version.
pub mod tag {
    /// SHA-256 hex of the artifact (file) or of its manifest (directory), as `weir registry add`.
    pub const SHA256: &str = "weir.sha256";
    /// draft, candidate, approved, production, deprecated or retired.
    pub const STAGE: &str = "weir.stage";
    /// JSON list of `{"by", "role", "at", "expires_at"}`.
    pub const APPROVALS: &str = "weir.approvals";
    /// JSON `{"uri", "sha256"}`.
    pub const PROVENANCE: &str = "weir.provenance";
    /// JSON `{"uri", "sha256"}`.
    pub const SBOM: &str = "weir.sbom";
    /// JSON of a verified model signature (`weir registry verify --signature`).
    pub const SIGNATURE: &str = "weir.signature";
    /// JSON list of `{"rule", "reason", "granted_by"}`.
    pub const EXCEPTIONS: &str = "weir.exceptions";
    /// The artifact weir digested (a local path or `file://` URI), re-checked when weir pins it.
    pub const ARTIFACT: &str = "weir.artifact";
    /// Comma-separated origins of the servers of this version, when weir's config has none.
    pub const BACKENDS: &str = "weir.backends";
    /// http1, http2 or auto, for backends from `weir.backends`.
    pub const PROTOCOL: &str = "weir.protocol";
    /// What the model server reports about itself, when not `model@version`.
    pub const IDENTITY: &str = "weir.identity";
    /// The name its servers know the model by, for versions from `weir.backends` on routes by
    /// model (a `[[versions]]` entry's `served_model` otherwise).
    pub const SERVED_MODEL: &str = "weir.served_model";
}

/// A model version as MLflow's REST API returns it (the fields weir uses).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MlflowVersion {
    pub name: String,
    pub version: String,
    pub source: String,
    /// Who created the version, as MLflow records it (empty when MLflow runs without auth).
    pub user_id: String,
    pub run_id: String,
    pub tags: BTreeMap<String, String>,
    pub aliases: Vec<String>,
}

impl MlflowVersion {
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    fn from_json(value: &Value) -> Result<MlflowVersion, MlflowError> {
        #[derive(Deserialize)]
        struct Tag {
            key: String,
            #[serde(default)]
            value: String,
        }
        #[derive(Deserialize)]
        struct Raw {
            name: String,
            version: String,
            #[serde(default)]
            source: String,
            #[serde(default)]
            user_id: String,
            #[serde(default)]
            run_id: String,
            #[serde(default)]
            tags: Vec<Tag>,
            #[serde(default)]
            aliases: Vec<String>,
        }
        let raw: Raw = serde_json::from_value(value.clone()).map_err(|e| MlflowError::Invalid {
            detail: format!("a model version that does not parse: {e}"),
        })?;
        Ok(MlflowVersion {
            name: raw.name,
            version: raw.version,
            source: raw.source,
            user_id: raw.user_id,
            run_id: raw.run_id,
            tags: raw.tags.into_iter().map(|t| (t.key, t.value)).collect(),
            aliases: raw.aliases,
        })
    }

    /// The artifact weir can re-check: the `weir.artifact` tag, or MLflow's `source` when it is
    /// a local path. `None` for remote sources (`s3://`, `models:/`, `runs:/`...).
    pub fn local_artifact(&self) -> Option<PathBuf> {
        let uri = self.tags.get(tag::ARTIFACT).unwrap_or(&self.source);
        if let Some(path) = uri.strip_prefix("file://") {
            return Some(PathBuf::from(path));
        }
        uri.starts_with('/').then(|| PathBuf::from(uri))
    }

    /// The registry entry its tags describe; the error names the tag that is missing or wrong
    /// (the policy rule it fails, and why).
    pub fn entry(&self) -> Result<ModelVersion, (&'static str, String)> {
        let digest = self.tags.get(tag::SHA256).ok_or((
            "digest",
            format!(
                "it has no {} tag, so weir cannot tell which artifact it is; record it with `weir registry add --mlflow URL --model {} --version {} --artifact PATH`",
                tag::SHA256, self.name, self.version
            ),
        ))?;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err((
                "digest",
                format!("its {} tag is not 64 hex digits: {digest:?}", tag::SHA256),
            ));
        }
        let stage = match self.tags.get(tag::STAGE) {
            None => Stage::Draft,
            Some(text) => text
                .parse::<Stage>()
                .map_err(|e| ("tags", format!("its {} tag: {e}", tag::STAGE)))?,
        };
        fn json_tag<T: serde::de::DeserializeOwned>(
            v: &MlflowVersion,
            key: &'static str,
        ) -> Result<Option<T>, (&'static str, String)> {
            v.tags
                .get(key)
                .map(|text| {
                    serde_json::from_str(text)
                        .map_err(|e| ("tags", format!("its {key} tag is not valid: {e}")))
                })
                .transpose()
        }
        let approvals: Vec<Approval> = json_tag(self, tag::APPROVALS)?.unwrap_or_default();
        for a in &approvals {
            for value in [&a.at, &a.expires_at] {
                super::parse_time(value)
                    .map_err(|e| ("tags", format!("its {} tag: {e}", tag::APPROVALS)))?;
            }
        }
        let exceptions: Vec<Exception> = json_tag(self, tag::EXCEPTIONS)?.unwrap_or_default();
        Ok(ModelVersion {
            model: self.name.clone(),
            version: self.version.clone(),
            digest: digest.to_ascii_lowercase(),
            stage,
            identity: self.tags.get(tag::IDENTITY).cloned(),
            artifact_uri: Some(self.tags.get(tag::ARTIFACT).unwrap_or(&self.source).clone())
                .filter(|s| !s.is_empty()),
            base_model: None,
            fine_tune_method: None,
            license: None,
            allowed_uses: Vec::new(),
            prohibited_uses: Vec::new(),
            risk: None,
            owner: Some(self.user_id.clone()).filter(|u| !u.is_empty()),
            backup_owner: None,
            provenance: json_tag::<Reference>(self, tag::PROVENANCE)?,
            sbom: json_tag::<Reference>(self, tag::SBOM)?,
            training_data: Vec::new(),
            eval_data: Vec::new(),
            approvals,
            exceptions,
            manifest: Vec::new(),
            signature: json_tag::<SignatureRecord>(self, tag::SIGNATURE)?,
        })
    }
}

/// The `weir.*` tags that describe `entry` (what `weir registry ... --mlflow` writes back).
pub fn tags_of(entry: &ModelVersion) -> Vec<(&'static str, String)> {
    fn json<T: serde::Serialize>(value: &T) -> String {
        serde_json::to_string(value).expect("registry values serialize")
    }
    let mut tags = vec![
        (tag::SHA256, entry.digest.clone()),
        (tag::STAGE, entry.stage.as_str().to_string()),
        (tag::APPROVALS, json(&entry.approvals)),
    ];
    if let Some(p) = &entry.provenance {
        tags.push((tag::PROVENANCE, json(p)));
    }
    if let Some(s) = &entry.sbom {
        tags.push((tag::SBOM, json(s)));
    }
    if let Some(s) = &entry.signature {
        tags.push((tag::SIGNATURE, json(s)));
    }
    if !entry.exceptions.is_empty() {
        tags.push((tag::EXCEPTIONS, json(&entry.exceptions)));
    }
    if let Some(uri) = &entry.artifact_uri {
        tags.push((tag::ARTIFACT, uri.clone()));
    }
    tags
}

#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    #[error("MLflow at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("MLflow refused {endpoint}: {status} {code}: {message}")]
    Refused {
        endpoint: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("MLflow answered something weir cannot read: {detail}")]
    Invalid { detail: String },
    #[error("MLflow client settings: {0}")]
    Settings(String),
}

impl MlflowError {
    /// MLflow could not be asked (or did not answer in time): traffic stays on the last pins.
    pub fn is_outage(&self) -> bool {
        match self {
            MlflowError::Unreachable { .. } => true,
            MlflowError::Refused { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A client of one MLflow tracking server's REST API.
#[derive(Clone, Debug)]
pub struct MlflowClient {
    base: String,
    auth: Option<HeaderValue>,
    timeout: Duration,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl MlflowClient {
    pub fn new(config: &MlflowConfig) -> Result<MlflowClient, MlflowError> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| MlflowError::Settings(format!("{what} {}: {e}", path.display())))
        };
        let auth = match (&config.token_file, &config.user) {
            (Some(file), _) => Some(format!("Bearer {}", read(file, "token file")?)),
            (None, Some((user, file))) => {
                use base64::Engine;
                let password = read(file, "password file")?;
                let pair =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                Some(format!("Basic {pair}"))
            }
            (None, None) => None,
        }
        .map(|value| {
            let mut value = HeaderValue::try_from(value).map_err(|_| {
                MlflowError::Settings(
                    "the MLflow credentials hold characters a header cannot carry".into(),
                )
            })?;
            value.set_sensitive(true);
            Ok::<_, MlflowError>(value)
        })
        .transpose()?;
        let tls = crate::tls::backend_client_config(&BackendTls {
            ca: config.ca.clone(),
            client_cert: None,
            client_key: None,
        })
        .map_err(|e| MlflowError::Settings(e.to_string()))?;
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(config.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Ok(MlflowClient {
            base: config.url.trim_end_matches('/').to_string(),
            auth,
            timeout: config.timeout,
            http: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// One REST call: GET with a query, others with a JSON body (as MLflow's own client).
    async fn call(
        &self,
        method: Method,
        endpoint: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value, MlflowError> {
        let mut uri = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        if !query.is_empty() {
            let encoded: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query)
                .finish();
            uri = format!("{uri}?{encoded}");
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request = Request::builder()
            .method(method)
            .uri(&uri)
            .header(CONTENT_TYPE, "application/json");
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| MlflowError::Settings(format!("{uri}: {e}")))?;
        let unreachable = |detail: String| MlflowError::Unreachable {
            url: self.base.clone(),
            detail,
        };
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| unreachable(crate::error_chain(&e)))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, MlflowError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))??;
        let value: Value = if bytes.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(&bytes).map_err(|_| {
                if status.is_success() {
                    MlflowError::Invalid {
                        detail: format!(
                            "{endpoint} answered {status} with a body that is not JSON"
                        ),
                    }
                } else {
                    MlflowError::Refused {
                        endpoint: endpoint.to_string(),
                        status: status.as_u16(),
                        code: String::new(),
                        message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                            .into_owned(),
                    }
                }
            })?
        };
        if status.is_success() {
            return Ok(value);
        }
        Err(MlflowError::Refused {
            endpoint: endpoint.to_string(),
            status: status.as_u16(),
            code: value["error_code"].as_str().unwrap_or_default().to_string(),
            message: value["message"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// The version `alias` of `model` names; `None` when the alias (or the model) is not set.
    pub async fn alias(
        &self,
        model: &str,
        alias: &str,
    ) -> Result<Option<MlflowVersion>, MlflowError> {
        let answer = self
            .call(
                Method::GET,
                "registered-models/alias",
                &[("name", model), ("alias", alias)],
                None,
            )
            .await;
        match answer {
            Ok(value) => MlflowVersion::from_json(&value["model_version"]).map(Some),
            // An unset alias is a 400 ("Registered model alias X not found."), an unknown
            // model a 404.
            Err(MlflowError::Refused {
                status, message, ..
            }) if status == StatusCode::NOT_FOUND.as_u16()
                || (status == StatusCode::BAD_REQUEST.as_u16()
                    && message.contains("not found")) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn version(&self, model: &str, version: &str) -> Result<MlflowVersion, MlflowError> {
        let value = self
            .call(
                Method::GET,
                "model-versions/get",
                &[("name", model), ("version", version)],
                None,
            )
            .await?;
        MlflowVersion::from_json(&value["model_version"])
    }

    pub async fn set_alias(
        &self,
        model: &str,
        alias: &str,
        version: &str,
    ) -> Result<(), MlflowError> {
        self.call(
            Method::POST,
            "registered-models/alias",
            &[],
            Some(json!({"name": model, "alias": alias, "version": version})),
        )
        .await
        .map(drop)
    }

    /// Removes `alias`; an alias already gone is not an error.
    pub async fn delete_alias(&self, model: &str, alias: &str) -> Result<(), MlflowError> {
        let answer = self
            .call(
                Method::DELETE,
                "registered-models/alias",
                &[],
                Some(json!({"name": model, "alias": alias})),
            )
            .await;
        match answer {
            Err(MlflowError::Refused { code, .. }) if code == "RESOURCE_DOES_NOT_EXIST" => Ok(()),
            other => other.map(drop),
        }
    }

    pub async fn set_tag(
        &self,
        model: &str,
        version: &str,
        key: &str,
        value: &str,
    ) -> Result<(), MlflowError> {
        self.call(
            Method::POST,
            "model-versions/set-tag",
            &[],
            Some(json!({"name": model, "version": version, "key": key, "value": value})),
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(tags: &[(&str, &str)]) -> MlflowVersion {
        MlflowVersion {
            name: "chat".into(),
            version: "3".into(),
            source: "/models/chat-3".into(),
            user_id: "alice".into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_version_without_a_digest_tag_is_refused_naming_the_tag() {
        let (rule, message) = version(&[("weir.stage", "approved")]).entry().unwrap_err();
        assert_eq!(rule, "digest");
        assert!(message.contains("weir.sha256"), "{message}");
        let (_, message) = version(&[("weir.sha256", "abc")]).entry().unwrap_err();
        assert!(message.contains("64 hex digits"), "{message}");
    }

    #[test]
    fn tags_round_trip_through_the_entry() {
        let digest = "a".repeat(64);
        let approvals = r#"[{"by":"bo","role":"security","at":"2026-01-01T00:00:00Z","expires_at":"2027-01-01T00:00:00Z"}]"#;
        let v = version(&[
            ("weir.sha256", &digest),
            ("weir.stage", "approved"),
            ("weir.approvals", approvals),
            ("weir.provenance", r#"{"uri":"p.json","sha256":"00"}"#),
        ]);
        let entry = v.entry().unwrap();
        assert_eq!(entry.stage, Stage::Approved);
        assert_eq!(entry.approvals[0].role, "security");
        assert_eq!(entry.owner.as_deref(), Some("alice"));
        assert_eq!(v.local_artifact(), Some(PathBuf::from("/models/chat-3")));
        let again = version(
            &tags_of(&entry)
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
        );
        assert_eq!(again.entry().unwrap(), entry);
        let (rule, message) = version(&[("weir.sha256", &digest), ("weir.stage", "live")])
            .entry()
            .unwrap_err();
        assert_eq!(rule, "tags");
        assert!(message.contains("weir.stage"), "{message}");
    }
}
