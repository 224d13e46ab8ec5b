//! Turns a validated [`Config`] into a [`RoutingTable`], resolving every version, header value and
//! metric handle up front.

use std::collections::HashMap;
use std::sync::Arc;

use super::state::RoutingState;
use crate::config::{Config, ModelsEndpoint};
use crate::data::split::cohort_seed;
use crate::data::table::{Route, RoutingTable, Target};
use crate::metrics::{Metrics, Role};
use crate::shadow::tee::{ShadowRoute, ShadowStats};
use crate::upstream::Version;

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

/// Why a routing table cannot be built from a config and a state: they do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("route {route} is in the config but has no routing state")]
    NoState { route: String },
    #[error("route {route} routes to {version}, which the config does not define")]
    UnknownVersion { route: String, version: String },
}

/// Builds the routing table for `state` over the routes and versions of `config`: the config
/// gives each route its match and stickiness, the state its versions and weight.
pub fn build_table(
    config: &Config,
    state: &RoutingState,
    metrics: &Metrics,
    versions: &mut VersionSet,
) -> Result<RoutingTable, BuildError> {
    let mut routes = Vec::with_capacity(config.routes.len());
    for r in &config.routes {
        let live = state.route(&r.name).ok_or_else(|| BuildError::NoState {
            route: r.name.clone(),
        })?;
        let mut target = |label: &str, role: Role| -> Result<Target, BuildError> {
            let version = versions.get_or_create(config, label).ok_or_else(|| {
                BuildError::UnknownVersion {
                    route: r.name.clone(),
                    version: label.to_string(),
                }
            })?;
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
            models: r.models.iter().map(|m| m.as_str().into()).collect(),
            model_header: r.model_header.clone(),
            api: r.api,
            shadow,
        });
    }
    RoutingTable::sort_routes(&mut routes);
    let models_list = models_list(config, &routes);
    Ok(RoutingTable {
        generation: state.generation,
        routes,
        models_list,
    })
}

/// `GET /v1/models` as weir answers it, when it does: OpenAI's list of the models clients may
/// name — the routes' `model` names, or without any, the models of the stable versions.
fn models_list(config: &Config, routes: &[Route]) -> Option<serde_json::Value> {
    let by_model = routes.iter().any(|r| !r.models.is_empty());
    let answer = match config.listener.models_endpoint {
        ModelsEndpoint::Weir => true,
        ModelsEndpoint::Stable => false,
        ModelsEndpoint::Auto => by_model,
    };
    if !answer {
        return None;
    }
    let mut names: Vec<&str> = if by_model {
        routes
            .iter()
            .flat_map(|r| r.models.iter().map(|m| &**m))
            .collect()
    } else {
        routes
            .iter()
            .map(|r| {
                let label = &*r.stable.version.label;
                label.split_once('@').map_or(label, |(model, _)| model)
            })
            .collect()
    };
    names.sort_unstable();
    names.dedup();
    let data: Vec<serde_json::Value> = names
        .iter()
        .map(
            |id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "weir"}),
        )
        .collect();
    Some(serde_json::json!({"object": "list", "data": data}))
}

/// The split as tables built from config draw it (the draw itself is `data::split`'s).
#[cfg(test)]
mod split_tests {
    use http::HeaderMap;

    use super::{build_table, VersionSet};
    use crate::data::split::{BadOverride, OVERRIDE_HEADER};
    use crate::data::table::RoutingTable;
    use crate::metrics::{Metrics, Role};

    fn table(weight: &str, candidate: &str, extra: &str) -> RoutingTable {
        let text = format!(
            r#"
            [[versions]]
            model = "m"
            version = "v1"
            backends = ["http://127.0.0.1:1"]
            [[versions]]
            model = "m"
            version = "v2"
            backends = ["http://127.0.0.1:2"]
            [[versions]]
            model = "m"
            version = "v3"
            backends = ["http://127.0.0.1:3"]
            [[routes]]
            name = "r"
            stable = "m@v1"
            candidate = "{candidate}"
            weight = "{weight}"
            {extra}
            "#
        );
        let config = crate::Config::from_toml_str(&text, "test").unwrap();
        let state = crate::control::state::RoutingState::from_config(&config);
        build_table(&config, &state, &Metrics::new(), &mut VersionSet::default()).unwrap()
    }

    #[test]
    fn random_split_share_is_within_tolerance() {
        const N: u32 = 200_000;
        let headers = HeaderMap::new();
        for (weight, bp) in [
            ("0%", 0u32),
            ("0.5%", 50),
            ("10%", 1000),
            ("50%", 5000),
            ("100%", 10_000),
        ] {
            let t = table(weight, "m@v2", "");
            let route = &t.routes[0];
            let to_candidate = (0..N)
                .filter(|_| route.choose(&headers).unwrap().role == Role::Candidate)
                .count() as f64;
            let p = f64::from(bp) / 10_000.0;
            let expected = p * f64::from(N);
            let tolerance = 5.0 * (f64::from(N) * p * (1.0 - p)).sqrt();
            assert!(
                (to_candidate - expected).abs() <= tolerance,
                "weight {weight}: {to_candidate} to candidate, expected {expected} ± {tolerance}"
            );
        }
    }

    fn cohort(t: &RoutingTable, keys: &[String]) -> Vec<bool> {
        keys.iter()
            .map(|k| {
                let mut h = HeaderMap::new();
                h.insert("x-session", k.parse().unwrap());
                t.routes[0].choose(&h).unwrap().role == Role::Candidate
            })
            .collect()
    }

    #[test]
    fn sticky_keys_only_move_towards_the_candidate_as_weight_rises() {
        let keys: Vec<String> = (0..5000).map(|i| format!("session-{i}")).collect();
        let sticky = r#"sticky_header = "x-session""#;
        let mut previous = vec![false; keys.len()];
        for weight in ["5%", "20%", "50%"] {
            let t = table(weight, "m@v2", sticky);
            let now = cohort(&t, &keys);
            assert_eq!(now, cohort(&t, &keys), "same key, same version");
            for (i, (was, is)) in previous.iter().zip(&now).enumerate() {
                assert!(!was || *is, "{} moved back to stable at {weight}", keys[i]);
            }
            previous = now;
        }
        let share = previous.iter().filter(|c| **c).count();
        assert!((2250..=2750).contains(&share), "{share} of 5000 at 50%");

        let v2 = cohort(&table("20%", "m@v2", sticky), &keys);
        let v3 = cohort(&table("20%", "m@v3", sticky), &keys);
        let both = v2.iter().zip(&v3).filter(|(a, b)| **a && **b).count();
        // Independent 20% cohorts share about 4% of keys (200), not 20% (1000).
        assert!(
            both < 350,
            "a new candidate kept {both} keys of the old cohort"
        );
    }

    #[test]
    fn override_reaches_only_the_routes_versions() {
        let allowed = table("0%", "m@v2", "allow_override = true");
        let denied = table("0%", "m@v2", "");
        let pin = |t: &RoutingTable, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(&OVERRIDE_HEADER, http::HeaderValue::from_static(value));
            t.routes[0]
                .choose(&h)
                .map(|target| target.version.label.to_string())
        };
        assert_eq!(pin(&allowed, "m@v2"), Ok("m@v2".into()));
        assert_eq!(pin(&allowed, "m@v1"), Ok("m@v1".into()));
        assert_eq!(pin(&allowed, "candidate"), Ok("m@v2".into()));
        assert_eq!(pin(&allowed, "m@v3"), Err(BadOverride));
        assert_eq!(
            pin(&denied, "m@v2"),
            Ok("m@v1".into()),
            "ignored when not allowed"
        );
        assert_eq!(pin(&denied, "m@v3"), Ok("m@v1".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::writer::CommandError;

    #[test]
    fn a_state_that_does_not_fit_the_config_is_a_build_error_answered_422() {
        let text = r#"
            [[versions]]
            model = "m"
            version = "v1"
            backends = ["http://127.0.0.1:1"]
            [[routes]]
            name = "r"
            stable = "m@v1"
        "#;
        let config = Config::from_toml_str(text, "test").unwrap();
        let mut state = RoutingState::from_config(&config);
        state.routes[0].stable = "m@gone".to_string();
        let built = build_table(&config, &state, &Metrics::new(), &mut VersionSet::default());
        let error = built.unwrap_err();
        assert_eq!(
            error,
            BuildError::UnknownVersion {
                route: "r".into(),
                version: "m@gone".into()
            }
        );
        // Before, this was answered 500 "could not be made durable", which it was not about.
        let refused = CommandError::Build(error);
        assert_eq!(
            crate::control::admin::status_of(&refused),
            http::StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            refused.to_string(),
            "the changed routing cannot be served, so it was not applied: \
             route r routes to m@gone, which the config does not define"
        );

        state.routes.clear();
        let built = build_table(&config, &state, &Metrics::new(), &mut VersionSet::default());
        assert_eq!(
            built.unwrap_err(),
            BuildError::NoState { route: "r".into() }
        );
    }
}
