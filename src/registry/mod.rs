//! The model registry: every servable version as a checksummed artifact with provenance, an
//! approval stage and approvals. weir serves explicit `model@version` pins only, and with a
//! registry only pins the registry allows for their role.
//!
//! Invariant: a version is served only while its stage allows its role (stable: approved or
//! production; candidate: candidate or approved); drafts and retired versions never are.

pub mod digest;
pub mod mlflow;
mod policy;
pub mod signature;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use digest::{diff_manifests, digest_artifact, ManifestEntry};
pub use policy::{
    check_promotion, check_servable, check_stage_change, check_stage_held, PinRefusal, RuleRefusal,
};

/// A version's place in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Draft,
    Candidate,
    Approved,
    Production,
    Deprecated,
    Retired,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Draft,
        Stage::Candidate,
        Stage::Approved,
        Stage::Production,
        Stage::Deprecated,
        Stage::Retired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Draft => "draft",
            Stage::Candidate => "candidate",
            Stage::Approved => "approved",
            Stage::Production => "production",
            Stage::Deprecated => "deprecated",
            Stage::Retired => "retired",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Stage, String> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.as_str() == s)
            .ok_or_else(|| {
                format!("expected one of draft, candidate, approved, production, deprecated, retired; got {s:?}")
            })
    }
}

/// The rules, with the defaults the issue sets; the `[policy]` table of the registry overrides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Roles whose unexpired approval `approved` and `production` need.
    pub approval_roles: Vec<String>,
    /// How long an approval lasts when `approve` is not told otherwise.
    pub approval_days: u32,
    /// Leaving draft needs a provenance reference.
    pub require_provenance: bool,
    /// Leaving draft needs an SBOM reference.
    pub require_sbom: bool,
    /// Stages (of `approved`, `production`) a version may enter, and serve in, only with a
    /// verified signature by one of `signing_keys`.
    pub signature_stages: Vec<Stage>,
    /// Fingerprints of the keys whose signatures count (SHA-256 of the PEM public key: the hint
    /// in model-signing's bundles; `weir registry verify` prints it).
    pub signing_keys: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            approval_roles: vec!["platform".into(), "product".into(), "security".into()],
            approval_days: 90,
            require_provenance: true,
            require_sbom: true,
            signature_stages: Vec::new(),
            signing_keys: Vec::new(),
        }
    }
}

/// A file that documents an artifact (provenance attestation, SBOM), pinned by its own hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub uri: String,
    pub sha256: String,
}

/// A data set a version was trained or evaluated on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Time window of the data, e.g. "2024-01-01..2024-05-31".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub by: String,
    pub role: String,
    /// RFC 3339.
    pub at: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// A rule waived for one version, with why and by whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exception {
    /// `provenance`, `sbom`, `signature` or `approval:<role>`.
    pub rule: String,
    pub reason: String,
    pub granted_by: String,
}

/// One registered model version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelVersion {
    pub model: String,
    pub version: String,
    /// SHA-256 hex of the artifact (file) or of its manifest (directory).
    pub digest: String,
    pub stage: Stage,
    /// What the model server reports about itself; default `model@version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_uses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prohibited_uses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Reference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<Reference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub training_data: Vec<Dataset>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval_data: Vec<Dataset>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exceptions: Vec<Exception>,
    /// Files of a directory artifact, so `verify` can name what differs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifest: Vec<ManifestEntry>,
    /// The last model signature `weir registry verify --signature` found valid for the artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureRecord>,
}

/// A verified OpenSSF model signature of a version's artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureRecord {
    /// Where the bundle was, and its SHA-256.
    pub bundle: Reference,
    /// The signing key's fingerprint: SHA-256 of its PEM form, as model-signing names keys.
    pub key: String,
    /// The statement's subject digest.
    pub subject_sha256: String,
    /// RFC 3339.
    pub verified_at: String,
}

impl ModelVersion {
    pub fn label(&self) -> String {
        format!("{}@{}", self.model, self.version)
    }

    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| self.label())
    }

    pub fn has_exception(&self, rule: &str) -> bool {
        self.exceptions.iter().any(|e| e.rule == rule)
    }
}

/// The registry file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub versions: Vec<ModelVersion>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read the registry {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the registry {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write the registry {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Registry {
    pub fn load(path: &Path) -> Result<Registry, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Registry::parse(&text).map_err(|message| RegistryError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Loads the registry, or an empty one when the file does not exist yet.
    pub fn load_or_new(path: &Path) -> Result<Registry, RegistryError> {
        if path.exists() {
            Registry::load(path)
        } else {
            Ok(Registry::default())
        }
    }

    pub fn parse(text: &str) -> Result<Registry, String> {
        let registry: Registry = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut seen = std::collections::HashSet::new();
        for v in &registry.versions {
            if !seen.insert(v.label()) {
                return Err(format!("{} is registered twice", v.label()));
            }
            if v.digest.len() != 64 || !v.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "{}: digest must be 64 hex digits (SHA-256), got {:?}",
                    v.label(),
                    v.digest
                ));
            }
            for a in &v.approvals {
                for (field, value) in [("at", &a.at), ("expires_at", &a.expires_at)] {
                    parse_time(value).map_err(|e| {
                        format!("{}: approval by {}: {field}: {e}", v.label(), a.by)
                    })?;
                }
            }
        }
        Ok(registry)
    }

    /// Writes the registry atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), RegistryError> {
        let write_error = |source| RegistryError::Write {
            path: path.to_path_buf(),
            source,
        };
        let text = format!(
            "# weir model registry: every servable model version, its digest, provenance, stage and approvals.\n\
             # Managed with `weir registry add|stage|approve`; keep it under source control.\n\n{}",
            toml::to_string_pretty(self).expect("the registry serializes")
        );
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).map_err(write_error)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(write_error)?;
        std::fs::rename(&tmp, path).map_err(write_error)?;
        Ok(())
    }

    pub fn find(&self, label: &str) -> Option<&ModelVersion> {
        self.versions.iter().find(|v| v.label() == label)
    }

    pub fn find_mut(&mut self, label: &str) -> Option<&mut ModelVersion> {
        self.versions.iter_mut().find(|v| v.label() == label)
    }
}

pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text).map_err(|e| {
        format!("expected an RFC 3339 time such as 2026-01-31T00:00:00Z, got {text:?} ({e})")
    })
}

pub fn format_time(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

pub fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_registry_parses_and_round_trips() {
        let registry = Registry::parse(include_str!("../../config/registry.toml")).unwrap();
        assert_eq!(registry.versions.len(), 3);
        assert_eq!(registry.versions[0].stage, Stage::Production);
        assert_eq!(
            registry.versions[0].training_data[0].window.as_deref(),
            Some("2023-01-01..2024-04-30")
        );
        let again = Registry::parse(&toml::to_string_pretty(&registry).unwrap()).unwrap();
        assert_eq!(again, registry);
    }

    #[test]
    fn bad_digests_and_duplicates_are_refused() {
        let text =
            "[[versions]]\nmodel = \"m\"\nversion = \"v\"\ndigest = \"abc\"\nstage = \"draft\"\n";
        assert!(Registry::parse(text).unwrap_err().contains("64 hex digits"));
    }
}
