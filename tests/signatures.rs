//! OpenSSF model signatures (issue 20, item 5): bundles made by the real `model_signing` tool
//! (PyPI `model-signing`, installed by `.ci/run` into `target/ci-venv`) are verified by
//! `weir registry verify --signature`; each kind of tampering fails naming what differs, and a
//! policy that asks for a signature refuses an unsigned version as production.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The `model_signing` CLI: `WEIR_MODEL_SIGNING`, or the one `.ci/run` installs.
fn model_signing() -> PathBuf {
    let tool = std::env::var_os("WEIR_MODEL_SIGNING").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/model_signing"),
        PathBuf::from,
    );
    assert!(
        tool.exists(),
        "{} is missing: run .ci/run once (it installs model-signing into target/ci-venv), or set WEIR_MODEL_SIGNING",
        tool.display()
    );
    tool
}

/// A fresh ECDSA P-256 key pair in `dir` (private, public PEM), made by the tool's own Python.
fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let python = model_signing().with_file_name("python");
    let (private, public) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.pub")),
    );
    let script = "import sys
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization as s
k = ec.generate_private_key(ec.SECP256R1())
open(sys.argv[1], 'wb').write(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
open(sys.argv[2], 'wb').write(k.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))";
    let out = Command::new(python)
        .args(["-c", script])
        .arg(&private)
        .arg(&public)
        .output()
        .expect("the venv's python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (private, public)
}

/// Signs `model` with `key` into `bundle` with `model_signing sign key`.
fn sign(model: &Path, key: &Path, bundle: &Path) {
    let out = Command::new(model_signing())
        .args(["sign", "key"])
        .arg(model)
        .arg("--private_key")
        .arg(key)
        .arg("--signature")
        .arg(bundle)
        .output()
        .expect("model_signing runs");
    assert!(
        out.status.success(),
        "model_signing sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn weir(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .current_dir(dir)
        .args(["registry", "--registry", "registry.toml"])
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("weir runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A directory model of two files, registered as chat@v1, signed with a fresh key.
struct Signed {
    dir: TempDir,
}

impl Signed {
    fn new(tag: &str) -> Signed {
        let dir = temp_dir(tag);
        let model = dir.path().join("model");
        std::fs::create_dir_all(model.join("tokenizer")).unwrap();
        std::fs::write(model.join("weights.bin"), b"the weights").unwrap();
        std::fs::write(model.join("tokenizer/vocab.json"), b"{\"a\": 1}").unwrap();
        // As in a model fetched from a git hub: registered, but not signed (model-signing
        // leaves git files out by default).
        std::fs::write(model.join(".gitattributes"), b"*.bin filter=lfs").unwrap();
        // Sorts before tokenizer/ by bytes, after it by path components (model-signing's way).
        std::fs::write(model.join("tokenizer.json"), b"{}").unwrap();
        let (code, text) = weir(
            dir.path(),
            &[
                "add",
                "--model",
                "chat",
                "--version",
                "v1",
                "--artifact",
                "model",
            ],
        );
        assert_eq!(code, 0, "{text}");
        let (private, _) = key_pair(dir.path(), "release");
        sign(&model, &private, &dir.path().join("model.sig"));
        Signed { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Signs the model as it is now with the key pair `name` (`release`, or one `key_pair` made).
    fn resign(&self, name: &str) {
        let key = self.path(&format!("{name}.pem"));
        sign(&self.path("model"), &key, &self.path("model.sig"));
    }

    fn verify(&self, key: &str) -> (i32, String) {
        weir(
            self.dir.path(),
            &[
                "verify",
                "--model",
                "chat",
                "--version",
                "v1",
                "--artifact",
                "model",
                "--signature",
                "model.sig",
                "--public-key",
                key,
            ],
        )
    }
}

#[test]
fn a_valid_bundle_is_verified_and_recorded() {
    let signed = Signed::new("sig-valid");
    let (code, text) = signed.verify("release.pub");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("signature valid: 3 signed files"), "{text}");
    let registry = std::fs::read_to_string(signed.path("registry.toml")).unwrap();
    assert!(registry.contains("[versions.signature]"), "{registry}");
    let fingerprint = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("signature model.sig by key "))
        .expect("the key's fingerprint is printed")
        .to_string();
    assert!(
        registry.contains(&format!("key = \"{fingerprint}\"")),
        "{registry}"
    );
    // The fingerprint is the one model_signing names the key by in the bundle.
    let bundle = std::fs::read_to_string(signed.path("model.sig")).unwrap();
    assert!(bundle.contains(&fingerprint), "{bundle}");
}

#[test]
fn each_kind_of_tampering_fails_naming_what_differs() {
    // A file changed, removed or added after signing.
    type Tamper = fn(&Path);
    let cases: [(&str, Tamper, &str); 3] = [
        (
            "changed",
            |m| std::fs::write(m.join("weights.bin"), b"poisoned").unwrap(),
            "differs: weights.bin",
        ),
        (
            "missing",
            |m| std::fs::remove_file(m.join("tokenizer/vocab.json")).unwrap(),
            "missing: tokenizer/vocab.json",
        ),
        (
            "extra",
            |m| std::fs::write(m.join("backdoor.py"), b"import os").unwrap(),
            "extra: backdoor.py",
        ),
    ];
    for (what, tamper, named) in cases {
        let signed = Signed::new(&format!("sig-{what}"));
        tamper(&signed.path("model"));
        let (code, text) = signed.verify("release.pub");
        assert_eq!(code, 1, "{what}: {text}");
        let invalid = text
            .lines()
            .find(|l| l.contains("SIGNATURE INVALID"))
            .unwrap_or_else(|| panic!("{what}: no signature verdict in {text}"));
        assert!(invalid.contains(named), "{what}: {invalid}");
    }

    // Another key.
    let signed = Signed::new("sig-other-key");
    key_pair(signed.dir.path(), "other");
    let (code, text) = signed.verify("other.pub");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("signed by another key"), "{text}");

    // The statement edited after signing (a file's digest replaced by the poisoned file's).
    let signed = Signed::new("sig-statement");
    let bundle_path = signed.path("model.sig");
    let mut bundle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bundle_path).unwrap()).unwrap();
    let payload = bundle["dsseEnvelope"]["payload"]
        .as_str()
        .unwrap()
        .to_string();
    let statement = decode_base64(&payload);
    let weights = sha256_hex(b"the weights");
    let edited = String::from_utf8(statement)
        .unwrap()
        .replace(&weights, &sha256_hex(b"poisoned"));
    bundle["dsseEnvelope"]["payload"] = encode_base64(edited.as_bytes()).into();
    std::fs::write(&bundle_path, bundle.to_string()).unwrap();
    std::fs::write(signed.path("model/weights.bin"), b"poisoned").unwrap();
    let (code, text) = signed.verify("release.pub");
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("the statement was changed after it was signed"),
        "{text}"
    );
}

#[test]
fn a_signed_model_that_is_not_the_registered_one_is_refused() {
    // Signed after a change: files and signature agree, the registry does not.
    let signed = Signed::new("sig-unregistered");
    std::fs::write(signed.path("model/weights.bin"), b"retrained").unwrap();
    signed.resign("release");
    let (code, text) = signed.verify("release.pub");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("is not the registered artifact"), "{text}");
}

/// A signed copy of other files with the same contents (one renamed, as an unused file turned
/// into loaded code) is valid for itself, but no signature of the registered artifact: it is
/// neither accepted nor recorded.
#[test]
fn a_signature_of_renamed_files_is_not_recorded_for_the_registered_artifact() {
    let signed = Signed::new("sig-renamed");
    let copy = signed.path("copy");
    std::fs::create_dir_all(copy.join("tokenizer")).unwrap();
    std::fs::write(copy.join("custom_model.py"), b"the weights").unwrap();
    std::fs::write(copy.join("tokenizer/vocab.json"), b"{\"a\": 1}").unwrap();
    std::fs::write(copy.join("tokenizer.json"), b"{}").unwrap();
    sign(
        &copy,
        &signed.path("release.pem"),
        &signed.path("model.sig"),
    );
    let (code, text) = weir(
        signed.dir.path(),
        &[
            "verify",
            "--model",
            "chat",
            "--version",
            "v1",
            "--artifact",
            "copy",
            "--signature",
            "model.sig",
            "--public-key",
            "release.pub",
        ],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("not recorded") || text.contains("not the registered artifact"),
        "{text}"
    );
    let registry = std::fs::read_to_string(signed.path("registry.toml")).unwrap();
    assert!(!registry.contains("[versions.signature]"), "{registry}");
}

#[test]
fn a_policy_asking_for_a_signature_refuses_an_unsigned_version_as_production() {
    let signed = Signed::new("sig-policy");
    let (_, text) = signed.verify("release.pub");
    let fingerprint = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("signature model.sig by key "))
        .unwrap()
        .to_string();
    // Forget the recorded signature, and ask for one by this key in production.
    let registry_path = signed.path("registry.toml");
    let registry = std::fs::read_to_string(&registry_path).unwrap();
    let policy = format!(
        "[policy]\napproval_roles = []\nrequire_provenance = false\nrequire_sbom = false\n\
         signature_stages = [\"production\"]\nsigning_keys = [\"{fingerprint}\"]\n"
    );
    let unsigned = registry.split("[versions.signature]").next().unwrap();
    let unsigned = policy + &unsigned[unsigned.find("[[versions]]").expect("a version")..];
    std::fs::write(&registry_path, unsigned).unwrap();
    let stage = |to: &str| {
        weir(
            signed.dir.path(),
            &["stage", "--model", "chat", "--version", "v1", "--to", to],
        )
    };
    for to in ["candidate", "approved"] {
        let (code, text) = stage(to);
        assert_eq!(code, 0, "{to}: {text}");
    }
    let (code, text) = stage("production");
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("needs a verified model signature"), "{text}");

    // Signed by a key the policy does not list: still refused.
    key_pair(signed.dir.path(), "other");
    signed.resign("other");
    let (code, text) = signed.verify("other.pub");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("not among the policy's signing_keys"),
        "{text}"
    );
    let (code, text) = stage("production");
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("signed by key"), "{text}");

    // Signed by the listed key: production.
    signed.resign("release");
    let (code, text) = signed.verify("release.pub");
    assert_eq!(code, 0, "{text}");
    let (code, text) = stage("production");
    assert_eq!(code, 0, "{text}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_base64(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn encode_base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
