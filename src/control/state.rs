//! Routing state: what admin calls and the canary change (stable, candidate, weight, pause,
//! rollback), persisted so a restart serves what was last acknowledged.
//!
//! Invariant: the state file on disk is always complete — written to a temp file, fsynced,
//! renamed, the directory fsynced — and carries a SHA-256 of its body, so a torn or edited file
//! is refused instead of silently replaced by the config's weights.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::audit::sha256_hex;
pub use super::audit::AuditHead;
use super::command::{Actor, Command};
use crate::config::units::MAX_BASIS_POINTS;
use crate::config::{Config, RouteConfig, StickyKey};
use crate::registry::Stage;

/// The live, changeable part of one route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteState {
    pub name: String,
    pub stable: String,
    pub candidate: Option<String>,
    /// Candidate share in basis points; traffic sees 0 while the candidate is rolled back.
    pub weight: u16,
    /// Frozen against the canary controller (admins may still change the weight).
    pub paused: bool,
    /// The candidate was rolled back: it takes no traffic until an admin sets a weight again.
    pub rolled_back: bool,
    /// The prior stable version after a promotion: where a rollback returns to.
    pub rollback_target: Option<String>,
    /// SHA-256 of the config definition this state grew from; a changed definition wins.
    pub config_digest: String,
}

impl RouteState {
    pub fn from_config(route: &RouteConfig) -> RouteState {
        RouteState {
            name: route.name.clone(),
            stable: route.stable.clone(),
            candidate: route.candidate.clone(),
            weight: route.weight,
            paused: false,
            rolled_back: false,
            rollback_target: None,
            config_digest: config_digest(route),
        }
    }

    /// `stable`, `canary`, `paused` or `rolled_back`.
    pub fn status(&self) -> &'static str {
        match (&self.candidate, self.rolled_back, self.paused) {
            (None, _, _) => "stable",
            (Some(_), true, _) => "rolled_back",
            (Some(_), false, true) => "paused",
            (Some(_), false, false) => "canary",
        }
    }

    /// The candidate that takes traffic, if any.
    pub fn serving_candidate(&self) -> Option<&str> {
        self.candidate.as_deref().filter(|_| !self.rolled_back)
    }
}

/// Why [`RouteState::apply`] refused a command; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// `how` says how a candidate comes to this route: a reload, or a restart in quick mode.
    #[error("route {route} has no candidate{}: {how}", .promoted_from.as_ref().map(|p| format!(" (its last candidate was promoted; `weir admin rollback {route}` returns to {p})")).unwrap_or_default())]
    NoCandidate {
        route: String,
        promoted_from: Option<String>,
        how: &'static str,
    },
    /// The command does not fit the route's state (a paused route, nothing to roll back, …).
    #[error("{0}")]
    Conflict(String),
    /// A value outside what the command takes.
    #[error("{0}")]
    OutOfRange(String),
}

impl RouteState {
    /// Applies one route command from `actor`. `quick`: weir runs without a config file (which
    /// changes how a refusal says a candidate comes). `Reload` is not a route command.
    pub fn apply(
        &mut self,
        command: &Command,
        actor: &Actor,
        quick: bool,
    ) -> Result<(), ApplyError> {
        let name = self.name.clone();
        let no_candidate = |state: &RouteState| ApplyError::NoCandidate {
            route: state.name.clone(),
            promoted_from: state.rollback_target.clone(),
            how: if quick {
                "this weir runs without a config file, so a new candidate comes with a restart: \
                 `weir serve --stable ... --candidate MODEL@VERSION=URL`, or run from a config file \
                 (`weir serve --config FILE`) to change versions with a reload"
            } else {
                "set `candidate` for it in the config and reload"
            },
        };
        match command {
            Command::SetWeight { basis_points, .. } => {
                if *basis_points > MAX_BASIS_POINTS {
                    return Err(ApplyError::OutOfRange(format!(
                        "weight {basis_points} basis points is above 10000 (100%)"
                    )));
                }
                if self.candidate.is_none() {
                    return Err(no_candidate(self));
                }
                if self.paused && *actor == Actor::Canary {
                    return Err(ApplyError::Conflict(format!(
                        "route {name} is paused: the canary controller may not change its weight until it is resumed"
                    )));
                }
                if self.rolled_back || self.weight != *basis_points {
                    self.weight = *basis_points;
                    // An explicit weight from an admin brings a rolled-back candidate back.
                    self.rolled_back = false;
                }
            }
            Command::Promote { .. } => {
                let Some(candidate) = self.candidate.clone() else {
                    return Err(no_candidate(self));
                };
                if self.rolled_back {
                    return Err(ApplyError::Conflict(format!(
                        "route {name}: candidate {candidate} was rolled back; set a weight to bring it back before promoting it"
                    )));
                }
                self.rollback_target = Some(std::mem::replace(&mut self.stable, candidate));
                self.candidate = None;
                self.weight = 0;
                self.paused = false;
            }
            Command::Rollback { .. } => {
                if self.candidate.is_some() && !self.rolled_back {
                    self.weight = 0;
                    self.rolled_back = true;
                } else if let Some(prior) = self.rollback_target.take() {
                    // Undo the promotion: the prior stable returns, the demoted version is kept as a
                    // rolled-back candidate so the table says what was undone.
                    self.candidate = Some(std::mem::replace(&mut self.stable, prior));
                    self.rolled_back = true;
                    self.weight = 0;
                } else {
                    return Err(ApplyError::Conflict(format!(
                        "route {name}: nothing to roll back (no active candidate and no prior stable version)"
                    )));
                }
            }
            Command::Pause { .. } => self.paused = true,
            Command::Resume { .. } => self.paused = false,
            Command::Reload | Command::Sync => {
                unreachable!("reloads and MLflow syncs are not route commands")
            }
        }
        Ok(())
    }
}

/// Every route's state, at one generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingState {
    pub generation: u64,
    pub routes: Vec<RouteState>,
    /// Versions this weir promoted to production, by label: the runtime stage. The registry
    /// file is reviewed input under source control (often mounted read-only), so a promotion is
    /// recorded here, persisted and audited with the routing it belongs to (in etcd in fleet
    /// mode), and overlays the file's stage (see [`crate::control::pins::runtime_registry`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub production: BTreeMap<String, Promotion>,
}

/// A version a running weir promoted to production.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promotion {
    /// The registry stage it had when it was promoted.
    pub from: Stage,
    /// The route whose canary (or admin) promoted it.
    pub route: String,
    /// The first generation that served it as production.
    pub generation: u64,
    /// When, in RFC 3339.
    pub at: String,
}

impl RoutingState {
    /// Generation 1 straight from the config, nothing persisted.
    pub fn from_config(config: &Config) -> RoutingState {
        RoutingState {
            generation: 1,
            routes: config.routes.iter().map(RouteState::from_config).collect(),
            production: BTreeMap::new(),
        }
    }

    /// The state at `generation` with `routes`, keeping the runtime stages of `previous`.
    pub fn next(
        generation: u64,
        routes: Vec<RouteState>,
        previous: Option<&RoutingState>,
    ) -> RoutingState {
        RoutingState {
            generation,
            routes,
            production: previous.map(|p| p.production.clone()).unwrap_or_default(),
        }
    }

    pub fn route(&self, name: &str) -> Option<&RouteState> {
        self.routes.iter().find(|r| r.name == name)
    }
}

/// What the state file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateBody {
    pub format: u32,
    pub state: RoutingState,
    pub audit_head: Option<AuditHead>,
}

pub const STATE_FORMAT: u32 = 1;
pub const STATE_FILE: &str = "routing-state.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the state file {path} is corrupt ({why}). weir will not fall back to the config's weights on its own: \
         restore the file from a backup, or move it aside to start from the config (the audit log keeps the history)"
    )]
    Corrupt { path: PathBuf, why: String },
    #[error("cannot write the state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The state file in a state directory.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    path: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            dir: dir.to_path_buf(),
            path: dir.join(STATE_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and checks the state file; `None` when there is none yet.
    pub fn load(&self) -> Result<Option<StateBody>, StateError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        decode(&bytes).map(Some).map_err(|why| StateError::Corrupt {
            path: self.path.clone(),
            why,
        })
    }

    /// Writes the state durably: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self, body: &StateBody) -> Result<(), StateError> {
        let write_error = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(write_error)?;
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut file = File::create(&tmp).map_err(write_error)?;
        file.write_all(&encode(body)).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(write_error)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(write_error)?;
        Ok(())
    }
}

/// An exclusive lock on a state directory, held while the state file and audit log change, so a
/// running weir and `weir registry` commands append to one chain in turn.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    pub fn acquire(dir: &Path) -> std::io::Result<StateLock> {
        fs::create_dir_all(dir)?;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        file.lock()?;
        Ok(StateLock { _file: file })
    }
}

/// Two lines: the body as JSON, then `sha256:<hex of the first line's bytes>`.
fn encode(body: &StateBody) -> Vec<u8> {
    let json = serde_json::to_string(body).expect("state serializes");
    format!("{json}\nsha256:{}\n", sha256_hex(json.as_bytes())).into_bytes()
}

fn decode(bytes: &[u8]) -> Result<StateBody, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let mut lines = text.split('\n');
    let json = lines.next().unwrap_or_default();
    let Some(sum) = lines.next().and_then(|l| l.strip_prefix("sha256:")) else {
        return Err("the checksum line is missing: the file was cut short".into());
    };
    if lines.any(|l| !l.is_empty()) {
        return Err("unexpected content after the checksum line".into());
    }
    let actual = sha256_hex(json.as_bytes());
    if sum != actual {
        return Err(format!(
            "checksum mismatch: the file says {sum}, its content hashes to {actual}"
        ));
    }
    let body: StateBody =
        serde_json::from_str(json).map_err(|e| format!("unreadable content: {e}"))?;
    if body.format != STATE_FORMAT {
        return Err(format!(
            "format {} is not {STATE_FORMAT}, the one this weir reads",
            body.format
        ));
    }
    Ok(body)
}

/// SHA-256 of a route's definition in the config (everything but its name).
pub fn config_digest(route: &RouteConfig) -> String {
    let sticky = route.sticky.as_ref().map(|s| match s {
        StickyKey::Header(h) => format!("header:{h}"),
        StickyKey::Cookie(c) => format!("cookie:{c}"),
        StickyKey::Field(f) => format!("field:{f}"),
    });
    // serde_json maps keep keys sorted, so this is canonical.
    let mut definition = serde_json::json!({
        "prefix": route.prefix,
        "host": route.host,
        "stable": route.stable,
        "candidate": route.candidate,
        "weight": route.weight,
        "sticky": sticky,
        "allow_override": route.allow_override,
    });
    // Added later: present only when set, so the digests of routes without them stay as they
    // were (a changed digest resets a route's persisted state).
    if !route.models.is_empty() {
        definition["models"] = serde_json::json!(route.models);
    }
    if let Some(header) = &route.model_header {
        definition["model_header"] = serde_json::json!(header.as_str());
    }
    sha256_hex(definition.to_string().as_bytes())
}

/// One decision taken while merging persisted state with the config, for the log and the audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconciled {
    pub route: String,
    pub outcome: &'static str,
    pub detail: String,
}

/// Merges persisted route states with the config.
///
/// Precedence: a route whose config definition is unchanged keeps its persisted state (weights,
/// versions, pause, rollback). A route that is new, or whose definition in the config changed,
/// starts from the config. A persisted route naming a version the config no longer defines also
/// starts from the config. Routes no longer in the config are dropped.
pub fn reconcile(
    config: &Config,
    persisted: Option<&RoutingState>,
) -> (Vec<RouteState>, Vec<Reconciled>) {
    let mut notes = Vec::new();
    let mut routes = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        let fresh = RouteState::from_config(route);
        let kept = persisted.and_then(|p| p.route(&route.name));
        let state = match kept {
            None => {
                if persisted.is_some() {
                    notes.push(Reconciled {
                        route: route.name.clone(),
                        outcome: "added",
                        detail: "new route in the config".into(),
                    });
                }
                fresh
            }
            Some(old) if old.config_digest != fresh.config_digest => {
                notes.push(Reconciled {
                    route: route.name.clone(),
                    outcome: "config_changed",
                    detail: "its definition in the config changed: the config wins over the persisted state".into(),
                });
                fresh
            }
            Some(old) => {
                let missing = [
                    Some(&old.stable),
                    old.candidate.as_ref(),
                    old.rollback_target.as_ref(),
                ]
                .into_iter()
                .flatten()
                .find(|label| config.version(label).is_none());
                match missing {
                    Some(label) => {
                        notes.push(Reconciled {
                            route: route.name.clone(),
                            outcome: "version_removed",
                            detail: format!("persisted state names {label}, which the config no longer defines: the config wins"),
                        });
                        fresh
                    }
                    None => old.clone(),
                }
            }
        };
        routes.push(state);
    }
    if let Some(p) = persisted {
        for old in &p.routes {
            if config.routes.iter().all(|r| r.name != old.name) {
                notes.push(Reconciled {
                    route: old.name.clone(),
                    outcome: "removed",
                    detail: "no longer in the config".into(),
                });
            }
        }
    }
    (routes, notes)
}

#[cfg(test)]
mod apply_tests {
    use super::*;

    fn canary(weight: u16) -> RouteState {
        RouteState {
            name: "chat".into(),
            stable: "m@v1".into(),
            candidate: Some("m@v2".into()),
            weight,
            paused: false,
            rolled_back: false,
            rollback_target: None,
            config_digest: String::new(),
        }
    }

    fn set_weight(basis_points: u16) -> Command {
        Command::SetWeight {
            route: "chat".into(),
            basis_points,
        }
    }

    fn route_command(make: fn(String) -> Command) -> Command {
        make("chat".into())
    }

    fn admin() -> Actor {
        Actor::Operator("admin:test".into())
    }

    #[test]
    fn set_weight_moves_the_split_and_brings_a_rolled_back_candidate_back() {
        let mut route = canary(100);
        route.apply(&set_weight(500), &admin(), false).unwrap();
        assert_eq!(route.weight, 500);

        route.rolled_back = true;
        route.apply(&set_weight(500), &admin(), false).unwrap();
        assert!(
            !route.rolled_back,
            "an explicit weight brings the candidate back"
        );

        let refused = route.apply(&set_weight(10_001), &admin(), false);
        assert!(
            matches!(refused, Err(ApplyError::OutOfRange(_))),
            "{refused:?}"
        );
        assert_eq!(route.weight, 500);
    }

    #[test]
    fn a_pause_holds_off_the_canary_controller_but_not_an_operator() {
        let mut route = canary(100);
        route
            .apply(
                &route_command(|route| Command::Pause { route }),
                &admin(),
                false,
            )
            .unwrap();
        assert!(route.paused);
        let refused = route.apply(&set_weight(200), &Actor::Canary, false);
        assert!(
            matches!(refused, Err(ApplyError::Conflict(_))),
            "{refused:?}"
        );
        assert_eq!(route.weight, 100);
        route.apply(&set_weight(200), &admin(), false).unwrap();
        assert_eq!(route.weight, 200);
        route
            .apply(
                &route_command(|route| Command::Resume { route }),
                &admin(),
                false,
            )
            .unwrap();
        assert!(!route.paused);
        route
            .apply(&set_weight(300), &Actor::Canary, false)
            .unwrap();
        assert_eq!(route.weight, 300);
    }

    #[test]
    fn promote_makes_the_candidate_stable_and_keeps_the_prior_as_the_rollback_target() {
        let mut route = canary(5000);
        route.paused = true;
        let promote = route_command(|route| Command::Promote { route });
        route.apply(&promote, &Actor::Canary, false).unwrap();
        assert_eq!(route.stable, "m@v2");
        assert_eq!(route.candidate, None);
        assert_eq!(route.rollback_target.as_deref(), Some("m@v1"));
        assert_eq!((route.weight, route.paused), (0, false));

        let refused = route.apply(&promote, &admin(), false);
        let Err(ApplyError::NoCandidate {
            promoted_from, how, ..
        }) = refused
        else {
            panic!("{refused:?}");
        };
        assert_eq!(promoted_from.as_deref(), Some("m@v1"));
        assert!(how.contains("reload"), "{how}");
        let Err(ApplyError::NoCandidate { how, .. }) = route.apply(&promote, &admin(), true) else {
            panic!("quick mode refuses too");
        };
        assert!(how.contains("restart"), "{how}");

        let mut rolled_back = canary(0);
        rolled_back.rolled_back = true;
        let refused = rolled_back.apply(&promote, &admin(), false);
        assert!(
            matches!(refused, Err(ApplyError::Conflict(_))),
            "{refused:?}"
        );
        assert_eq!(rolled_back.stable, "m@v1");
    }

    #[test]
    fn rollback_stops_a_canary_or_undoes_a_promotion_or_says_there_is_nothing() {
        let rollback = route_command(|route| Command::Rollback { route });
        let mut route = canary(5000);
        route.apply(&rollback, &Actor::Canary, false).unwrap();
        assert_eq!((route.weight, route.rolled_back), (0, true));
        assert_eq!(route.stable, "m@v1");

        let mut promoted = canary(0);
        promoted.candidate = None;
        promoted.stable = "m@v2".into();
        promoted.rollback_target = Some("m@v1".into());
        promoted.apply(&rollback, &admin(), false).unwrap();
        assert_eq!(promoted.stable, "m@v1");
        assert_eq!(promoted.candidate.as_deref(), Some("m@v2"));
        assert_eq!((promoted.weight, promoted.rolled_back), (0, true));
        assert_eq!(promoted.rollback_target, None);

        let mut nothing = canary(0);
        nothing.candidate = None;
        let refused = nothing.apply(&rollback, &admin(), false);
        assert!(
            matches!(refused, Err(ApplyError::Conflict(_))),
            "{refused:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> StateBody {
        StateBody {
            format: STATE_FORMAT,
            state: RoutingState {
                generation: 7,
                routes: vec![RouteState {
                    name: "chat".into(),
                    stable: "m@v1".into(),
                    candidate: Some("m@v2".into()),
                    weight: 500,
                    paused: false,
                    rolled_back: false,
                    rollback_target: None,
                    config_digest: "x".into(),
                }],
                production: BTreeMap::new(),
            },
            audit_head: None,
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("weir-state-unit-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn state_round_trips_and_leaves_no_temp_file() {
        let dir = temp_dir("roundtrip");
        let store = StateStore::new(&dir);
        assert_eq!(store.load().unwrap(), None);
        store.save(&body()).unwrap();
        assert_eq!(store.load().unwrap(), Some(body()));
        assert!(!dir.join(format!("{STATE_FILE}.tmp")).exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn truncated_or_edited_files_are_refused_with_the_reason() {
        let dir = temp_dir("corrupt");
        let store = StateStore::new(&dir);
        store.save(&body()).unwrap();
        let good = fs::read(store.path()).unwrap();

        fs::write(store.path(), &good[..good.len() / 2]).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("cut short"),
            "{err}"
        );

        let edited = String::from_utf8(good.clone())
            .unwrap()
            .replace("500", "900");
        fs::write(store.path(), edited).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(err.contains(&store.path().display().to_string()), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
