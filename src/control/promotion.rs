//! A promotion's runtime stage, and its undo: promoting a version records it as production in
//! weir's routing state (the registry file is reviewed input and never written), after the
//! registry's promotion rules pass; a rollback that undoes the promotion takes the record back.

use std::time::SystemTime;

use super::command::Command;
use super::state::{Promotion, RouteState, RoutingState};
use crate::registry::{check_promotion, Registry, RuleRefusal, Stage};

/// The registry's rules refuse to promote `label`.
#[derive(Debug)]
pub(super) struct Refused {
    pub label: String,
    pub refusals: Vec<RuleRefusal>,
}

/// The runtime stage a change moves, in `state` and in `registry` (the runtime view, a copy):
/// a promotion records its version as production (the registry file is never written: it is
/// reviewed input, often read-only); a rollback that undoes a promotion takes that record back.
/// Returns the notes for the answer and the audit record.
pub(super) fn move_runtime_stage(
    registry: &mut Registry,
    command: &Command,
    before: Option<&RouteState>,
    state: &mut RoutingState,
) -> Result<Vec<String>, Refused> {
    let Some(route) = command.route().and_then(|name| state.route(name)).cloned() else {
        return Ok(Vec::new());
    };
    match command {
        Command::Promote { .. } => {
            let label = route.stable.clone();
            let Some(from) = promote_in_registry(registry, &label)? else {
                return Ok(Vec::new());
            };
            let promotion = Promotion {
                from,
                route: route.name.clone(),
                generation: state.generation,
                at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            };
            state.production.insert(label.clone(), promotion);
            Ok(vec![format!(
                "runtime stage: {label} {from} → production (kept in weir's routing state; the registry file is not written)"
            )])
        }
        Command::Rollback { .. } => {
            // Undoing a promotion turns the demoted version back into a (rolled-back) candidate.
            let undone = before
                .filter(|b| b.rollback_target.is_some() && route.rollback_target.is_none())
                .map(|b| b.stable.clone());
            let Some(label) = undone else {
                return Ok(Vec::new());
            };
            if state
                .production
                .get(&label)
                .is_none_or(|p| p.route != route.name)
            {
                return Ok(Vec::new());
            }
            let Some(promotion) = state.production.remove(&label) else {
                return Ok(Vec::new());
            };
            if let Some(v) = registry.find_mut(&label) {
                v.stage = promotion.from;
            }
            Ok(vec![format!(
                "runtime stage: {label} production → {} (the promotion at generation {} is undone)",
                promotion.from, promotion.generation
            )])
        }
        _ => Ok(Vec::new()),
    }
}

/// Moves a promoted version to the production stage in `registry` (the runtime view, a copy).
/// Returns the stage it had, or `None` when it already was production.
fn promote_in_registry(registry: &mut Registry, label: &str) -> Result<Option<Stage>, Refused> {
    let policy = registry.policy.clone();
    let Some(version) = registry.find_mut(label) else {
        return Ok(None); // the pin check names an unregistered version
    };
    if version.stage == Stage::Production {
        return Ok(None);
    }
    check_promotion(&policy, version, SystemTime::now()).map_err(|refusals| Refused {
        label: label.to_string(),
        refusals,
    })?;
    let before = version.stage;
    version.stage = Stage::Production;
    Ok(Some(before))
}
