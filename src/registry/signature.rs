//! OpenSSF model signatures (sigstore model-transparency, PyPI `model-signing`): a Sigstore
//! bundle whose DSSE envelope holds an in-toto statement listing every file of the model with its
//! SHA-256, signed with a key.
//!
//! Verified here: the DSSE signature over the statement with a trusted public key (ECDSA P-256 or
//! P-384, the key types `model_signing sign key` makes), the statement's shape, that its subject
//! digest is what its file list hashes to, that every file it lists is on disk with that digest
//! and no other file is, and that the subject digest is the registered artifact's. Keyless
//! (certificate and transparency log) bundles are refused as not supported yet.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::digest::{digest_artifact, ArtifactDigest, ManifestEntry};

const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// A trusted public key, from a PEM `PUBLIC KEY` file.
#[derive(Debug)]
pub struct PublicKey {
    path: PathBuf,
    algorithm: &'static ring::signature::EcdsaVerificationAlgorithm,
    /// The uncompressed point, as ring takes it.
    point: Vec<u8>,
    /// SHA-256 of the key's PEM form: what model-signing's bundles name their key by.
    pub fingerprint: String,
}

/// Why a signature does not hold; each names what differs.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("{path} is not a model-signing bundle: {message}")]
    Bundle { path: PathBuf, message: String },
    #[error(
        "{path} is a keyless (certificate) signature; weir verifies key signatures only so far \
         (model_signing sign key --private_key KEY)"
    )]
    Keyless { path: PathBuf },
    #[error("signed by another key: the bundle names key {bundle}, {key} is {fingerprint}")]
    OtherKey {
        bundle: String,
        key: PathBuf,
        fingerprint: String,
    },
    #[error(
        "the signature does not verify with {key}: the statement was changed after it was signed"
    )]
    BadSignature { key: PathBuf },
    #[error("the signed statement is not a model-signing statement: {0}")]
    Statement(String),
    #[error(
        "the statement's subject digest {subject} is not what its file list hashes to ({listed}): \
         the statement is inconsistent"
    )]
    Inconsistent { subject: String, listed: String },
    #[error("cannot hash the artifact {path}: {message}")]
    Artifact { path: PathBuf, message: String },
    #[error("the artifact differs from what was signed: {}", .0.join("; "))]
    Files(Vec<String>),
    #[error(
        "the signed model (subject digest {subject}) is not the registered artifact: {}",
        .differences.join("; ")
    )]
    NotRegistered {
        subject: String,
        differences: Vec<String>,
    },
}

/// What a verified signature says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The statement's subject digest (model-signing's digest of the model).
    pub subject: String,
    /// The key's fingerprint.
    pub key: String,
    /// SHA-256 of the bundle file.
    pub bundle_sha256: String,
    /// Files the statement lists.
    pub files: usize,
}

impl PublicKey {
    pub fn load(path: &Path) -> Result<PublicKey, SignatureError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignatureError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let key = |message: &str| SignatureError::Key {
            path: path.to_path_buf(),
            message: message.to_string(),
        };
        let body: String = text
            .lines()
            .skip_while(|l| l.trim() != "-----BEGIN PUBLIC KEY-----")
            .skip(1)
            .take_while(|l| l.trim() != "-----END PUBLIC KEY-----")
            .map(str::trim)
            .collect();
        if body.is_empty() {
            return Err(key(
                "expected a PEM public key (-----BEGIN PUBLIC KEY-----)",
            ));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(&body)
            .map_err(|_| key("the PEM body is not base64"))?;
        let (algorithm, point) = ec_point(&der).ok_or_else(|| {
            key("expected an ECDSA P-256 or P-384 public key (model_signing sign key makes those)")
        })?;
        Ok(PublicKey {
            path: path.to_path_buf(),
            algorithm,
            point,
            fingerprint: sha256_hex(pem(&der).as_bytes()),
        })
    }
}

/// The key's DER in PEM as Python's `cryptography` writes it (64-column lines).
fn pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    out
}

/// The curve's verification algorithm and the point of an EC SubjectPublicKeyInfo.
fn ec_point(
    der: &[u8],
) -> Option<(
    &'static ring::signature::EcdsaVerificationAlgorithm,
    Vec<u8>,
)> {
    // SubjectPublicKeyInfo ::= SEQUENCE { SEQUENCE { id-ecPublicKey, namedCurve }, BIT STRING }
    let (spki, _) = der_element(der, 0x30)?;
    let (algorithm, rest) = der_element(spki, 0x30)?;
    let (bits, _) = der_element(rest, 0x03)?;
    let (kind, params) = der_element(algorithm, 0x06)?;
    let (curve, _) = der_element(params, 0x06)?;
    const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    if kind != EC_PUBLIC_KEY {
        return None;
    }
    let algorithm = match curve {
        P256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
        P384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
        _ => return None,
    };
    // A BIT STRING starts with its count of unused bits: none, for a key.
    let (&0, point) = bits.split_first()? else {
        return None;
    };
    // Uncompressed (0x04, x, y): the form keys are written in, and the one ring verifies with.
    if point.first() != Some(&0x04) {
        return None;
    }
    Some((algorithm, point.to_vec()))
}

/// The contents of the DER element with `tag` at the start of `der`, and what follows it.
fn der_element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = der.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, mut rest) = rest.split_first()?;
    let len = if len < 0x80 {
        usize::from(len)
    } else {
        let n = usize::from(len & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, b| (l << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    verification_material: Material,
    dsse_envelope: Option<Envelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Material {
    public_key: Option<KeyHint>,
}

#[derive(Deserialize)]
struct KeyHint {
    #[serde(default)]
    hint: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(Deserialize)]
struct Statement {
    #[serde(rename = "_type")]
    kind: String,
    subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    predicate: Predicate,
}

#[derive(Deserialize)]
struct Subject {
    digest: SubjectDigest,
}

#[derive(Deserialize)]
struct SubjectDigest {
    sha256: String,
}

#[derive(Deserialize)]
struct Predicate {
    serialization: Serialization,
    resources: Vec<Resource>,
}

#[derive(Deserialize)]
struct Serialization {
    method: String,
    #[serde(default)]
    ignore_paths: Vec<String>,
    #[serde(default)]
    allow_symlinks: bool,
}

#[derive(Deserialize)]
struct Resource {
    name: String,
    algorithm: String,
    digest: String,
}

/// DSSE's pre-authentication encoding of a payload (what is signed).
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Verifies the bundle at `bundle_path` for the artifact at `artifact` with `key`, and that the
/// signed model is the registered one (`registered`: its digest and, for a directory, its
/// manifest).
pub fn verify(
    bundle_path: &Path,
    key: &PublicKey,
    artifact: &Path,
    registered_digest: &str,
    registered_manifest: &[ManifestEntry],
) -> Result<Verified, SignatureError> {
    let bytes = std::fs::read(bundle_path).map_err(|source| SignatureError::Read {
        path: bundle_path.to_path_buf(),
        source,
    })?;
    let bad = |message: String| SignatureError::Bundle {
        path: bundle_path.to_path_buf(),
        message,
    };
    let bundle: Bundle = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if !bundle
        .media_type
        .starts_with("application/vnd.dev.sigstore.bundle")
    {
        return Err(bad(format!("media type {:?}", bundle.media_type)));
    }
    let Some(hint) = bundle.verification_material.public_key else {
        return Err(SignatureError::Keyless {
            path: bundle_path.to_path_buf(),
        });
    };
    let envelope = bundle
        .dsse_envelope
        .ok_or_else(|| bad("no DSSE envelope".into()))?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(bad(format!("payload type {:?}", envelope.payload_type)));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = b64
        .decode(&envelope.payload)
        .map_err(|_| bad("the payload is not base64".into()))?;
    let [signature] = envelope.signatures.as_slice() else {
        return Err(bad(format!(
            "expected one signature, found {}",
            envelope.signatures.len()
        )));
    };
    let sig = b64
        .decode(&signature.sig)
        .map_err(|_| bad("the signature is not base64".into()))?;
    let verifier = ring::signature::UnparsedPublicKey::new(key.algorithm, &key.point);
    if verifier
        .verify(&pae(&envelope.payload_type, &payload), &sig)
        .is_err()
    {
        if !hint.hint.is_empty() && hint.hint != key.fingerprint {
            return Err(SignatureError::OtherKey {
                bundle: hint.hint,
                key: key.path.clone(),
                fingerprint: key.fingerprint.clone(),
            });
        }
        return Err(SignatureError::BadSignature {
            key: key.path.clone(),
        });
    }

    // Signed: now what it says.
    let statement: Statement =
        serde_json::from_slice(&payload).map_err(|e| SignatureError::Statement(e.to_string()))?;
    let wrong = |what: String| Err(SignatureError::Statement(what));
    if statement.kind != STATEMENT_TYPE {
        return wrong(format!("_type {:?}", statement.kind));
    }
    if statement.predicate_type != PREDICATE_TYPE {
        return wrong(format!("predicateType {:?}", statement.predicate_type));
    }
    let [subject] = statement.subject.as_slice() else {
        return wrong(format!(
            "expected one subject, found {}",
            statement.subject.len()
        ));
    };
    let predicate = &statement.predicate;
    if predicate.serialization.method != "files" {
        return wrong(format!(
            "serialization {:?}: weir verifies per-file (\"files\") signatures",
            predicate.serialization.method
        ));
    }
    let mut names = BTreeSet::new();
    if let Some(twice) = predicate
        .resources
        .iter()
        .find(|r| !names.insert(r.name.as_str()))
    {
        return wrong(format!("{} is listed twice", twice.name));
    }
    let mut listed = Sha256::new();
    for resource in &predicate.resources {
        if resource.algorithm != "sha256" {
            return wrong(format!(
                "{} is hashed with {}; weir checks sha256",
                resource.name, resource.algorithm
            ));
        }
        let digest = hex_bytes(&resource.digest).ok_or_else(|| {
            SignatureError::Statement(format!("{}: digest is not hex", resource.name))
        })?;
        listed.update(digest);
    }
    let listed = hex(&listed.finalize());
    if listed != subject.digest.sha256 {
        return Err(SignatureError::Inconsistent {
            subject: subject.digest.sha256.clone(),
            listed,
        });
    }

    // The artifact on disk, file by file.
    let on_disk =
        digest_artifact(artifact, predicate.serialization.allow_symlinks).map_err(|e| {
            SignatureError::Artifact {
                path: artifact.to_path_buf(),
                message: e.to_string(),
            }
        })?;
    let differences = compare_files(
        &predicate.resources,
        &on_disk,
        &predicate.serialization.ignore_paths,
        bundle_path.strip_prefix(artifact).ok(),
    );
    if !differences.is_empty() {
        return Err(SignatureError::Files(differences));
    }

    // The registered artifact: the same files, by name and digest, as the signer listed (all of
    // the registered ones but those it left out). A set, so neither order nor a renamed file
    // with the same content can make two different models look alike.
    let ignore = &predicate.serialization.ignore_paths;
    let inside = bundle_path.strip_prefix(artifact).ok();
    let registered: BTreeSet<(String, String)> = match registered_manifest {
        [] => [(".".to_string(), registered_digest.to_ascii_lowercase())].into(),
        files => files
            .iter()
            .filter(|e| !ignored(&e.path, ignore, inside))
            .map(|e| (e.path.clone(), e.sha256.to_ascii_lowercase()))
            .collect(),
    };
    let signed: BTreeSet<(String, String)> = predicate
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.digest.to_ascii_lowercase()))
        .collect();
    if registered != signed {
        let mut differences: Vec<String> = registered
            .difference(&signed)
            .map(|(name, _)| format!("registered, not signed as registered: {name}"))
            .collect();
        differences.extend(
            signed
                .difference(&registered)
                .map(|(name, _)| format!("signed, not registered so: {name}")),
        );
        return Err(SignatureError::NotRegistered {
            subject: subject.digest.sha256.clone(),
            differences,
        });
    }
    Ok(Verified {
        subject: subject.digest.sha256.clone(),
        key: key.fingerprint.clone(),
        bundle_sha256: sha256_hex(&bytes),
        files: predicate.resources.len(),
    })
}

/// How the files on disk differ from those signed, one line per file.
fn compare_files(
    signed: &[Resource],
    on_disk: &ArtifactDigest,
    ignore: &[String],
    bundle_inside: Option<&Path>,
) -> Vec<String> {
    // A single file is signed as ".".
    let disk: Vec<(String, String)> = if on_disk.manifest.is_empty() {
        vec![(".".to_string(), on_disk.digest.clone())]
    } else {
        on_disk
            .manifest
            .iter()
            .map(|e| (e.path.clone(), e.sha256.clone()))
            .collect()
    };
    let ignored = |name: &str| ignored(name, ignore, bundle_inside);
    let mut differences = Vec::new();
    for resource in signed {
        match disk.iter().find(|(path, _)| *path == resource.name) {
            None => differences.push(format!("missing: {}", resource.name)),
            Some((_, digest)) if !digest.eq_ignore_ascii_case(&resource.digest) => differences
                .push(format!(
                    "differs: {} (signed sha256 {}, on disk {digest})",
                    resource.name, resource.digest
                )),
            Some(_) => {}
        }
    }
    for (path, _) in &disk {
        if !ignored(path) && !signed.iter().any(|r| r.name == *path) {
            differences.push(format!("extra: {path} (not in the signature)"));
        }
    }
    differences
}

/// Whether the signer left `name` out: under one of the statement's `ignore_paths` (relative to
/// the model's root, as model-signing applies them), or the bundle itself.
fn ignored(name: &str, ignore: &[String], bundle_inside: Option<&Path>) -> bool {
    bundle_inside.is_some_and(|b| Path::new(name) == b)
        || ignore.iter().any(|i| Path::new(name).starts_with(i))
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(
            pae("application/vnd.in-toto+json", b"{}"),
            b"DSSEv1 28 application/vnd.in-toto+json 2 {}"
        );
    }

    #[test]
    fn der_lengths_short_and_long_are_read() {
        assert_eq!(
            der_element(&[0x30, 2, 1, 2, 9], 0x30),
            Some((&[1u8, 2][..], &[9u8][..]))
        );
        let long = [&[0x04, 0x81, 0x80][..], &[7u8; 0x80]].concat();
        assert_eq!(der_element(&long, 0x04).unwrap().0.len(), 0x80);
        assert_eq!(der_element(&[0x30, 5, 1], 0x30), None, "cut short");
        assert_eq!(der_element(&[0x31, 0], 0x30), None, "another tag");
    }
}
