//! MLflow aliases as the routes' pins: read them, turn each aliased version into a checked pin,
//! keep the last good pins when MLflow is away or an alias moves to a version the policy
//! refuses, and move the aliases when weir promotes or rolls back.
//!
//! Invariant: a route is only ever pinned to a version whose MLflow tags passed the policy
//! (fail closed): a refused alias leaves the route on its last good pin, and with no good pin
//! at all weir does not start. The pins in force are kept in `<state-dir>/mlflow-pins.json` so a
//! restart while MLflow is down serves what was last served, never "latest".

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::pins::runtime_registry;
use super::state::RoutingState;
use crate::config::{BackendProtocol, Balance, Config, MlflowConfig, MlflowRoute, VersionConfig};
use crate::metrics::{MlflowMetrics, Role};
use crate::registry::mlflow::{tag, MlflowClient, MlflowError, MlflowVersion};
use crate::registry::{check_servable, check_stage_held, ModelVersion, Registry, RegistryError};

pub const CACHE_FILE: &str = "mlflow-pins.json";

/// One version an alias (or the routing state) names, with what its tags say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// `model@version`.
    pub label: String,
    /// The MLflow version number.
    pub version: String,
    /// Who created the version in MLflow (empty when MLflow runs without auth).
    pub user_id: String,
    /// The registry entry its tags describe; `None` when they cannot (see `problem`).
    pub entry: Option<ModelVersion>,
    /// Why the version cannot serve, before the policy is asked: a missing or bad tag, an
    /// artifact that is not the one its digest names, no backends.
    pub problem: Option<String>,
    /// Origins from its `weir.backends` tag (empty when weir's config defines the version).
    pub backends: Vec<String>,
    pub protocol: Option<String>,
    /// Its `weir.served_model` tag: the name its servers know the model by (routes by model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
}

impl Pin {
    pub fn digest(&self) -> Option<&str> {
        self.entry.as_ref().map(|e| e.digest.as_str())
    }

    /// `chat@3 (sha256 1a2b3c4d…, created by alice)`, for notes and the audit record.
    pub fn describe(&self) -> String {
        let digest = self
            .digest()
            .map_or("no digest".to_string(), |d| format!("sha256 {d}"));
        let by = if self.user_id.is_empty() {
            "creator not recorded by MLflow".to_string()
        } else {
            format!("created by {}", self.user_id)
        };
        format!("{} ({digest}, {by})", self.label)
    }
}

/// What one route's aliases name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutePins {
    pub stable: Pin,
    pub candidate: Option<Pin>,
    /// Versions the routing state still names besides the aliases' (a promotion's rollback
    /// target, a rolled-back candidate), so a rollback can return to them.
    pub others: Vec<Pin>,
}

impl RoutePins {
    fn all(&self) -> impl Iterator<Item = &Pin> {
        std::iter::once(&self.stable)
            .chain(&self.candidate)
            .chain(&self.others)
    }
}

/// The pins of every MLflow route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub routes: BTreeMap<String, RoutePins>,
}

/// What one read of MLflow found: per route its pins, or why it has none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    pub routes: BTreeMap<String, Result<RoutePins, String>>,
}

impl Fetched {
    /// The pins kept as if MLflow had named them again (MLflow unreachable).
    pub fn kept(resolution: &Resolution) -> Fetched {
        Fetched {
            routes: resolution
                .routes
                .iter()
                .map(|(route, pins)| (route.clone(), Ok(pins.clone())))
                .collect(),
        }
    }
}

/// A route whose aliases were refused: it stays on its last good pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub route: String,
    pub message: String,
}

/// The pins chosen from a read: the resolution to apply, and the routes refused.
#[derive(Debug)]
pub struct Settled {
    pub config: Config,
    pub resolution: Resolution,
    pub refusals: Vec<Refusal>,
    /// What changed against the pins in force, for the audit record.
    pub notes: Vec<String>,
}

/// The MLflow source: the client, the pins in force, and MLflow's reachability.
#[derive(Debug)]
pub struct MlflowSource {
    client: MlflowClient,
    config: MlflowConfig,
    cache: PathBuf,
    inner: Mutex<SourceState>,
    metrics: MlflowMetrics,
}

#[derive(Debug, Default)]
struct SourceState {
    last_good: Resolution,
    /// Why MLflow is down, while it is.
    down: Option<String>,
    /// The routes refused at the last read, with why (recorded once per new refusal).
    refused: BTreeMap<String, String>,
    /// Artifacts already checked against their digest: (path, digest) → the verdict.
    verified: HashMap<(PathBuf, String), Result<(), String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Mlflow(#[from] MlflowError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}; no pins were kept by an earlier run (<state-dir>/mlflow-pins.json), and weir does not start on unknown pins: start MLflow or check [registry] mlflow")]
    NoPins(MlflowError),
    #[error("MLflow gives no servable pin for {}, and no earlier run left a good one:\n  {}", .0.iter().map(|r| r.route.as_str()).collect::<Vec<_>>().join(", "), .0.iter().map(|r| format!("route {}: {}", r.route, r.message)).collect::<Vec<_>>().join("\n  "))]
    Refused(Vec<Refusal>),
    #[error("cannot keep the MLflow pins in {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl MlflowSource {
    pub fn new(
        config: &Config,
        metrics: &crate::metrics::Metrics,
    ) -> Result<MlflowSource, SourceError> {
        let settings = config
            .mlflow
            .clone()
            .expect("an MLflow source needs [registry] mlflow");
        let source_metrics = metrics.enable_mlflow();
        let cache = config.state_dir.join(CACHE_FILE);
        let last_good = match std::fs::read(&cache) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %cache.display(), error = %e, "ignoring unreadable MLflow pins kept from an earlier run");
                Resolution::default()
            }),
            Err(_) => Resolution::default(),
        };
        Ok(MlflowSource {
            client: MlflowClient::new(&settings)?,
            config: settings,
            cache,
            inner: Mutex::new(SourceState {
                last_good,
                ..SourceState::default()
            }),
            metrics: source_metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SourceState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn interval(&self) -> Duration {
        self.config.interval
    }

    pub fn url(&self) -> &str {
        self.client.url()
    }

    /// Why MLflow is unreachable, while it is.
    pub fn down_reason(&self) -> Option<String> {
        self.lock().down.clone()
    }

    pub fn last_good(&self) -> Resolution {
        self.lock().last_good.clone()
    }

    fn mark(&self, result: Result<(), &MlflowError>) {
        let mut inner = self.lock();
        match result {
            Ok(()) => {
                if inner.down.take().is_some() {
                    tracing::info!(url = self.url(), "MLflow answers again");
                }
                self.metrics.up.set(1);
            }
            Err(e) => {
                if inner.down.is_none() {
                    tracing::warn!(error = %e, "MLflow is unreachable: traffic stays on the last pins; promotions and rollbacks answer 503 until it is back");
                }
                inner.down = Some(e.to_string());
                self.metrics.up.set(0);
            }
        }
    }

    /// Reads every MLflow route's aliases, and the versions `state` still names there.
    pub async fn fetch(
        &self,
        config: &Config,
        state: Option<&RoutingState>,
    ) -> Result<Fetched, MlflowError> {
        let result = self.fetch_routes(config, state).await;
        self.mark(result.as_ref().map(drop));
        result
    }

    async fn fetch_routes(
        &self,
        config: &Config,
        state: Option<&RoutingState>,
    ) -> Result<Fetched, MlflowError> {
        let mut fetched = Fetched::default();
        for route in &config.routes {
            let Some(binding) = &route.mlflow else {
                continue;
            };
            let Some(stable) = self
                .client
                .alias(&binding.model, &binding.stable_alias)
                .await?
            else {
                fetched.routes.insert(
                    route.name.clone(),
                    Err(format!(
                        "MLflow model {:?} has no {:?} alias (no version is marked as serving); set it with MlflowClient().set_registered_model_alias({:?}, {:?}, VERSION)",
                        binding.model, binding.stable_alias, binding.model, binding.stable_alias
                    )),
                );
                continue;
            };
            let candidate = self
                .client
                .alias(&binding.model, &binding.candidate_alias)
                .await?
                // The same version under both aliases (a promotion made in MLflow's UI that
                // kept the challenger alias) is no canary.
                .filter(|c| c.version != stable.version);
            let named: Vec<String> = std::iter::once(stable.label())
                .chain(candidate.as_ref().map(MlflowVersion::label))
                .collect();
            let mut others = Vec::new();
            if let Some(route_state) = state.and_then(|s| s.route(&route.name)) {
                let in_state = [
                    route_state.rollback_target.as_ref(),
                    route_state.candidate.as_ref(),
                ];
                for label in in_state.into_iter().flatten() {
                    let Some(version) = label
                        .strip_prefix(&binding.model)
                        .and_then(|v| v.strip_prefix('@'))
                    else {
                        continue;
                    };
                    if named.contains(label) || others.iter().any(|p: &Pin| &p.label == label) {
                        continue;
                    }
                    match self.client.version(&binding.model, version).await {
                        Ok(v) => others.push(self.pin(config, &v).await),
                        Err(e) if e.is_outage() => return Err(e),
                        // A version deleted from MLflow: nothing to return to.
                        Err(_) => {}
                    }
                }
            }
            let pins = RoutePins {
                stable: self.pin(config, &stable).await,
                candidate: match &candidate {
                    Some(c) => Some(self.pin(config, c).await),
                    None => None,
                },
                others,
            };
            fetched.routes.insert(route.name.clone(), Ok(pins));
        }
        Ok(fetched)
    }

    /// A version as a pin: its registry entry, its backends, and what stops it serving.
    async fn pin(&self, config: &Config, v: &MlflowVersion) -> Pin {
        let label = v.label();
        let mut pin = Pin {
            label: label.clone(),
            version: v.version.clone(),
            user_id: v.user_id.clone(),
            entry: None,
            problem: None,
            backends: Vec::new(),
            protocol: v.tags.get(tag::PROTOCOL).cloned(),
            served_model: v.tags.get(tag::SERVED_MODEL).cloned(),
        };
        match v.entry() {
            Ok(entry) => pin.entry = Some(entry),
            Err((_, message)) => {
                pin.problem = Some(message);
                return pin;
            }
        }
        let configured = config
            .versions
            .iter()
            .any(|c| c.label() == label && !c.from_registry);
        if !configured {
            match v.tags.get(tag::BACKENDS) {
                Some(list) => {
                    pin.backends = list
                        .split(',')
                        .map(|u| u.trim().to_string())
                        .filter(|u| !u.is_empty())
                        .collect()
                }
                None => {
                    pin.problem = Some(format!(
                        "weir does not know where it is served: define [[versions]] model = {:?}, version = {:?} with its backends, or tag it {} = \"http://host:port,...\"",
                        v.name, v.version, tag::BACKENDS
                    ));
                    return pin;
                }
            }
        }
        if let (Some(path), Some(digest)) = (v.local_artifact(), pin.digest().map(str::to_string)) {
            if let Err(message) = self.verify_artifact(path, digest).await {
                pin.problem = Some(message);
            }
        }
        pin
    }

    /// Checks a local artifact against its digest tag, once per (path, digest) in this process.
    async fn verify_artifact(&self, path: PathBuf, digest: String) -> Result<(), String> {
        let key = (path.clone(), digest.clone());
        if let Some(verdict) = self.lock().verified.get(&key) {
            return verdict.clone();
        }
        let shown = path.display().to_string();
        let verdict = tokio::task::spawn_blocking(move || {
            match crate::registry::digest_artifact(&path, false) {
                Ok(found) if found.digest == digest => Ok(()),
                Ok(found) => Err(format!(
                    "its artifact {shown} is not the one its weir.sha256 tag names (found sha256 {}, tagged {digest}): refused as tampered or replaced",
                    found.digest
                )),
                Err(e) => Err(format!("its artifact cannot be checked against its digest: {e}")),
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("checking its artifact failed: {e}")));
        self.lock().verified.insert(key, verdict.clone());
        verdict
    }

    /// Chooses the pins to serve from a read: per route the aliases' versions when they pass
    /// the registry's policy, else the route's last good pins. `previous` is the routing state
    /// in force (a version already serving in a route may stay there deprecated).
    pub fn settle(
        &self,
        base: &Config,
        fetched: &Fetched,
        previous: Option<&RoutingState>,
    ) -> Result<Settled, SourceError> {
        let last_good = self.last_good();
        let registry = match &base.registry {
            Some(path) => Registry::load(path)?,
            None => Registry::default(),
        };
        let mut resolution = Resolution::default();
        let mut refusals = Vec::new();
        let mut notes = Vec::new();
        for route in base.routes.iter().filter(|r| r.mlflow.is_some()) {
            let name = &route.name;
            let verdict = match fetched.routes.get(name) {
                None => Err("not read".to_string()),
                Some(Err(why)) => Err(why.clone()),
                Some(Ok(pins)) => {
                    check_pins(&registry, name, pins, previous).map(|()| pins.clone())
                }
            };
            let kept = last_good.routes.get(name);
            match verdict {
                Ok(pins) => {
                    if kept.map(|k| (&k.stable, &k.candidate))
                        != Some((&pins.stable, &pins.candidate))
                    {
                        notes.push(pin_note(name, route.mlflow.as_ref(), kept, &pins));
                    }
                    resolution.routes.insert(name.clone(), pins);
                }
                Err(message) => {
                    refusals.push(Refusal {
                        route: name.clone(),
                        message: message.clone(),
                    });
                    if let Some(kept) = kept {
                        notes.push(format!(
                            "{name}: MLflow's aliases refused ({message}); staying on {}",
                            kept.stable.label
                        ));
                        resolution.routes.insert(name.clone(), kept.clone());
                    }
                }
            }
        }
        let unresolved: Vec<Refusal> = refusals
            .iter()
            .filter(|r| !resolution.routes.contains_key(&r.route))
            .cloned()
            .collect();
        if !unresolved.is_empty() {
            return Err(SourceError::Refused(unresolved));
        }
        Ok(Settled {
            config: apply(base, &resolution),
            resolution,
            refusals,
            notes,
        })
    }

    /// The settled pins are in force: keep them for a restart, export the refusals. Returns
    /// the refusals that are new since the last read (to record in the audit log once).
    pub fn commit(&self, settled: &Settled) -> Result<Vec<Refusal>, SourceError> {
        self.keep(&settled.resolution)?;
        let mut inner = self.lock();
        let mut fresh = Vec::new();
        let refused: BTreeMap<String, String> = settled
            .refusals
            .iter()
            .map(|r| (r.route.clone(), r.message.clone()))
            .collect();
        for route in settled.resolution.routes.keys() {
            self.metrics.refused.with_label_values(&[route]).set(0);
        }
        for r in &settled.refusals {
            self.metrics.refused.with_label_values(&[&r.route]).set(1);
            if inner.refused.get(&r.route) != Some(&r.message) {
                self.metrics.refusals.with_label_values(&[&r.route]).inc();
                tracing::warn!(route = %r.route, reason = %r.message, "MLflow alias refused: the route stays on its last good pin");
                fresh.push(r.clone());
            }
        }
        inner.refused = refused;
        Ok(fresh)
    }

    pub(super) fn keep(&self, resolution: &Resolution) -> Result<(), SourceError> {
        let cache_error = |source| SourceError::Cache {
            path: self.cache.clone(),
            source,
        };
        if let Some(dir) = self.cache.parent() {
            std::fs::create_dir_all(dir).map_err(cache_error)?;
        }
        let tmp = self.cache.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(resolution).expect("pins serialize");
        std::fs::write(&tmp, text).map_err(cache_error)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(cache_error)?;
        std::fs::rename(&tmp, &self.cache).map_err(cache_error)?;
        self.lock().last_good = resolution.clone();
        Ok(())
    }

    /// The pins at start: MLflow's, or — MLflow unreachable — the ones kept by the last run.
    pub async fn at_start(
        &self,
        config: &Config,
        previous: Option<&RoutingState>,
    ) -> Result<Settled, SourceError> {
        let fetched = match self.fetch(config, previous).await {
            Ok(fetched) => fetched,
            Err(e) if e.is_outage() => {
                let kept = self.last_good();
                if kept.routes.is_empty() {
                    return Err(SourceError::NoPins(e));
                }
                tracing::warn!(error = %e, path = %self.cache.display(), "MLflow is unreachable at start: serving the pins kept by the last run");
                Fetched::kept(&kept)
            }
            Err(e) => return Err(e.into()),
        };
        let settled = self.settle(config, &fetched, previous)?;
        self.commit(&settled)?;
        Ok(settled)
    }

    /// Moves the aliases of `binding` after weir changed a route's stable version: the stable
    /// alias to `stable`'s version, the candidate alias removed. Returns the route's new pins.
    pub async fn move_aliases(
        &self,
        route: &str,
        binding: &MlflowRoute,
        stable: &str,
        old: &RoutePins,
    ) -> Result<RoutePins, MlflowError> {
        let version = stable
            .strip_prefix(&binding.model)
            .and_then(|v| v.strip_prefix('@'))
            .unwrap_or(stable);
        let written = async {
            self.client
                .set_alias(&binding.model, &binding.stable_alias, version)
                .await?;
            self.client
                .delete_alias(&binding.model, &binding.candidate_alias)
                .await
        }
        .await;
        self.mark(written.as_ref().map(|_| ()));
        written?;
        let new_stable = old
            .all()
            .find(|p| p.label == stable)
            .cloned()
            .expect("the new stable version was pinned in the route");
        let others = old.all().filter(|p| p.label != stable).cloned().collect();
        tracing::info!(route, alias = %binding.stable_alias, version, "moved the MLflow alias");
        Ok(RoutePins {
            stable: new_stable,
            candidate: None,
            others,
        })
    }
}

/// Every reason the pins of one route cannot serve, or `Ok`.
fn check_pins(
    registry: &Registry,
    route: &str,
    pins: &RoutePins,
    previous: Option<&RoutingState>,
) -> Result<(), String> {
    let before = previous.and_then(|p| p.route(route));
    let served_before = |label: &str| {
        before.is_some_and(|b| b.stable == label || b.serving_candidate() == Some(label))
    };
    let mut reasons = Vec::new();
    let roles = [
        (Some(&pins.stable), Role::Stable),
        (pins.candidate.as_ref(), Role::Candidate),
    ];
    for (pin, role) in roles {
        let Some(pin) = pin else { continue };
        if let Some(problem) = &pin.problem {
            reasons.push(format!("{} as {}: {problem}", pin.label, role.as_str()));
            continue;
        }
        let mut trial = registry.clone();
        trial.versions.retain(|v| v.label() != pin.label);
        trial.versions.extend(pin.entry.clone());
        // A version a running weir promoted counts as production, as for the registry file.
        let trial = match previous {
            Some(state) => runtime_registry(trial, state),
            None => trial,
        };
        match check_servable(&trial, &pin.label, role, !served_before(&pin.label)) {
            Err(refusal) => reasons.push(refusal.to_string()),
            // MLflow's tags are anyone's to set: the stage they claim counts only with what
            // that stage needs (approvals by role, unexpired; provenance; SBOM; signature).
            Ok(entry) => {
                if let Err(broken) = check_stage_held(&trial.policy, entry, SystemTime::now()) {
                    for rule in broken {
                        reasons.push(format!(
                            "{} cannot serve as {}: its {} tag says {} but {rule}",
                            pin.label,
                            role.as_str(),
                            tag::STAGE,
                            entry.stage
                        ));
                    }
                }
            }
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons.join("; "))
    }
}

/// `chat: stable champion → chat@3 (sha256 …, created by alice), was chat@2`.
fn pin_note(
    route: &str,
    binding: Option<&MlflowRoute>,
    kept: Option<&RoutePins>,
    pins: &RoutePins,
) -> String {
    let (stable_alias, candidate_alias) = binding.map_or(("stable", "candidate"), |b| {
        (b.stable_alias.as_str(), b.candidate_alias.as_str())
    });
    let mut parts = Vec::new();
    let was = |p: Option<&Pin>| p.map_or("none".to_string(), |p| p.label.clone());
    if kept.map(|k| &k.stable) != Some(&pins.stable) {
        parts.push(format!(
            "stable {stable_alias} → {}, was {}",
            pins.stable.describe(),
            was(kept.map(|k| &k.stable))
        ));
    }
    if kept.map(|k| k.candidate.as_ref()) != Some(pins.candidate.as_ref()) {
        parts.push(format!(
            "candidate {candidate_alias} → {}, was {}",
            pins.candidate
                .as_ref()
                .map_or("none".to_string(), Pin::describe),
            was(kept.and_then(|k| k.candidate.as_ref()))
        ));
    }
    format!("{route}: MLflow {}", parts.join("; "))
}

/// `base` pinned by `resolution`: each MLflow route's stable and candidate, the versions whose
/// backends come from tags, and the registry entries of every pinned version.
pub fn apply(base: &Config, resolution: &Resolution) -> Config {
    let mut config = base.clone();
    config.versions.retain(|v| !v.from_registry);
    config.mlflow_versions.clear();
    for route in config.routes.iter_mut() {
        let Some(pins) = resolution.routes.get(&route.name) else {
            continue;
        };
        route.stable = pins.stable.label.clone();
        route.candidate = pins.candidate.as_ref().map(|p| p.label.clone());
    }
    for pins in resolution.routes.values() {
        for pin in pins.all() {
            if let Some(entry) = &pin.entry {
                if !config
                    .mlflow_versions
                    .iter()
                    .any(|v| v.label() == pin.label)
                {
                    config.mlflow_versions.push(entry.clone());
                }
            }
            if pin.backends.is_empty() || config.version(&pin.label).is_some() {
                continue;
            }
            let backends = pin
                .backends
                .iter()
                .filter_map(|u| crate::config::parse_backend_url(u).ok())
                .collect::<Vec<_>>();
            if backends.is_empty() {
                continue;
            }
            let (model, version) = pin.label.split_once('@').unwrap_or((&pin.label, ""));
            config.versions.push(VersionConfig {
                model: model.to_string(),
                version: version.to_string(),
                backends,
                balance: Balance::RoundRobin,
                protocol: pin
                    .protocol
                    .as_deref()
                    .and_then(|p| BackendProtocol::parse(p).ok())
                    .unwrap_or_default(),
                from_registry: true,
                served_model: pin.served_model.clone(),
            });
        }
    }
    config
}
