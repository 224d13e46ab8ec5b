//! Turns a validated [`Config`] into a [`RoutingTable`], resolving every version, header value and
//! metric handle up front.

use std::collections::HashMap;
use std::sync::Arc;

use super::state::RoutingState;
use crate::config::Config;
use crate::data::shadow::{ShadowRoute, ShadowStats};
use crate::data::split::cohort_seed;
use crate::data::table::{Route, RoutingTable, Target};
use crate::data::upstream::Version;
use crate::metrics::{Metrics, Role};

/// The upstream versions in use, kept across table rebuilds so in-flight counts and ejections
/// carry over when only weights change.
#[derive(Debug, Default)]
pub struct VersionSet {
    versions: HashMap<String, Arc<Version>>,
    /// Shadow counters per (route, candidate), kept so the rolling agreement survives rebuilds.
    shadows: HashMap<(String, String), Arc<ShadowStats>>,
    /// With an identity probe, new backends wait for it before taking traffic.
    probing: bool,
}

impl VersionSet {
    pub fn new(probing: bool) -> VersionSet {
        VersionSet {
            versions: HashMap::new(),
            shadows: HashMap::new(),
            probing,
        }
    }

    /// Every version built so far, routed to now or not.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Version>> {
        self.versions.values()
    }

    fn get_or_create(&mut self, config: &Config, label: &str) -> Option<Arc<Version>> {
        let wanted = config.version(label)?;
        let reuse = self.versions.get(label).filter(|v| v.same_as(wanted));
        if let Some(v) = reuse {
            return Some(Arc::clone(v));
        }
        let v = Arc::new(Version::from_config(
            wanted,
            !self.probing,
            config.proxy.pool_max_idle_per_backend,
        ));
        self.versions.insert(label.to_string(), Arc::clone(&v));
        Some(v)
    }
}

/// Builds the routing table for `state` over the routes and versions of `config`: the config
/// gives each route its match and stickiness, the state its versions and weight.
pub fn build_table(
    config: &Config,
    state: &RoutingState,
    metrics: &Metrics,
    versions: &mut VersionSet,
) -> Result<RoutingTable, String> {
    let mut routes = Vec::with_capacity(config.routes.len());
    for r in &config.routes {
        let live = state
            .route(&r.name)
            .ok_or_else(|| format!("route {} has no state", r.name))?;
        let mut target = |label: &str, role: Role| -> Result<Target, String> {
            let version = versions
                .get_or_create(config, label)
                .ok_or_else(|| format!("route {}: version {label} is not defined", r.name))?;
            Ok(Target {
                stats: metrics.target(&r.name, label, role),
                version,
                role,
            })
        };
        if r.canary.is_some() {
            metrics.canary_route(&r.name);
        }
        let stable = target(&live.stable, Role::Stable)?;
        let candidate = live
            .serving_candidate()
            .map(|c| target(c, Role::Candidate))
            .transpose()?;
        let weight = if candidate.is_some() { live.weight } else { 0 };
        let shadow = match (&candidate, r.mirror) {
            (Some(c), mirror) if mirror > 0 => {
                let stats = versions
                    .shadows
                    .entry((r.name.clone(), c.version.label.to_string()))
                    .or_insert_with(|| Arc::new(metrics.shadow(&r.name, &c.version.label)));
                Some(Arc::new(ShadowRoute {
                    mirror,
                    compare: Arc::new(r.compare.clone()),
                    stats: Arc::clone(stats),
                }))
            }
            _ => None,
        };
        routes.push(Route {
            name: r.name.as_str().into(),
            prefix: r.prefix.clone(),
            host: r.host.clone(),
            stable,
            cohort_seed: candidate
                .as_ref()
                .map_or(0, |c| cohort_seed(&c.version.label)),
            candidate,
            weight,
            sticky: r.sticky.clone(),
            allow_override: r.allow_override,
            shadow,
            state: live.clone(),
        });
    }
    RoutingTable::sort_routes(&mut routes);
    Ok(RoutingTable {
        generation: state.generation,
        routes,
    })
}
