//! The routing table: an immutable snapshot the hot path loads once per request.
//!
//! Invariant: everything a request needs to route, forward and count is resolved here when the
//! table is built — versions, backends, header values, metric handles — so routing allocates
//! nothing and takes no lock. A request keeps the `Arc<RoutingTable>` it started with.

use std::sync::Arc;

use crate::config::{Api, StickyKey};
use crate::metrics::{Role, TargetStats};
use crate::shadow::tee::ShadowPlan;
use crate::upstream::Version;
use rand::Rng;

/// One generation of routing: every route with its versions.
#[derive(Debug)]
pub struct RoutingTable {
    pub generation: u64,
    /// Sorted for matching: routes limited to a host first, then longer prefixes first, then
    /// those that route by model before those that do not.
    pub routes: Vec<Route>,
    /// `GET /v1/models` as weir answers it (OpenAI's list of every model a route serves), or
    /// `None`: the matching route's stable version answers.
    pub models_list: Option<serde_json::Value>,
}

/// A version as one route uses it: the shared upstream plus this route's metric handles.
#[derive(Debug)]
pub struct Target {
    pub version: Arc<Version>,
    pub role: Role,
    pub stats: Arc<TargetStats>,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub prefix: String,
    pub host: Option<String>,
    pub stable: Target,
    pub candidate: Option<Target>,
    /// Candidate share in basis points.
    pub weight: u16,
    pub sticky: Option<StickyKey>,
    /// Seed of the sticky hash, derived from the candidate's label so each candidate draws its
    /// own cohort.
    pub cohort_seed: u64,
    pub allow_override: bool,
    /// The models this route serves (the body's top-level `model`); empty: any request on its
    /// path.
    pub models: Box<[Box<str>]>,
    /// A request header naming the model, read instead of the body when present.
    pub model_header: Option<http::HeaderName>,
    /// The shape of weir's own answers on this route.
    pub api: Api,
    /// Shadowing to the candidate, when the route mirrors and has a serving candidate.
    pub shadow: Option<Arc<crate::shadow::tee::ShadowRoute>>,
}

impl RoutingTable {
    /// The first route that matches, in match order.
    #[inline]
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(host, path))
    }

    /// The first route that matches and serves `model`, or serves any model, in match order.
    pub fn find_model(&self, host: Option<&str>, path: &str, model: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            (r.models.is_empty() || r.models.iter().any(|m| &**m == model)) && r.matches(host, path)
        })
    }

    /// The models the routes matching `host` and `path` serve, for errors.
    pub fn models_on(&self, host: Option<&str>, path: &str) -> Vec<&str> {
        self.routes
            .iter()
            .filter(|r| r.matches(host, path))
            .flat_map(|r| r.models.iter().map(|m| &**m))
            .collect()
    }

    /// Puts routes in match order: host-limited before any-host, longer prefix before shorter,
    /// routes by model before a catch-all on the same path, config order otherwise.
    pub fn sort_routes(routes: &mut [Route]) {
        routes.sort_by_key(|r| {
            (
                r.host.is_none(),
                std::cmp::Reverse(r.prefix.len()),
                r.models.is_empty(),
            )
        });
    }
}

impl Route {
    /// Whether a request must have its body's first bytes read before it can be routed and
    /// split here: the route routes by model or is sticky by a body field.
    #[inline]
    pub fn reads_body(&self) -> bool {
        !self.models.is_empty() || matches!(self.sticky, Some(StickyKey::Field(_)))
    }

    /// The sticky body field, when the route has one.
    pub fn sticky_field(&self) -> Option<&str> {
        match &self.sticky {
            Some(StickyKey::Field(name)) => Some(name),
            _ => None,
        }
    }

    /// Whether this route serves a request for `host` (port stripped or not) and `path`.
    #[inline]
    pub fn matches(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(want) = &self.host {
            let Some(host) = host else { return false };
            let host = strip_port(host);
            if !host.eq_ignore_ascii_case(want) {
                return false;
            }
        }
        prefix_matches(&self.prefix, path)
    }

    /// For a request routed to `target`: a shadow to the candidate, when this route mirrors,
    /// the request goes to stable and the mirror's share draws it.
    pub fn shadow_plan(&self, target: &Target) -> Option<ShadowPlan> {
        match (&self.shadow, &self.candidate, target.role) {
            (Some(shadow), Some(candidate), Role::Stable)
                if rand::rng().random_range(0..10_000u16) < shadow.mirror =>
            {
                Some(ShadowPlan {
                    route: Arc::clone(&self.name),
                    stable: Arc::clone(&target.version.label),
                    candidate: Arc::clone(&candidate.version),
                    shadow: Arc::clone(shadow),
                    model: None,
                })
            }
            _ => None,
        }
    }

    /// Whether every version of this route is served over plain HTTP.
    pub fn plain_http(&self) -> bool {
        self.stable.version.plain_http
            && self
                .candidate
                .as_ref()
                .is_none_or(|candidate| candidate.version.plain_http)
    }

    pub fn target(&self, role: Role) -> Option<&Target> {
        match role {
            Role::Stable => Some(&self.stable),
            Role::Candidate => self.candidate.as_ref(),
        }
    }
}

/// Segment-aware prefix match: `/v1` matches `/v1` and `/v1/chat`, not `/v10`.
#[inline]
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop a trailing :port.
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/v1", "/v1"));
        assert!(prefix_matches("/v1", "/v1/chat"));
        assert!(!prefix_matches("/v1", "/v10"));
        assert!(prefix_matches("/v1/", "/v1/x"));
        assert!(!prefix_matches("/v1/chat", "/v1"));
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("api.example:8080"), "api.example");
        assert_eq!(strip_port("api.example"), "api.example");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
