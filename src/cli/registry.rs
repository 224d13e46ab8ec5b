//! `weir registry`: register artifacts, move them through their stages, approve them, verify a
//! copy on disk. A refused step exits 1 naming the rule and what is missing; with `--state-dir`
//! every step (refusals included) is recorded in that directory's audit log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::config::MlflowConfig;
use crate::control::audit::Entry;
use crate::control::state::{Promotion, StateStore};
use crate::control::store::record_offline;
use crate::registry::mlflow::{tag, tags_of, MlflowClient};
use crate::registry::{
    check_stage_change, days, diff_manifests, digest::sha256_file, digest_artifact, format_time,
    parse_time, Approval, Dataset, ModelVersion, Reference, Registry, Stage,
};

#[derive(Args, Debug)]
pub struct RegistryArgs {
    /// The registry file (TOML; created by `add` when missing).
    #[arg(
        long,
        value_name = "FILE",
        global = true,
        default_value = "registry.toml"
    )]
    pub registry: PathBuf,
    /// Record every step in this state directory's audit log; `list` and `show` also read its
    /// routing state, to show the stage a running weir promoted a version to (promotion never
    /// writes the registry file, which is reviewed input and may be read-only).
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Keep the versions in this MLflow tracking server's Model Registry instead of the file:
    /// what MLflow lacks (digest, stage, approvals, provenance, SBOM, signature) is written to
    /// the version's weir.* tags. The --registry file, when it exists, still gives the policy.
    #[arg(long, value_name = "URL", global = true)]
    pub mlflow: Option<String>,
    /// A file holding the bearer token for --mlflow.
    #[arg(long, value_name = "FILE", global = true)]
    pub mlflow_token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: RegistryCommand,
}

/// Where the versions are kept: the registry file, or MLflow's version tags.
enum Backing {
    File,
    Mlflow {
        client: Box<MlflowClient>,
        runtime: tokio::runtime::Runtime,
    },
}

impl Backing {
    fn of(args: &RegistryArgs) -> anyhow::Result<Backing> {
        let Some(url) = &args.mlflow else {
            if args.mlflow_token_file.is_some() {
                anyhow::bail!(
                    "--mlflow-token-file is the token for --mlflow URL; give --mlflow too"
                );
            }
            return Ok(Backing::File);
        };
        MlflowConfig::validate_url(url).map_err(|e| anyhow::anyhow!("--mlflow: {e}"))?;
        let mut config = MlflowConfig::new(url.trim_end_matches('/').to_string());
        config.token_file = args.mlflow_token_file.clone();
        config.timeout = std::time::Duration::from_secs(30);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Backing::Mlflow {
            client: Box::new(MlflowClient::new(&config)?),
            runtime,
        })
    }

    /// The registry holding `model@version` (a registry file: all of it; MLflow: the policy of
    /// the --registry file, if there is one, and that version when its tags describe one).
    /// `new`: the version is being added, so an absent one is no error.
    fn open(
        &self,
        args: &RegistryArgs,
        model: &str,
        version: &str,
        new: bool,
    ) -> anyhow::Result<Registry> {
        let path = &args.registry;
        let Backing::Mlflow { client, runtime } = self else {
            return Ok(if new {
                Registry::load_or_new(path)?
            } else {
                Registry::load(path)?
            });
        };
        let mut registry = Registry::load_or_new(path)?;
        registry.versions.clear();
        let found = runtime
            .block_on(client.version(model, version))
            .with_context(|| format!("{model}@{version} in MLflow at {}", client.url()))?;
        match found.entry() {
            Ok(entry) => registry.versions.push(entry),
            Err(_) if new => {}
            Err((_, why)) => anyhow::bail!("{model}@{version} in MLflow: {why}"),
        }
        Ok(registry)
    }

    /// Writes `label` back: the registry file, or the version's weir.* tags in MLflow.
    fn keep(&self, args: &RegistryArgs, registry: &Registry, label: &str) -> anyhow::Result<()> {
        let Backing::Mlflow { client, runtime } = self else {
            return Ok(registry.save(&args.registry)?);
        };
        let v = registry.find(label).expect("the version just changed");
        runtime.block_on(async {
            for (key, value) in tags_of(v) {
                client
                    .set_tag(&v.model, &v.version, key, &value)
                    .await
                    .with_context(|| format!("writing tag {key} of {label} to MLflow"))?;
            }
            Ok::<_, anyhow::Error>(())
        })
    }

    fn describe(&self, args: &RegistryArgs) -> String {
        match self {
            Backing::File => format!("the registry {}", args.registry.display()),
            Backing::Mlflow { client, .. } => format!("MLflow at {}", client.url()),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum RegistryCommand {
    /// Register a version: hash its artifact (a file or a directory) and record it as a draft.
    Add(Box<AddArgs>),
    /// Move a version to another stage (draft → candidate → approved → production → deprecated → retired).
    Stage {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        /// The stage to move to.
        #[arg(long, value_name = "STAGE")]
        to: Stage,
    },
    /// Record an approval of a version by a role.
    Approve {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        /// The approving role (the policy needs platform, product and security by default).
        #[arg(long)]
        role: String,
        /// Who approves.
        #[arg(long)]
        by: String,
        /// Days until the approval expires [default: the policy's approval_days, 90].
        #[arg(long, value_name = "DAYS")]
        days: Option<u32>,
    },
    /// Check an artifact on disk against the registered digest; exit 1 naming what differs.
    Verify {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        #[arg(long, value_name = "PATH")]
        artifact: PathBuf,
        /// Follow symlinks inside the artifact instead of refusing them.
        #[arg(long)]
        allow_symlinks: bool,
        /// Also verify this OpenSSF model-signing bundle (`model_signing sign key` makes it):
        /// its signature by --public-key, every signed file against the artifact, and the signed
        /// model against the registered digest. A valid one is recorded for the policy.
        #[arg(long, value_name = "BUNDLE", requires = "public_key")]
        signature: Option<PathBuf>,
        /// The signer's PEM public key (ECDSA P-256 or P-384).
        #[arg(long, value_name = "PEM", requires = "signature")]
        public_key: Option<PathBuf>,
    },
    /// List every registered version.
    List,
    /// Show one version in full, with the state of its approvals.
    Show {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
    },
}

#[derive(Args, Debug)]
pub struct AddArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub version: String,
    /// The artifact: a weights file or a model directory.
    #[arg(long, value_name = "PATH")]
    pub artifact: PathBuf,
    /// Where the artifact lives for deployments (s3://…, oci://…); default: the --artifact path.
    #[arg(long, value_name = "URI")]
    pub uri: Option<String>,
    /// Provenance attestation file (hashed and referenced).
    #[arg(long, value_name = "FILE")]
    pub provenance: Option<PathBuf>,
    /// SBOM file (hashed and referenced).
    #[arg(long, value_name = "FILE")]
    pub sbom: Option<PathBuf>,
    #[arg(long)]
    pub owner: Option<String>,
    #[arg(long)]
    pub backup_owner: Option<String>,
    #[arg(long)]
    pub license: Option<String>,
    /// The model this one derives from.
    #[arg(long)]
    pub base_model: Option<String>,
    /// How it was fine-tuned (full, lora, …).
    #[arg(long)]
    pub fine_tune_method: Option<String>,
    /// Risk rating (low, medium, high).
    #[arg(long)]
    pub risk: Option<String>,
    /// What the model server reports as its identity [default: MODEL@VERSION].
    #[arg(long)]
    pub identity: Option<String>,
    /// An allowed use (repeatable).
    #[arg(long = "allowed-use", value_name = "USE")]
    pub allowed_uses: Vec<String>,
    /// A prohibited use (repeatable).
    #[arg(long = "prohibited-use", value_name = "USE")]
    pub prohibited_uses: Vec<String>,
    /// A training data set, NAME or NAME@WINDOW (e.g. crawl-2024@2024-01-01..2024-05-31); repeatable.
    #[arg(long = "training-data", value_name = "NAME[@WINDOW]")]
    pub training_data: Vec<String>,
    /// An evaluation data set, NAME or NAME@WINDOW; repeatable.
    #[arg(long = "eval-data", value_name = "NAME[@WINDOW]")]
    pub eval_data: Vec<String>,
    /// Follow symlinks inside the artifact instead of refusing them.
    #[arg(long)]
    pub allow_symlinks: bool,
    /// With --mlflow: where this version is served (comma-separated origins), as its
    /// weir.backends tag, for a weir whose config does not list the version.
    #[arg(long, value_name = "URLS")]
    pub backends: Option<String>,
}

fn datasets(specs: &[String]) -> Vec<Dataset> {
    specs
        .iter()
        .map(|spec| {
            let (name, window) = match spec.split_once('@') {
                Some((name, window)) => (name, Some(window.to_string())),
                None => (spec.as_str(), None),
            };
            Dataset {
                name: name.to_string(),
                uri: None,
                sha256: None,
                window,
            }
        })
        .collect()
}

/// Who runs the command, for the audit log.
fn actor() -> String {
    format!(
        "registry:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

fn audit(
    args: &RegistryArgs,
    action: &str,
    label: &str,
    before: Value,
    after: Value,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let Some(dir) = &args.state_dir else {
        return Ok(());
    };
    record_offline(
        dir,
        Entry {
            actor: &actor(),
            action,
            route: None,
            before,
            after: json!({"version": label, "detail": after}),
            generation: 0,
            reason,
            window: None,
        },
    )
    .map_err(|e| anyhow::anyhow!("the step was not recorded in the audit log: {e}"))
}

fn reference(path: &Path) -> anyhow::Result<Reference> {
    Ok(Reference {
        uri: path.display().to_string(),
        sha256: sha256_file(path)?,
    })
}

/// Runs one `weir registry` command.
pub fn run(args: RegistryArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        RegistryCommand::Add(new) => add(&args, new),
        RegistryCommand::Stage { model, version, to } => stage(&args, model, version, *to),
        RegistryCommand::Approve {
            model,
            version,
            role,
            by,
            days,
        } => approve(&args, model, version, role, by, *days),
        RegistryCommand::Verify {
            model,
            version,
            artifact,
            allow_symlinks,
            signature,
            public_key,
        } => {
            // Both checks run, so a changed file is named by each.
            let digest = verify(&args, model, version, artifact, *allow_symlinks)?;
            // A signature counts (is recorded) only for the registered artifact.
            let registered = digest == ExitCode::SUCCESS;
            let signed = match (signature, public_key) {
                (Some(bundle), Some(key)) => {
                    let check = (artifact.as_path(), bundle.as_path(), key.as_path());
                    verify_signature(&args, model, version, check, registered)?
                }
                _ => ExitCode::SUCCESS,
            };
            Ok(if digest == ExitCode::SUCCESS {
                signed
            } else {
                digest
            })
        }
        RegistryCommand::List => list(&args),
        RegistryCommand::Show { model, version } => show(&args, model, version),
    }
}

/// Registers a version: hashes its artifact and records it as a draft.
fn add(args: &RegistryArgs, add: &AddArgs) -> anyhow::Result<ExitCode> {
    if add.backends.is_some() && args.mlflow.is_none() {
        anyhow::bail!("--backends writes the weir.backends tag of an MLflow version; give --mlflow URL (in the registry file, the config's [[versions]] list the backends)");
    }
    let backing = Backing::of(args)?;
    let mut registry = backing.open(args, &add.model, &add.version, true)?;
    let label = format!("{}@{}", add.model, add.version);
    if add.version.eq_ignore_ascii_case("latest")
        || add.model.contains('@')
        || add.version.contains('@')
    {
        anyhow::bail!("{label:?} is not a pin: use an explicit version, never \"latest\", and no '@' in names");
    }
    if registry.find(&label).is_some() {
        anyhow::bail!("{label} is already registered in {}; a version's artifact never changes — register a new version", backing.describe(args));
    }
    let digest = digest_artifact(&add.artifact, add.allow_symlinks)?;
    let version = ModelVersion {
        model: add.model.clone(),
        version: add.version.clone(),
        digest: digest.digest.clone(),
        stage: Stage::Draft,
        identity: add.identity.clone(),
        artifact_uri: Some(
            add.uri
                .clone()
                .unwrap_or_else(|| add.artifact.display().to_string()),
        ),
        base_model: add.base_model.clone(),
        fine_tune_method: add.fine_tune_method.clone(),
        license: add.license.clone(),
        allowed_uses: add.allowed_uses.clone(),
        prohibited_uses: add.prohibited_uses.clone(),
        risk: add.risk.clone(),
        owner: add.owner.clone(),
        backup_owner: add.backup_owner.clone(),
        provenance: add.provenance.as_deref().map(reference).transpose()?,
        sbom: add.sbom.as_deref().map(reference).transpose()?,
        training_data: datasets(&add.training_data),
        eval_data: datasets(&add.eval_data),
        approvals: Vec::new(),
        exceptions: Vec::new(),
        manifest: digest.manifest.clone(),
        signature: None,
    };
    registry.versions.push(version);
    backing.keep(args, &registry, &label)?;
    if let (Backing::Mlflow { client, runtime }, Some(backends)) = (&backing, &add.backends) {
        for url in backends.split(',') {
            crate::config::parse_backend_url(url.trim())
                .map_err(|e| anyhow::anyhow!("--backends: {e}"))?;
        }
        runtime.block_on(client.set_tag(&add.model, &add.version, tag::BACKENDS, backends))?;
    }
    let what = if digest.manifest.is_empty() {
        "file".to_string()
    } else {
        format!("directory of {} files", digest.manifest.len())
    };
    audit(
        args,
        "registry_add",
        &label,
        Value::Null,
        json!({"digest": digest.digest, "stage": "draft"}),
        None,
    )?;
    println!(
        "registered {label} as draft: sha256 {} ({what})",
        digest.digest
    );
    Ok(ExitCode::SUCCESS)
}

/// Moves a version to another stage, if the lifecycle rules allow it (a refusal is audited).
fn stage(args: &RegistryArgs, model: &str, version: &str, to: Stage) -> anyhow::Result<ExitCode> {
    let backing = Backing::of(args)?;
    let mut registry = backing.open(args, model, version, false)?;
    let label = format!("{model}@{version}");
    let policy = registry.policy.clone();
    let Some(v) = registry.find_mut(&label) else {
        anyhow::bail!("{label} is not in {}", backing.describe(args));
    };
    let from = v.stage;
    if let Err(refusals) = check_stage_change(&policy, v, to, SystemTime::now()) {
        let reason: Vec<String> = refusals.iter().map(|r| r.to_string()).collect();
        audit(
            args,
            "registry_refused",
            &label,
            json!({"stage": from}),
            json!({"wanted": to}),
            Some(&reason.join("; ")),
        )?;
        eprintln!("refused: {label} stays {from}");
        for r in &refusals {
            eprintln!("  {r}");
        }
        return Ok(ExitCode::FAILURE);
    }
    v.stage = to;
    backing.keep(args, &registry, &label)?;
    audit(
        args,
        "registry_stage",
        &label,
        json!({"stage": from}),
        json!({"stage": to}),
        None,
    )?;
    println!("{label}: {from} → {to}");
    Ok(ExitCode::SUCCESS)
}

/// Records an approval of a version by a role, until it expires.
fn approve(
    args: &RegistryArgs,
    model: &str,
    version: &str,
    role: &str,
    by: &str,
    valid_days: Option<u32>,
) -> anyhow::Result<ExitCode> {
    let backing = Backing::of(args)?;
    let mut registry = backing.open(args, model, version, false)?;
    let label = format!("{model}@{version}");
    let valid_for = valid_days.unwrap_or(registry.policy.approval_days);
    if !registry.policy.approval_roles.iter().any(|r| r == role) {
        eprintln!(
            "note: the policy does not need role {role:?} (it needs {})",
            registry.policy.approval_roles.join(", ")
        );
    }
    let Some(v) = registry.find_mut(&label) else {
        anyhow::bail!("{label} is not in {}", backing.describe(args));
    };
    let now = SystemTime::now();
    let approval = Approval {
        by: by.to_string(),
        role: role.to_string(),
        at: format_time(now),
        expires_at: format_time(now + days(valid_for)),
    };
    v.approvals.push(approval.clone());
    backing.keep(args, &registry, &label)?;
    audit(
        args,
        "registry_approve",
        &label,
        Value::Null,
        json!(approval),
        None,
    )?;
    println!(
        "{label}: approved by {by} as {role}, until {}",
        approval.expires_at
    );
    Ok(ExitCode::SUCCESS)
}

/// Checks an artifact on disk against the registered digest, naming the files that differ.
fn verify(
    args: &RegistryArgs,
    model: &str,
    version: &str,
    artifact: &Path,
    allow_symlinks: bool,
) -> anyhow::Result<ExitCode> {
    let backing = Backing::of(args)?;
    let registry = backing.open(args, model, version, false)?;
    let label = format!("{model}@{version}");
    let Some(v) = registry.find(&label) else {
        anyhow::bail!("{label} is not in {}", backing.describe(args));
    };
    let actual = digest_artifact(artifact, allow_symlinks)
        .with_context(|| format!("cannot hash {}", artifact.display()))?;
    println!("{label}: {}", artifact.display());
    println!("  expected sha256 {}", v.digest);
    println!("  actual   sha256 {}", actual.digest);
    if actual.digest == v.digest {
        audit(
            args,
            "registry_verify",
            &label,
            Value::Null,
            json!({"artifact": artifact, "result": "match"}),
            None,
        )?;
        println!("  match");
        return Ok(ExitCode::SUCCESS);
    }
    let diff = diff_manifests(&v.manifest, &actual.manifest);
    for (what, files) in [
        ("differs", &diff.changed),
        ("missing", &diff.missing),
        ("extra", &diff.extra),
    ] {
        for file in files {
            println!("  {what}: {file}");
        }
    }
    audit(
        args,
        "registry_verify",
        &label,
        Value::Null,
        json!({"artifact": artifact, "result": "mismatch", "actual": actual.digest,
               "changed": diff.changed, "missing": diff.missing, "extra": diff.extra}),
        None,
    )?;
    println!("  MISMATCH: this is not the registered artifact of {label}");
    Ok(ExitCode::FAILURE)
}

/// Verifies a model signature of the (already digest-checked) artifact; a valid one is recorded
/// on the version, every result audited.
fn verify_signature(
    args: &RegistryArgs,
    model: &str,
    version: &str,
    (artifact, bundle, key): (&Path, &Path, &Path),
    registered: bool,
) -> anyhow::Result<ExitCode> {
    use crate::registry::signature::{self, PublicKey};
    let backing = Backing::of(args)?;
    let mut registry = backing.open(args, model, version, false)?;
    let label = format!("{model}@{version}");
    let Some(v) = registry.find_mut(&label) else {
        anyhow::bail!("{label} is not in {}", backing.describe(args));
    };
    let key = PublicKey::load(key)?;
    println!(
        "  signature {} by key {}",
        bundle.display(),
        key.fingerprint
    );
    match signature::verify(bundle, &key, artifact, &v.digest, &v.manifest) {
        Ok(verified) if !registered => {
            println!(
                "  signature valid for these files ({} signed), but they are not the registered artifact: not recorded",
                verified.files
            );
            Ok(ExitCode::FAILURE)
        }
        Ok(verified) => {
            let record = crate::registry::SignatureRecord {
                bundle: Reference {
                    uri: bundle.display().to_string(),
                    sha256: verified.bundle_sha256.clone(),
                },
                key: verified.key.clone(),
                subject_sha256: verified.subject.clone(),
                verified_at: format_time(SystemTime::now()),
            };
            v.signature = Some(record.clone());
            let listed = registry.policy.signing_keys.contains(&verified.key);
            backing.keep(args, &registry, &label)?;
            audit(
                args,
                "registry_verify_signature",
                &label,
                Value::Null,
                json!({"artifact": artifact, "result": "valid", "signature": record}),
                None,
            )?;
            println!(
                "  signature valid: {} signed files, subject sha256 {}",
                verified.files, verified.subject
            );
            if !listed && !registry.policy.signature_stages.is_empty() {
                println!(
                    "  note: this key is not among the policy's signing_keys, so the signature does not count for {}",
                    stages(&registry.policy.signature_stages)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            audit(
                args,
                "registry_verify_signature",
                &label,
                Value::Null,
                json!({"artifact": artifact, "bundle": bundle, "result": "invalid", "error": e.to_string()}),
                None,
            )?;
            println!("  SIGNATURE INVALID: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn stages(stages: &[Stage]) -> String {
    stages
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Lists every registered version, with the stages a running weir promoted.
fn list(args: &RegistryArgs) -> anyhow::Result<ExitCode> {
    if args.mlflow.is_some() {
        anyhow::bail!("list reads the registry file; with --mlflow, show one version (weir registry show --mlflow URL --model M --version V) or list them in MLflow's UI");
    }
    let path = &args.registry;
    let registry = Registry::load(path)?;
    let promoted = runtime_promotions(args)?;
    println!(
        "{:<32} {:<11} {:<14} {:<12} approvals",
        "version", "stage", "sha256", "owner"
    );
    let now = SystemTime::now();
    for v in &registry.versions {
        let valid = v
            .approvals
            .iter()
            .filter(|a| parse_time(&a.expires_at).is_ok_and(|t| t > now))
            .map(|a| a.role.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let stage = match promoted_over(&promoted, v) {
            Some(_) => format!("{}*", Stage::Production),
            None => v.stage.to_string(),
        };
        println!(
            "{:<32} {:<11} {:<14} {:<12} {}",
            v.label(),
            stage,
            &v.digest[..12.min(v.digest.len())],
            v.owner.as_deref().unwrap_or("-"),
            if valid.is_empty() { "-" } else { &valid }
        );
    }
    for v in &registry.versions {
        if let Some(p) = promoted_over(&promoted, v) {
            println!("* {}", runtime_note(v, p));
        }
    }
    if promoted.is_none() {
        eprintln!("(stages as the registry file records them; add --state-dir DIR to see what a running weir promoted)");
    }
    Ok(ExitCode::SUCCESS)
}

/// Shows one version in full, with the state of its approvals.
fn show(args: &RegistryArgs, model: &str, version: &str) -> anyhow::Result<ExitCode> {
    let backing = Backing::of(args)?;
    let registry = backing.open(args, model, version, false)?;
    let label = format!("{model}@{version}");
    let Some(v) = registry.find(&label) else {
        anyhow::bail!("{label} is not in {}", backing.describe(args));
    };
    print!("{}", toml::to_string_pretty(v)?);
    let promoted = runtime_promotions(args)?;
    if let Some(p) = promoted_over(&promoted, v) {
        println!("# runtime stage: {}", runtime_note(v, p));
    }
    let now = SystemTime::now();
    for a in &v.approvals {
        let state = match parse_time(&a.expires_at) {
            Ok(t) if t > now => "valid",
            _ => "EXPIRED",
        };
        println!(
            "# approval {} by {}: {state} (expires {})",
            a.role, a.by, a.expires_at
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The promotions a running weir recorded in `--state-dir`'s routing state (`None` without one).
fn runtime_promotions(args: &RegistryArgs) -> anyhow::Result<Option<BTreeMap<String, Promotion>>> {
    let Some(dir) = &args.state_dir else {
        return Ok(None);
    };
    let body = StateStore::new(dir).load()?;
    Ok(Some(body.map(|b| b.state.production).unwrap_or_default()))
}

/// The runtime promotion that puts `v` in production over its file stage, if there is one (the
/// same rule the running weir applies: see `control::pins::runtime_registry`).
fn promoted_over<'p>(
    promoted: &'p Option<BTreeMap<String, Promotion>>,
    v: &ModelVersion,
) -> Option<&'p Promotion> {
    let p = promoted.as_ref()?.get(&v.label())?;
    matches!(v.stage, Stage::Candidate | Stage::Approved).then_some(p)
}

fn runtime_note(v: &ModelVersion, p: &Promotion) -> String {
    format!(
        "{} is production: weir promoted it on route {} at generation {} ({}); the registry file still says {}",
        v.label(),
        p.route,
        p.generation,
        p.at,
        v.stage
    )
}
