//! Version pins against the registry: which routed versions the registry allows, checked at
//! `weir check`, start, reload and every admin change.

use crate::config::Config;
use crate::control::state::{RouteState, RoutingState};
use crate::metrics::Role;
use crate::registry::{check_servable, PinRefusal, Registry, RegistryError, Stage};

/// The registry the config names — the file, with the MLflow versions the routes are pinned
/// to (read from their tags) — or `None` when weir runs unpinned.
pub fn load_registry(config: &Config) -> Result<Option<Registry>, RegistryError> {
    let mut registry = match config.registry.as_deref() {
        Some(path) => Registry::load(path)?,
        None if config.mlflow.is_some() => Registry::default(),
        None => return Ok(None),
    };
    for version in &config.mlflow_versions {
        registry.versions.retain(|v| v.label() != version.label());
        registry.versions.push(version.clone());
    }
    Ok(Some(registry))
}

/// The registry as it stands at runtime: the file's stages, with the versions `state` records
/// as promoted by a running weir moved to production. A version the file itself has since moved
/// past approval (production, deprecated, retired) keeps the file's stage: the reviewed input
/// catches up with, or overrules, what the runtime did.
pub fn runtime_registry(mut registry: Registry, state: &RoutingState) -> Registry {
    for label in state.production.keys() {
        if let Some(v) = registry.find_mut(label) {
            if matches!(v.stage, Stage::Candidate | Stage::Approved) {
                v.stage = Stage::Production;
            }
        }
    }
    registry
}

/// A pin refused in one route.
#[derive(Clone, Debug)]
pub struct RouteRefusal {
    pub route: String,
    pub field: &'static str,
    pub refusal: PinRefusal,
}

impl std::fmt::Display for RouteRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "route {}: {}", self.route, self.refusal)
    }
}

/// Every pin of `routes` the registry refuses. A version already serving in the same route in
/// `previous` counts as existing there (deprecated versions may keep serving, not spread).
pub fn pin_refusals(
    registry: &Registry,
    routes: &[RouteState],
    previous: Option<&RoutingState>,
) -> Vec<RouteRefusal> {
    let mut refusals = Vec::new();
    for route in routes {
        let before = previous.and_then(|p| p.route(&route.name));
        let served_before = |label: &str| {
            before.is_some_and(|b| b.stable == label || b.serving_candidate() == Some(label))
        };
        let pins = [
            ("stable", Some(route.stable.as_str()), Role::Stable),
            ("candidate", route.serving_candidate(), Role::Candidate),
        ];
        for (field, label, role) in pins {
            let Some(label) = label else { continue };
            if let Err(refusal) = check_servable(registry, label, role, !served_before(label)) {
                refusals.push(RouteRefusal {
                    route: route.name.clone(),
                    field,
                    refusal,
                });
            }
        }
    }
    refusals
}
