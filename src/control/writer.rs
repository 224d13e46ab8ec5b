//! The one writer: every routing change — admin call, reload, the canary controller — is a
//! [`Command`] applied here, one at a time.
//!
//! Order of a change: validate ([`RouteState::apply`], the registry's pins) → build the new
//! table (generation + 1) → commit the state with its audit record ([`Store::commit`]: the state
//! file, or etcd in fleet mode) → swap the table in and publish it with its state ([`Live`]). A
//! change that fails before the swap leaves traffic, state and audit log as they were; a change
//! is acknowledged only after the swap. The serving windows closed into the records are in
//! `window.rs`, a promotion's runtime stage in `promotion.rs`; fleet mode's joining and catching
//! up are here because they build and swap tables too.
//!
//! [`Store::commit`]: super::store::Store::commit

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::audit::{AuditError, AuditLog, Entry, Prepared};
use super::build::{build_table, BuildError, VersionSet};
use super::fleet::{Fleet, FleetError, AUDIT_PAGE};
use super::mlflow::{Fetched, MlflowSource, Resolution, Settled, SourceError};
use super::pins::{load_registry, pin_refusals, runtime_registry, RouteRefusal};
use super::promotion::move_runtime_stage;
use super::state::{
    config_digest, reconcile, ApplyError, Promotion, RouteState, RoutingState, StateBody,
    StateError, StateStore, STATE_FORMAT,
};
use super::store::etcd::NOT_JOINED;
use super::store::{CommitError, EtcdStore, FileStore, PersistError, Store};
use super::window::Window;
use crate::config::{Config, ConfigError};
use crate::data::RoutingTable;
use crate::metrics::Metrics;
use crate::registry::{RegistryError, RuleRefusal};

pub use super::command::{Actor, Change, Command};

/// The outcome of an accepted change.
#[derive(Clone, Debug)]
pub struct Applied {
    pub generation: u64,
    /// False when the command left everything as it was (nothing was written).
    pub changed: bool,
    pub route: Option<RouteState>,
    pub notes: Vec<String>,
}

/// Why a change was refused. Nothing changed, except perhaps for [`CommandError::Unconfirmed`]
/// (see [`CommandError::outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no route named {route:?}; routes: {known}")]
    UnknownRoute { route: String, known: String },
    /// The route's state does not take the command.
    #[error(transparent)]
    Refused(#[from] ApplyError),
    #[error("weir was started without a config file (quick mode): there is nothing to reload")]
    NothingToReload,
    /// Fleet mode: a fenced change from a replica that no longer leads the canary.
    #[error(transparent)]
    NotLeader(FleetError),
    #[error("the routing table is at generation {current}, not {expected} (If-Match): re-read it and retry")]
    GenerationMoved { expected: u64, current: u64 },
    #[error("the config file is not valid; nothing was changed")]
    InvalidConfig(#[source] ConfigError),
    #[error("the change could not be made durable, so it was not applied: {0}")]
    Persist(#[from] PersistError),
    /// The changed state does not fit the config (a version the config no longer defines).
    #[error("the changed routing cannot be served, so it was not applied: {0}")]
    Build(#[source] BuildError),
    #[error("the registry refuses this routing: {}", .0.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; "))]
    Pins(Vec<RouteRefusal>),
    #[error("the registry refuses to promote {label}: {}", .refusals.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; "))]
    Promotion {
        label: String,
        refusals: Vec<RuleRefusal>,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Fleet mode: etcd did not answer; nothing changed anywhere.
    #[error("the change was not applied because etcd is unreachable ({0}); the fleet keeps serving its last routing table. Retry when etcd is back")]
    Unavailable(#[source] FleetError),
    /// Fleet mode: the commit was sent but etcd never confirmed it; it may be live.
    #[error("{0}: it may have been applied. GET /v1/routes shows the generation once etcd answers; a retry with If-Match cannot apply it twice")]
    Unconfirmed(#[source] FleetError),
    /// Fleet mode: this replica cannot build (or follow the audit chain to) the fleet's state.
    #[error("this replica cannot apply the fleet's routing state: {0}. It routes by its older table until its config can build the fleet's: roll the config out to it and reload")]
    CannotApply(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Fleet mode: another replica kept changing the state while this one tried to.
    #[error("another replica changed the routing state at the same time, several times over; re-read it and retry")]
    Stale,
    /// MLflow could not be read or written (a promotion or rollback moves its aliases first),
    /// or gives no pin the policy allows.
    #[error("{0}; nothing was applied")]
    Mlflow(#[source] SourceError),
}

impl From<SourceError> for CommandError {
    fn from(e: SourceError) -> CommandError {
        match e {
            SourceError::Registry(e) => CommandError::Registry(e),
            e => CommandError::Mlflow(e),
        }
    }
}

impl From<FleetError> for CommandError {
    fn from(e: FleetError) -> CommandError {
        match e {
            FleetError::Unavailable { .. } => CommandError::Unavailable(e),
            FleetError::Unconfirmed { .. } => CommandError::Unconfirmed(e),
            FleetError::Stale => CommandError::Stale,
            FleetError::NotLeader => CommandError::NotLeader(e),
            FleetError::Corrupt { .. } | FleetError::File { .. } => {
                CommandError::Persist(PersistError::Fleet(e))
            }
        }
    }
}

impl From<CommitError> for CommandError {
    fn from(e: CommitError) -> CommandError {
        match e {
            CommitError::Persist(e) => CommandError::Persist(e),
            CommitError::Fleet(e) => e.into(),
        }
    }
}

impl From<super::promotion::Refused> for CommandError {
    fn from(r: super::promotion::Refused) -> CommandError {
        CommandError::Promotion {
            label: r.label,
            refusals: r.refusals,
        }
    }
}

/// Where a refused change stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed anywhere: the caller may retry, or change course.
    NotApplied,
    /// Fleet mode: etcd took the commit but never confirmed it, so it may be live. A retry
    /// with `If-Match` cannot apply it twice.
    MaybeApplied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NotApplied => "not_applied",
            Outcome::MaybeApplied => "maybe_applied",
        }
    }
}

impl CommandError {
    /// Whether the change may be live despite the error.
    pub fn outcome(&self) -> Outcome {
        match self {
            CommandError::Unconfirmed(_) => Outcome::MaybeApplied,
            _ => Outcome::NotApplied,
        }
    }

    /// Structured detail for the JSON error body.
    pub fn detail(&self) -> Value {
        match self {
            CommandError::InvalidConfig(e) => json!({
                "file": e.source_name,
                "problems": e.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            }),
            CommandError::GenerationMoved { expected, current } => {
                json!({"expected": expected, "current": current})
            }
            CommandError::Pins(refusals) => json!(refusals
                .iter()
                .map(|r| json!({"route": r.route, "field": r.field, "version": r.refusal.label, "rule": r.refusal.rule, "message": r.refusal.message}))
                .collect::<Vec<_>>()),
            CommandError::Promotion { refusals, .. } => json!(refusals
                .iter()
                .map(|r| json!({"rule": r.rule, "message": r.message}))
                .collect::<Vec<_>>()),
            _ => Value::Null,
        }
    }
}

/// Why the writer could not open its state.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot build the routing table: {0}")]
    Table(#[source] BuildError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the registry refuses the configured routing:\n  {}", .0.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n  "))]
    Pins(Vec<RouteRefusal>),
    #[error("fleet state in etcd: {0}")]
    Fleet(#[from] FleetError),
}

/// What is live, as the control path reads it: the table the data path serves and the routing
/// state it was built from, published together (the hot table carries no control state).
#[derive(Debug)]
pub struct Live {
    pub table: Arc<RoutingTable>,
    pub state: RoutingState,
}

impl Live {
    /// The state of the route named `name`.
    pub fn route(&self, name: &str) -> Option<&RouteState> {
        self.state.routes.iter().find(|r| r.name == name)
    }
}

/// The single writer of routing state.
#[derive(Debug)]
pub struct Writer {
    inner: Mutex<InForce>,
    table: Arc<ArcSwap<RoutingTable>>,
    live: ArcSwap<Live>,
    metrics: Metrics,
    /// Wakes whoever watches the table (the identity prober) after each swap.
    swapped: tokio::sync::Notify,
    /// The registry file and the runtime stages of the state in force, for `GET /v1/routes`
    /// (read without waiting for a change in progress).
    stages: std::sync::Mutex<RuntimeStages>,
    fleet: Option<Arc<Fleet>>,
    /// MLflow as the registry source of the routes that name a model.
    mlflow: std::sync::OnceLock<Arc<MlflowSource>>,
}

/// Where the registry's stages come from: the file, overlaid by the state's promotions.
#[derive(Clone, Debug, Default)]
pub struct RuntimeStages {
    pub registry: Option<std::path::PathBuf>,
    /// The MLflow versions pinned, as registry entries; `None` without MLflow.
    pub mlflow_versions: Option<Vec<crate::registry::ModelVersion>>,
    pub production: std::collections::BTreeMap<String, Promotion>,
}

impl RuntimeStages {
    fn of(inner: &InForce) -> RuntimeStages {
        RuntimeStages::from_config(&inner.config, &inner.state)
    }

    fn from_config(config: &Config, state: &RoutingState) -> RuntimeStages {
        RuntimeStages {
            registry: config.registry.clone(),
            mlflow_versions: config
                .mlflow
                .as_ref()
                .map(|_| config.mlflow_versions.clone()),
            production: state.production.clone(),
        }
    }
}

/// What the writer holds under its lock: the config and state in force, the versions built
/// for them, where the state is stored, the audit log and the open serving window.
#[derive(Debug)]
struct InForce {
    config: Config,
    state: RoutingState,
    versions: VersionSet,
    store: Store,
    audit: AuditLog,
    window: Window,
    /// Fleet mode: this replica's serving windows closed by other replicas' changes, still to be
    /// recorded.
    pending_windows: Vec<Value>,
}

impl Writer {
    /// Restores the persisted state (merged with `config`, see [`reconcile`]), records the start
    /// in the audit log, and returns the writer with the table it built.
    pub fn open(config: Config, metrics: Metrics) -> Result<Writer, OpenError> {
        let store = FileStore::new(&config.state_dir);
        let persisted = store.load()?;
        let audit = AuditLog::open(
            &config.state_dir,
            persisted.as_ref().and_then(|p| p.audit_head.as_ref()),
        )?;
        let previous = persisted.as_ref().map(|p| &p.state);
        let (routes, notes) = reconcile(&config, previous);
        let state = RoutingState::next(previous.map_or(0, |p| p.generation) + 1, routes, previous);
        check_pins_at_start(&config, &metrics, &state, previous)?;
        let mut versions = VersionSet::new(config.identity.is_some());
        let table =
            build_table(&config, &state, &metrics, &mut versions).map_err(OpenError::Table)?;
        for note in &notes {
            tracing::warn!(route = %note.route, outcome = note.outcome, "{}", note.detail);
        }
        if previous.is_some() {
            tracing::info!(generation = state.generation, path = %store.path().display(), "restored the persisted routing state");
        }
        let prepared = start_record(&audit, previous, &state, &notes);
        store.save(&StateBody {
            format: STATE_FORMAT,
            state: state.clone(),
            audit_head: Some(prepared.head()),
        })?;
        let mut audit = audit;
        audit.append(&prepared)?;
        let table = Arc::new(table);
        publish(&metrics, &table);
        let writer = Writer {
            table: Arc::new(ArcSwap::new(Arc::clone(&table))),
            live: ArcSwap::from_pointee(Live {
                table: Arc::clone(&table),
                state: state.clone(),
            }),
            metrics,
            swapped: tokio::sync::Notify::new(),
            stages: std::sync::Mutex::new(RuntimeStages::from_config(&config, &state)),
            fleet: None,
            mlflow: std::sync::OnceLock::new(),
            inner: Mutex::new(InForce {
                window: Window::open(&table, None),
                config,
                state,
                versions,
                store: Store::File(store),
                audit,
                pending_windows: Vec::new(),
            }),
        };
        Ok(writer)
    }

    /// Fleet mode: joins the fleet's state in etcd (creating it from `config` when it is the first
    /// replica), fills the local copy of the audit chain and records the start in it.
    pub async fn open_fleet(
        config: Config,
        metrics: Metrics,
        fleet: Arc<Fleet>,
    ) -> Result<Writer, OpenError> {
        let mut audit = AuditLog::open(&config.state_dir, None)?;
        audit.set_replica(fleet.replica());
        let cache = StateStore::new(&config.state_dir);
        let mut attempt = 0;
        let (state, revision, versions, table) = loop {
            attempt += 1;
            let shared = match fleet.load().await {
                Ok(shared) => shared,
                // etcd away at start: serve the state this replica last routed by, as a running
                // replica would, and join when etcd answers (the first catch-up does).
                Err(unreachable @ FleetError::Unavailable { .. }) => {
                    // Only this replica's own cache: no head of a file-mode chain, beside a copy
                    // of a fleet's chain (or none yet).
                    let cached = cache.load().map_err(OpenError::State)?.filter(|c| {
                        c.audit_head.is_none() && (audit.is_fleet_copy() || audit.next_seq() == 1)
                    });
                    let Some(cached) = cached else {
                        return Err(unreachable.into());
                    };
                    let (routes, notes) = reconcile(&config, Some(&cached.state));
                    let state =
                        RoutingState::next(cached.state.generation, routes, Some(&cached.state));
                    check_pins_at_start(&config, &metrics, &state, Some(&cached.state))?;
                    let mut versions = VersionSet::new(config.identity.is_some());
                    let table = build_table(&config, &state, &metrics, &mut versions)
                        .map_err(OpenError::Table)?;
                    for note in &notes {
                        tracing::warn!(route = %note.route, outcome = note.outcome, "{}", note.detail);
                    }
                    tracing::warn!(
                        error = %unreachable,
                        generation = state.generation,
                        cache = %cache.path().display(),
                        "etcd is unreachable at start: serving the routing state this replica last applied; changes are refused until etcd answers"
                    );
                    break (state, NOT_JOINED, versions, table);
                }
                Err(e) => return Err(e.into()),
            };
            let mut versions = VersionSet::new(config.identity.is_some());
            let joined = join(
                &config,
                &metrics,
                &fleet,
                &mut audit,
                &mut versions,
                shared.as_ref(),
            )
            .await;
            match joined {
                Ok((state, revision, table)) => break (state, revision, versions, table),
                Err(OpenError::Fleet(FleetError::Stale)) if attempt < 5 => continue,
                Err(e) => return Err(e),
            }
        };
        let table = Arc::new(table);
        publish(&metrics, &table);
        let inner = InForce {
            window: Window::open(&table, None),
            config,
            state,
            versions,
            store: Store::Fleet(EtcdStore::new(fleet, revision, cache)),
            audit,
            pending_windows: Vec::new(),
        };
        inner.cache_fleet_state();
        Ok(Writer {
            table: Arc::new(ArcSwap::new(Arc::clone(&table))),
            live: ArcSwap::from_pointee(Live {
                table: Arc::clone(&table),
                state: inner.state.clone(),
            }),
            metrics,
            swapped: tokio::sync::Notify::new(),
            stages: std::sync::Mutex::new(RuntimeStages::of(&inner)),
            fleet: inner.fleet().cloned(),
            mlflow: std::sync::OnceLock::new(),
            inner: Mutex::new(inner),
        })
    }

    /// Every upstream version this weir has built, including ones no route sends traffic to
    /// any more (their backends' connection pools still need reaping).
    pub async fn versions(&self) -> Vec<Arc<crate::upstream::Version>> {
        self.inner.lock().await.versions.all().cloned().collect()
    }

    /// Fleet mode: the connection to etcd.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// Makes `source` the registry source of the MLflow routes: reloads read its aliases, and
    /// promotions and rollbacks move them. Once, right after opening.
    pub fn attach_mlflow(&self, source: Arc<MlflowSource>) {
        let _ = self.mlflow.set(source);
    }

    pub fn mlflow(&self) -> Option<&Arc<MlflowSource>> {
        self.mlflow.get()
    }

    /// Fleet mode: applies what etcd holds when another replica moved it — fills the local audit
    /// copy, swaps the table — then records this replica's serving windows those changes closed.
    /// Returns the etcd revision this replica is current at: a watch for the next change starts
    /// after it.
    pub async fn sync(&self) -> Result<i64, CommandError> {
        let mut inner = self.inner.lock().await;
        let read_at = self.catch_up(&mut inner).await?;
        while !inner.pending_windows.is_empty() {
            let window = inner.pending_windows.remove(0);
            let generation = inner.state.generation;
            let entry = Entry {
                actor: "weir",
                action: "window",
                route: None,
                before: Value::Null,
                after: Value::Null,
                generation,
                reason: Some("this replica's serving window, closed by another replica's change"),
                window: Some(window.clone()),
            };
            if let Err(e) = self.append_event(&mut inner, entry, false).await {
                inner.pending_windows.insert(0, window);
                return Err(e);
            }
        }
        // A window record committed here is newer than the read.
        Ok(inner
            .store
            .revision()
            .map_or(0, |revision| read_at.max(revision)))
    }

    /// Fleet mode: brings `inner` up to the state in etcd (no-op in file mode or when current).
    /// Returns etcd's revision when the state was read (0 in file mode).
    async fn catch_up(&self, inner: &mut InForce) -> Result<i64, CommandError> {
        self.catch_up_with(inner, None).await
    }

    /// [`Writer::catch_up`] for a reload: with the running config when it can build the
    /// fleet's state, else with `fresh` (the file just re-read), which then becomes this
    /// replica's config — the way out for a replica stuck on a state its old config lacked.
    async fn catch_up_for_reload(
        &self,
        inner: &mut InForce,
        fresh: Option<&Config>,
    ) -> Result<i64, CommandError> {
        let caught_up = self.catch_up_with(inner, None).await;
        let (Err(CommandError::CannotApply(why)), Some(fresh)) = (&caught_up, fresh) else {
            return caught_up;
        };
        let read_at = self.catch_up_with(inner, Some(fresh)).await?;
        tracing::info!(previous = %why, "applied the fleet's routing state with the reloaded config");
        Ok(read_at)
    }

    /// [`Writer::catch_up`], building the table from `fresh` (a reloaded config) when given; the
    /// config is then this replica's.
    async fn catch_up_with(
        &self,
        inner: &mut InForce,
        fresh: Option<&Config>,
    ) -> Result<i64, CommandError> {
        let (Some(fleet), Some(revision)) = (inner.fleet().cloned(), inner.store.revision()) else {
            return Ok(0);
        };
        let Some(shared) = fleet.load().await? else {
            let prefix = fleet.config().prefix.clone();
            return Err(PersistError::Gone { prefix }.into());
        };
        if shared.revision == revision {
            return Ok(shared.read_at);
        }
        if revision == NOT_JOINED {
            return self.join_late(inner, &fleet, &shared).await;
        }
        fill_audit(&mut inner.audit, &fleet, &shared.body)
            .await
            .map_err(cannot_apply)?;
        let state = shared.body.state;
        if state != inner.state {
            let config = fresh.unwrap_or(&inner.config);
            let table = build_table(config, &state, &self.metrics, &mut inner.versions)
                .map_err(|e| CommandError::CannotApply(Box::new(e)))?;
            if let Some(fresh) = fresh {
                inner.config = fresh.clone();
                self.publish_stages(inner);
            }
            tracing::info!(
                generation = state.generation,
                "routing changed by another replica"
            );
            inner.pending_windows.push(inner.window.close());
            self.swap(inner, table, state);
        }
        inner.applied(shared.revision);
        Ok(shared.read_at)
    }

    /// Fleet mode: the join a replica that started without etcd could not do then (see
    /// [`join`]), on the first state etcd gives it; the window it served meanwhile is recorded.
    async fn join_late(
        &self,
        inner: &mut InForce,
        fleet: &Fleet,
        shared: &super::fleet::StoredState,
    ) -> Result<i64, CommandError> {
        let joined = join(
            &inner.config,
            &self.metrics,
            fleet,
            &mut inner.audit,
            &mut inner.versions,
            Some(shared),
        )
        .await;
        let (state, revision, table) = joined.map_err(cannot_apply)?;
        inner.pending_windows.push(inner.window.close());
        self.swap(inner, table, state);
        inner.applied(revision);
        Ok(shared.read_at.max(revision))
    }

    /// The live table, shared with the data path.
    /// The live table and state, one consistent snapshot.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    pub fn table(&self) -> &Arc<ArcSwap<RoutingTable>> {
        &self.table
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Applies one change: validate, build, persist, audit, swap. Returns after the swap.
    ///
    /// Fleet mode: the change is computed on the state this replica last applied; when another
    /// replica changed it first, the transaction fails, the new state is applied here, and the
    /// command is computed again on it (so it is never lost nor applied to stale state) — or,
    /// when the caller sent `If-Match`, refused with 409 because the generation moved.
    pub async fn apply(&self, change: Change) -> Result<Applied, CommandError> {
        let mut inner = self.inner.lock().await;
        // A reload reads the file once; the fleet's newer state is applied with it too, so a
        // replica whose old config could not build that state is fixed by reloading.
        let fresh = match change.command {
            Command::Reload => {
                let fresh = self.reloaded(&inner).await?;
                warn_about_restart_only_settings(&inner.config, &fresh.config);
                // Computed on the fleet's current state, which the old config may not build.
                self.catch_up_for_reload(&mut inner, Some(&fresh.config))
                    .await?;
                Some(fresh)
            }
            Command::Sync => unreachable!("MLflow syncs go through Writer::sync_mlflow"),
            _ => None,
        };
        self.apply_fresh(&mut inner, &change, fresh).await
    }

    /// Applies MLflow's aliases as the watcher read them (`fetched`): routes whose aliases the
    /// policy refuses stay on their last good pins (recorded once, and exported). Does nothing
    /// when the pins in force are already these.
    pub async fn sync_mlflow(&self, fetched: &Fetched) -> Result<Applied, CommandError> {
        let Some(source) = self.mlflow.get() else {
            return Err(CommandError::NothingToReload);
        };
        let mut inner = self.inner.lock().await;
        let settled = source.settle(&inner.config, fetched, Some(&inner.state))?;
        if same_pins(&settled.resolution, &source.last_good()) {
            // What the routing state still names besides the aliases may have moved (the
            // versions a rollback returns to): the config follows, the table is the same.
            inner.config = settled.config.clone();
            self.publish_stages(&inner);
            let refused = source.commit(&settled)?;
            self.record_refusals(&mut inner, &refused).await?;
            return Ok(Applied {
                generation: inner.state.generation,
                changed: false,
                route: None,
                notes: settled.notes,
            });
        }
        let change = Change {
            command: Command::Sync,
            actor: Actor::Mlflow,
            reason: Some("MLflow aliases moved".into()),
            if_match: None,
        };
        let fresh = Fresh {
            config: settled.config.clone(),
            notes: settled.notes.clone(),
            settled: Some(settled),
        };
        self.apply_fresh(&mut inner, &change, Some(fresh)).await
    }

    /// A re-read config, pinned by MLflow's aliases read now (their last good pins while MLflow
    /// is unreachable, said in a note).
    async fn reloaded(&self, inner: &InForce) -> Result<Fresh, CommandError> {
        let config = match (&inner.config.source, self.mlflow.get()) {
            // Quick mode with MLflow: no file, but the aliases are worth reading again.
            (None, Some(_)) => inner.config.clone(),
            _ => fresh_config(&inner.config)?,
        };
        let Some(source) = self.mlflow.get().filter(|_| config.mlflow.is_some()) else {
            return Ok(Fresh {
                config,
                notes: Vec::new(),
                settled: None,
            });
        };
        let mut notes = Vec::new();
        let fetched = match source.fetch(&config, Some(&inner.state)).await {
            Ok(fetched) => fetched,
            Err(e) if e.is_outage() => {
                notes.push(format!("{e}: the MLflow routes keep their pins"));
                Fetched::kept(&source.last_good())
            }
            Err(e) => return Err(SourceError::from(e).into()),
        };
        let settled = source.settle(&config, &fetched, Some(&inner.state))?;
        notes.extend(settled.notes.iter().cloned());
        Ok(Fresh {
            config: settled.config.clone(),
            notes,
            settled: Some(settled),
        })
    }

    /// [`Writer::apply_once`], retried on a stale fleet state; then the MLflow pins of a reload
    /// or sync are kept and their refusals recorded.
    async fn apply_fresh(
        &self,
        inner: &mut InForce,
        change: &Change,
        fresh: Option<Fresh>,
    ) -> Result<Applied, CommandError> {
        let mut attempt = 0;
        let applied = loop {
            attempt += 1;
            match self.apply_once(inner, change, fresh.as_ref()).await {
                Err(CommandError::Stale) if attempt < 5 => {
                    self.catch_up_for_reload(inner, fresh.as_ref().map(|f| &f.config))
                        .await?;
                }
                other => break other?,
            }
        };
        if let (Some(source), Some(settled)) = (
            self.mlflow.get(),
            fresh.as_ref().and_then(|f| f.settled.as_ref()),
        ) {
            let refused = source.commit(settled)?;
            self.record_refusals(inner, &refused).await?;
        }
        Ok(applied)
    }

    /// Records MLflow aliases the policy refused (each new refusal once) in the audit log.
    async fn record_refusals(
        &self,
        inner: &mut InForce,
        refused: &[super::mlflow::Refusal],
    ) -> Result<(), CommandError> {
        for refusal in refused {
            let generation = inner.state.generation;
            let reason = format!(
                "MLflow alias refused, the route stays on its last good pin: {}",
                refusal.message
            );
            let entry = Entry {
                actor: Actor::Mlflow.as_str(),
                action: "mlflow_refused",
                route: Some(&refusal.route),
                before: Value::Null,
                after: Value::Null,
                generation,
                reason: Some(&reason),
                window: None,
            };
            self.append_event(inner, entry, false).await?;
        }
        Ok(())
    }

    async fn apply_once(
        &self,
        inner: &mut InForce,
        change: &Change,
        fresh: Option<&Fresh>,
    ) -> Result<Applied, CommandError> {
        if let Some(expected) = change.if_match {
            if expected != inner.state.generation {
                return Err(CommandError::GenerationMoved {
                    expected,
                    current: inner.state.generation,
                });
            }
        }
        let Proposed {
            routes,
            config: mut new_config,
            mut notes,
        } = inner.routes_after(change, fresh.map(|f| &f.config))?;
        notes.extend(fresh.iter().flat_map(|f| f.notes.iter().cloned()));
        let route_name = change.command.route();
        let before_route = route_name.and_then(|n| inner.state.route(n)).cloned();
        if new_config.is_none() && routes == inner.state.routes {
            return Ok(Applied {
                generation: inner.state.generation,
                changed: false,
                route: before_route,
                notes,
            });
        }

        let config = new_config.as_ref().unwrap_or(&inner.config);
        let mut new_state =
            RoutingState::next(inner.state.generation + 1, routes, Some(&inner.state));
        notes.extend(check_registry(
            config,
            &inner.state,
            &change.command,
            before_route.as_ref(),
            &mut new_state,
        )?);
        let table = build_table(config, &new_state, &self.metrics, &mut inner.versions)
            .map_err(CommandError::Build)?;
        // A promotion or rollback of an MLflow route moves its aliases first: one MLflow
        // refuses is not applied to traffic.
        let mut moved = None;
        if let Some((config, resolution)) = self
            .move_aliases(inner, before_route.as_ref(), &mut new_state, &mut notes)
            .await?
        {
            new_config = Some(config);
            moved = Some(resolution);
        }
        let after_route = route_name.and_then(|n| new_state.route(n)).cloned();
        let (before, after) = match route_name {
            Some(_) => (json!(before_route), json!(after_route)),
            None => (state_json(&inner.state), state_json(&new_state)),
        };
        let reason = reason_with_notes(change.reason.as_deref(), &notes);
        let entry = Entry {
            actor: change.actor.as_str(),
            action: change.command.action(),
            route: route_name,
            before,
            after,
            generation: new_state.generation,
            reason: reason.as_deref(),
            window: Some(inner.window.close()),
        };
        let fenced = change.actor == Actor::Canary;
        // The runtime stage is part of the state: a promotion that cannot be persisted is
        // refused whole (5xx naming why), and nothing else records it.
        inner.persist(&new_state, entry, fenced).await?;

        tracing::info!(
            actor = %change.actor,
            action = change.command.action(),
            route = route_name.unwrap_or("*"),
            generation = new_state.generation,
            "routing changed"
        );
        self.swap(inner, table, new_state);
        if let Some(config) = new_config {
            inner.config = config;
            self.publish_stages(inner);
        }
        if let (Some(source), Some(resolution)) = (self.mlflow.get(), moved) {
            if let Err(e) = source.keep(&resolution) {
                // MLflow and the state agree; only a restart while MLflow is down would serve
                // older kept pins, and it reads the aliases first when MLflow answers.
                tracing::error!(error = %e, "cannot keep the moved MLflow pins");
            }
        }
        Ok(Applied {
            generation: inner.state.generation,
            changed: true,
            route: after_route,
            notes,
        })
    }

    /// When `new_state` changes the stable version of an MLflow route (a promotion, or the
    /// rollback of one), moves the route's aliases in MLflow — after an intent record in the
    /// audit log — and returns the config pinned by the moved aliases and the new pins. The
    /// route's state follows the config's new definition, so the next read of the aliases is
    /// no change. A crash between the MLflow write and the commit is repaired by the next read
    /// (or the restart): MLflow's aliases win, and the intent record says what was under way.
    async fn move_aliases(
        &self,
        inner: &mut InForce,
        before: Option<&RouteState>,
        new_state: &mut RoutingState,
        notes: &mut Vec<String>,
    ) -> Result<Option<(Config, Resolution)>, CommandError> {
        let (Some(source), Some(before)) = (self.mlflow.get(), before) else {
            return Ok(None);
        };
        let Some(binding) = inner
            .config
            .routes
            .iter()
            .find(|r| r.name == before.name)
            .and_then(|r| r.mlflow.clone())
        else {
            return Ok(None);
        };
        let Some(after) = new_state.route(&before.name).cloned() else {
            return Ok(None);
        };
        if after.stable == before.stable {
            return Ok(None);
        }
        let mut resolution = source.last_good();
        let Some(old) = resolution.routes.get(&before.name).cloned() else {
            return Ok(None);
        };
        let intent = format!(
            "moving MLflow alias {} of {} to {} and removing {}, before applying it",
            binding.stable_alias, binding.model, after.stable, binding.candidate_alias
        );
        let entry = Entry {
            actor: "weir",
            action: "mlflow_alias",
            route: Some(&before.name),
            before: json!({"stable": before.stable, "candidate": before.candidate}),
            after: json!({"stable": after.stable, "candidate": Value::Null}),
            generation: inner.state.generation,
            reason: Some(&intent),
            window: None,
        };
        self.append_event(inner, entry, false).await?;
        let pins = source
            .move_aliases(&before.name, &binding, &after.stable, &old)
            .await
            .map_err(SourceError::from)?;
        notes.push(format!(
            "MLflow: {} alias {} → {}, {} removed",
            binding.model,
            binding.stable_alias,
            pins.stable.describe(),
            binding.candidate_alias
        ));
        resolution.routes.insert(before.name.clone(), pins);
        let config = super::mlflow::apply(&inner.config, &resolution);
        if let (Some(route), Some(defined)) = (
            new_state.routes.iter_mut().find(|r| r.name == before.name),
            config.routes.iter().find(|r| r.name == before.name),
        ) {
            route.config_digest = config_digest(defined);
        }
        Ok(Some((config, resolution)))
    }

    /// Puts a durable state's table live: traffic, gauges, watchers, and a new serving window.
    fn swap(&self, inner: &mut InForce, table: RoutingTable, state: RoutingState) {
        // The stages go first: whoever reads the new table's generation also reads its stages.
        inner.state = state;
        self.publish_stages(inner);
        let table = Arc::new(table);
        self.table.store(Arc::clone(&table));
        self.live.store(Arc::new(Live {
            table: Arc::clone(&table),
            state: inner.state.clone(),
        }));
        publish(&self.metrics, &table);
        self.swapped.notify_waiters();
        inner.window = Window::open(&table, Some(&inner.window));
        inner.cache_fleet_state();
    }

    fn publish_stages(&self, inner: &InForce) {
        *self.stages.lock().unwrap_or_else(|p| p.into_inner()) = RuntimeStages::of(inner);
    }

    /// The registry file and the runtime stages of the state in force.
    pub fn stages(&self) -> RuntimeStages {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves after the next table swap.
    pub async fn swapped(&self) {
        self.swapped.notified().await;
    }

    /// The config in force (cold: clones it).
    pub async fn config(&self) -> Config {
        self.inner.lock().await.config.clone()
    }

    /// Where the audit log ends now and the head the state file records, read together under
    /// the writer's lock so they agree (no change of this process is half-written: state ahead of
    /// the log). The dashboard checks the chain up to there, without the lock.
    pub async fn audit_end(&self) -> (std::path::PathBuf, u64, Option<super::state::AuditHead>) {
        let inner = self.inner.lock().await;
        let head = super::state::StateStore::new(&inner.config.state_dir)
            .load()
            .ok()
            .flatten()
            .and_then(|body| body.audit_head);
        let path = inner.audit.path().to_path_buf();
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        (path, len, head)
    }

    /// Records an event that changes no routing (an identity mismatch, say) in the audit chain.
    pub async fn record(
        &self,
        actor: &Actor,
        action: &str,
        route: Option<&str>,
        detail: Value,
        reason: &str,
    ) -> Result<(), CommandError> {
        let mut inner = self.inner.lock().await;
        let generation = inner.state.generation;
        let entry = Entry {
            actor: actor.as_str(),
            action,
            route,
            before: Value::Null,
            after: detail,
            generation,
            reason: Some(reason),
            window: None,
        };
        let fenced = *actor == Actor::Canary;
        self.append_event(&mut inner, entry, fenced).await
    }

    /// Closes the last serving window with a `stop` record (graceful shutdown).
    pub async fn close(&self) -> Result<(), CommandError> {
        let mut inner = self.inner.lock().await;
        let generation = inner.state.generation;
        let window = inner.window.close();
        let entry = Entry {
            actor: "weir",
            action: "stop",
            route: None,
            before: Value::Null,
            after: Value::Null,
            generation,
            reason: None,
            window: Some(window),
        };
        self.append_event(&mut inner, entry, false).await?;
        inner.window = Window::open(&self.table.load(), Some(&inner.window));
        Ok(())
    }
}

impl Writer {
    /// Appends a record that changes no routing. File mode: under the state lock, after any
    /// record another process appended. Fleet mode: after any record another replica appended
    /// (caught up and retried when one got in first).
    async fn append_event(
        &self,
        inner: &mut InForce,
        entry: Entry<'_>,
        fenced: bool,
    ) -> Result<(), CommandError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let state = inner.state.clone();
            let entry = Entry {
                window: entry.window.clone(),
                before: entry.before.clone(),
                after: entry.after.clone(),
                ..entry
            };
            match inner.persist(&state, entry, fenced).await {
                Err(CommandError::Stale) if attempt < 8 => {
                    self.catch_up(inner).await?;
                }
                other => return other,
            }
        }
    }
}

impl InForce {
    /// The routes `change` leads to from the state in force (a reload: the re-read config's,
    /// merged), the config it brings, and the notes for the answer and the audit record.
    fn routes_after(
        &self,
        change: &Change,
        fresh: Option<&Config>,
    ) -> Result<Proposed, CommandError> {
        if let Command::Reload | Command::Sync = change.command {
            let fresh = fresh
                .expect("a reload or sync comes with its config")
                .clone();
            let (routes, notes) = reconcile(&fresh, Some(&self.state));
            // A route MLflow pins changes its definition whenever an alias moves; the MLflow
            // note says how, so "the config changed" would only repeat it less clearly.
            let pinned_by_mlflow = |route: &str| {
                matches!(change.command, Command::Sync)
                    && fresh
                        .routes
                        .iter()
                        .any(|r| r.name == route && r.mlflow.is_some())
            };
            let notes = notes
                .into_iter()
                .filter(|n| !(n.outcome == "config_changed" && pinned_by_mlflow(&n.route)))
                .map(|n| format!("{}: {} ({})", n.route, n.outcome, n.detail))
                .collect();
            return Ok(Proposed {
                routes,
                config: Some(fresh),
                notes,
            });
        }
        let mut routes = self.state.routes.clone();
        let name = change.command.route().unwrap_or_default();
        let Some(route) = routes.iter_mut().find(|r| r.name == name) else {
            let known: Vec<&str> = self.state.routes.iter().map(|r| r.name.as_str()).collect();
            return Err(CommandError::UnknownRoute {
                route: name.to_string(),
                known: known.join(", "),
            });
        };
        route.apply(&change.command, &change.actor, self.config.from_flags)?;
        Ok(Proposed {
            routes,
            config: None,
            notes: Vec::new(),
        })
    }
    fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.store.fleet()
    }

    fn applied(&mut self, revision: i64) {
        self.store.applied(revision);
    }

    fn cache_fleet_state(&self) {
        self.store.keep_copy(&self.state);
    }

    async fn persist(
        &mut self,
        state: &RoutingState,
        entry: Entry<'_>,
        fenced: bool,
    ) -> Result<(), CommandError> {
        Ok(self
            .store
            .commit(&mut self.audit, state, entry, fenced)
            .await?)
    }
}

/// Whether two resolutions pin every route to the same stable and candidate, with the same
/// tags (what they keep for rollbacks aside).
fn same_pins(a: &Resolution, b: &Resolution) -> bool {
    a.routes.len() == b.routes.len()
        && a.routes.iter().all(|(route, pins)| {
            b.routes.get(route).is_some_and(|other| {
                pins.stable == other.stable && pins.candidate == other.candidate
            })
        })
}

/// A reload's or MLflow sync's config, with the MLflow pins it was settled with.
struct Fresh {
    config: Config,
    notes: Vec<String>,
    settled: Option<Settled>,
}

/// What a change proposes before the registry and the build have their say.
struct Proposed {
    routes: Vec<RouteState>,
    /// A reload's re-read config.
    config: Option<Config>,
    notes: Vec<String>,
}

/// The registry's say on a change: a promotion moves its runtime stage (in `new_state`), and
/// every route must stay on versions the registry allows. The registry is re-read for every
/// change, so stages and approvals recorded with `weir registry` count at once; the runtime
/// stages of the state in force overlay the file's. Returns the notes of a stage moved.
fn check_registry(
    config: &Config,
    state: &RoutingState,
    command: &Command,
    before: Option<&RouteState>,
    new_state: &mut RoutingState,
) -> Result<Vec<String>, CommandError> {
    let Some(registry) = load_registry(config)? else {
        return Ok(Vec::new());
    };
    let mut registry = runtime_registry(registry, state);
    let notes = move_runtime_stage(&mut registry, command, before, new_state)?;
    let refusals = pin_refusals(&registry, &new_state.routes, Some(state));
    if !refusals.is_empty() {
        return Err(CommandError::Pins(refusals));
    }
    Ok(notes)
}

/// The audit record's reason: the caller's, then the notes of what the change did.
fn reason_with_notes(reason: Option<&str>, notes: &[String]) -> Option<String> {
    match (reason, notes.is_empty()) {
        (Some(r), true) => Some(r.to_string()),
        (Some(r), false) => Some(format!("{r}; {}", notes.join("; "))),
        (None, false) => Some(notes.join("; ")),
        (None, true) => None,
    }
}

/// A failure to fill the audit copy or build the fleet's state: etcd going away meanwhile is an
/// outage (503); anything else means this replica cannot apply that state.
fn cannot_apply(e: OpenError) -> CommandError {
    match e {
        OpenError::Fleet(e) => CommandError::from(e),
        e => CommandError::CannotApply(Box::new(e)),
    }
}

/// The config file re-read for a reload, keeping the admin token (it came from the environment
/// or a flag, not from the file).
fn fresh_config(current: &Config) -> Result<Config, CommandError> {
    let Some(path) = &current.source else {
        return Err(CommandError::NothingToReload);
    };
    let mut fresh = Config::from_file(path).map_err(CommandError::InvalidConfig)?;
    fresh.admin.token = current.admin.token.clone();
    Ok(fresh)
}

/// Fleet mode: joins the fleet's state `shared` (`None` when this is the first replica): fills
/// the local audit copy, merges `config` into the state, builds its table and commits it with
/// this replica's `start` record. Returns the state, its revision and table; a replica that
/// committed first makes this [`FleetError::Stale`] (read again and retry).
async fn join(
    config: &Config,
    metrics: &Metrics,
    fleet: &Fleet,
    audit: &mut AuditLog,
    versions: &mut VersionSet,
    shared: Option<&super::fleet::StoredState>,
) -> Result<(RoutingState, i64, RoutingTable), OpenError> {
    match shared {
        Some(shared) => fill_audit(audit, fleet, &shared.body).await?,
        None if audit.next_seq() > 1 => {
            let detail = format!(
                "it holds {} records but the fleet at {} has none: it is another weir's history. \
                 Move it aside (or use a fresh [state] dir) to join the fleet",
                audit.next_seq() - 1,
                fleet.config().prefix
            );
            return Err(OpenError::Audit(AuditError::HeadMismatch {
                path: audit.path().to_path_buf(),
                detail,
            }));
        }
        None => {}
    }
    let previous = shared.map(|s| &s.body.state);
    let (routes, notes) = reconcile(config, previous);
    let changed = previous.is_none_or(|p| p.routes != routes);
    let state = RoutingState::next(
        previous.map_or(0, |p| p.generation) + u64::from(changed),
        routes,
        previous,
    );
    check_pins_at_start(config, metrics, &state, previous)?;
    let table = build_table(config, &state, metrics, versions).map_err(OpenError::Table)?;
    let prepared = start_record(audit, previous, &state, &notes);
    let body = StateBody {
        format: STATE_FORMAT,
        state: state.clone(),
        audit_head: Some(prepared.head()),
    };
    let expected = shared.map_or(0, |s| s.revision);
    let revision = fleet.commit(expected, &body, &prepared, false).await?;
    audit.append(&prepared)?;
    for note in &notes {
        tracing::warn!(route = %note.route, outcome = note.outcome, "{}", note.detail);
    }
    tracing::info!(
        generation = state.generation,
        prefix = %fleet.config().prefix,
        replica = fleet.replica(),
        "joined the fleet's routing state in etcd"
    );
    Ok((state, revision, table))
}

/// The `start` record: the state found, the state served, and why they differ.
fn start_record(
    audit: &AuditLog,
    previous: Option<&RoutingState>,
    state: &RoutingState,
    notes: &[super::state::Reconciled],
) -> Prepared {
    let reason = notes
        .iter()
        .map(|n| format!("{}: {} ({})", n.route, n.outcome, n.detail))
        .collect::<Vec<_>>()
        .join("; ");
    audit.prepare(Entry {
        actor: "weir",
        action: "start",
        route: None,
        before: previous.map_or(Value::Null, state_json),
        after: state_json(state),
        generation: state.generation,
        reason: (!reason.is_empty()).then_some(reason.as_str()),
        window: None,
    })
}

/// Refuses to start on routing the registry does not allow; sets `weir_registry_pinned`.
fn check_pins_at_start(
    config: &Config,
    metrics: &Metrics,
    state: &RoutingState,
    previous: Option<&RoutingState>,
) -> Result<(), OpenError> {
    match load_registry(config)? {
        Some(registry) => {
            let registry = runtime_registry(registry, state);
            let refusals = pin_refusals(&registry, &state.routes, previous);
            if !refusals.is_empty() {
                return Err(OpenError::Pins(refusals));
            }
            metrics.set_pinned(true);
        }
        None => {
            tracing::warn!("no model registry configured: routed versions are not checked against approved pins (unpinned); set [registry] file or --registry");
            metrics.set_pinned(false);
        }
    }
    Ok(())
}

/// Fills the local copy of the fleet's audit chain up to the head `body` names. The local copy
/// must be a prefix of the fleet's chain: a copy that ends elsewhere is another history.
async fn fill_audit(
    audit: &mut AuditLog,
    fleet: &Fleet,
    body: &StateBody,
) -> Result<(), OpenError> {
    let Some(head) = &body.audit_head else {
        return Ok(());
    };
    let local_last = audit.next_seq() - 1;
    let diverged = |detail: String| {
        OpenError::Audit(AuditError::HeadMismatch {
            path: audit.path().to_path_buf(),
            detail,
        })
    };
    if local_last > head.seq {
        return Err(diverged(format!(
            "the local copy has {local_last} records, the fleet's chain at {} only {}: it is another history; move it aside",
            fleet.config().prefix,
            head.seq
        )));
    }
    if local_last >= 1 {
        let theirs = fleet.records(local_last, local_last).await?;
        let ours = audit.head().to_string();
        if !theirs[0].ends_with(&format!(",\"hash\":\"{ours}\"}}")) {
            return Err(diverged(format!(
                "its record {local_last} differs from the fleet's record {local_last}: it is another history; move it aside"
            )));
        }
    }
    let mut next = local_last + 1;
    while next <= head.seq {
        let last = head.seq.min(next + AUDIT_PAGE - 1);
        for line in fleet.records(next, last).await? {
            audit.append_foreign(&line)?;
        }
        next = last + 1;
    }
    Ok(())
}

fn warn_about_restart_only_settings(old: &Config, new: &Config) {
    if old.listener.addr != new.listener.addr || old.admin.addr != new.admin.addr {
        tracing::warn!(
            "listener addresses changed in the config; they take effect at the next restart"
        );
    }
    if format!("{:?}{:?}", old.proxy, old.listener) != format!("{:?}{:?}", new.proxy, new.listener)
    {
        tracing::warn!("[proxy] and [listener] settings changed in the config; they take effect at the next restart");
    }
}

/// Publishes a live table's gauges.
fn publish(metrics: &Metrics, table: &RoutingTable) {
    metrics.set_generation(table.generation);
    for route in &table.routes {
        metrics.set_weight(&route.name, route.weight);
    }
}

fn state_json(state: &RoutingState) -> Value {
    json!(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unconfirmed_commit_may_have_been_applied() {
        let unconfirmed = CommandError::from(FleetError::Unconfirmed {
            endpoints: "127.0.0.1:2379".into(),
            detail: "timed out".into(),
        });
        assert_eq!(unconfirmed.outcome(), Outcome::MaybeApplied);
        assert!(unconfirmed.to_string().contains("it may have been applied"));
        let away = CommandError::from(FleetError::Unavailable {
            endpoints: "127.0.0.1:2379".into(),
            detail: "connection refused".into(),
        });
        assert_eq!(away.outcome(), Outcome::NotApplied);
        // The etcd error stays the source, not a flattened string.
        let source = std::error::Error::source(&away).expect("a source");
        assert!(
            source.to_string().contains("connection refused"),
            "{source}"
        );
        assert_eq!(CommandError::Stale.outcome(), Outcome::NotApplied);
        assert_eq!(CommandError::NothingToReload.outcome(), Outcome::NotApplied);
    }
}
