//! The lifecycle rules: which stage changes are allowed, what they need, and which versions may
//! serve in which role. Every refusal names its rule and what is missing.

use std::fmt;
use std::time::SystemTime;

use super::{parse_time, ModelVersion, Policy, Registry, Stage};
use crate::metrics::Role;

/// A stage change refused by one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRefusal {
    pub rule: &'static str,
    pub message: String,
}

impl fmt::Display for RuleRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}: {}", self.rule, self.message)
    }
}

/// A pin refused for routing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{label} cannot serve as {role}: {message} (rule: {rule})")]
pub struct PinRefusal {
    pub label: String,
    pub role: &'static str,
    pub rule: &'static str,
    pub message: String,
}

fn allowed_moves(from: Stage) -> &'static [Stage] {
    use Stage::*;
    match from {
        Draft => &[Candidate, Deprecated, Retired],
        Candidate => &[Approved, Deprecated, Retired],
        Approved => &[Production, Deprecated, Retired],
        Production => &[Deprecated, Retired],
        Deprecated => &[Retired],
        Retired => &[],
    }
}

/// Checks a stage change of `v` to `to` at time `now`; every broken rule is returned.
pub fn check_stage_change(
    policy: &Policy,
    v: &ModelVersion,
    to: Stage,
    now: SystemTime,
) -> Result<(), Vec<RuleRefusal>> {
    let mut refusals = Vec::new();
    if !allowed_moves(v.stage).contains(&to) {
        let moves: Vec<&str> = allowed_moves(v.stage).iter().map(|s| s.as_str()).collect();
        refusals.push(RuleRefusal {
            rule: "lifecycle",
            message: format!(
                "{} is {}; it can move to {}",
                v.label(),
                v.stage,
                if moves.is_empty() {
                    "nothing (retired is final)".to_string()
                } else {
                    moves.join(" or ")
                }
            ),
        });
        return Err(refusals);
    }
    refusals.extend(stage_rules(policy, v, to, now));
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(refusals)
    }
}

/// Checks that `v` meets the rules of the stage it claims to be in (provenance, SBOM,
/// unexpired approvals, signature), for a registry whose stages anyone with write access can
/// set — MLflow's tags: a tag saying `approved` counts only with the approvals behind it.
pub fn check_stage_held(
    policy: &Policy,
    v: &ModelVersion,
    now: SystemTime,
) -> Result<(), Vec<RuleRefusal>> {
    let refusals = stage_rules(policy, v, v.stage, now);
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(refusals)
    }
}

/// The rules broken by `v` being in stage `to` at `now`.
fn stage_rules(policy: &Policy, v: &ModelVersion, to: Stage, now: SystemTime) -> Vec<RuleRefusal> {
    let mut refusals = Vec::new();
    let serving_stage = matches!(to, Stage::Candidate | Stage::Approved | Stage::Production);
    if serving_stage {
        if policy.require_provenance && v.provenance.is_none() && !v.has_exception("provenance") {
            refusals.push(RuleRefusal {
                rule: "provenance",
                message: format!(
                    "leaving draft needs a provenance reference for {}: weir registry add ... --provenance FILE",
                    v.label()
                ),
            });
        }
        if policy.require_sbom && v.sbom.is_none() && !v.has_exception("sbom") {
            refusals.push(RuleRefusal {
                rule: "sbom",
                message: format!("leaving draft needs an SBOM reference for {}: weir registry add ... --sbom FILE", v.label()),
            });
        }
    }
    if matches!(to, Stage::Approved | Stage::Production) {
        refusals.extend(approval_refusals(policy, v, to, now));
    }
    refusals.extend(signature_refusal(policy, v, to));
    refusals
}

/// Checks promoting `v` (a candidate or approved version) to production: the production rules
/// (provenance, SBOM, unexpired approvals) without the one-step lifecycle walk.
pub fn check_promotion(
    policy: &Policy,
    v: &ModelVersion,
    now: SystemTime,
) -> Result<(), Vec<RuleRefusal>> {
    match v.stage {
        Stage::Production => Ok(()),
        Stage::Candidate | Stage::Approved => {
            let as_approved = ModelVersion {
                stage: Stage::Approved,
                ..v.clone()
            };
            check_stage_change(policy, &as_approved, Stage::Production, now)
        }
        other => Err(vec![RuleRefusal {
            rule: "lifecycle",
            message: format!(
                "{} is {other}; only candidate or approved versions can be promoted",
                v.label()
            ),
        }]),
    }
}

/// A missing signature, or one by a key the policy does not list, for a version in (or entering)
/// a stage whose policy asks for one.
fn signature_refusal(policy: &Policy, v: &ModelVersion, stage: Stage) -> Option<RuleRefusal> {
    if !policy.signature_stages.contains(&stage) || v.has_exception("signature") {
        return None;
    }
    let message = match &v.signature {
        None => format!(
            "{stage} needs a verified model signature for {}: weir registry verify ... --signature model.sig --public-key KEY",
            v.label()
        ),
        Some(s) if !policy.signing_keys.contains(&s.key) => format!(
            "{stage} needs a signature by one of the policy's signing_keys for {}; it is signed by key {}",
            v.label(),
            s.key
        ),
        Some(_) => return None,
    };
    Some(RuleRefusal {
        rule: "signature",
        message,
    })
}

/// Missing or expired approvals for entering `to`.
fn approval_refusals(
    policy: &Policy,
    v: &ModelVersion,
    to: Stage,
    now: SystemTime,
) -> Vec<RuleRefusal> {
    let mut refusals = Vec::new();
    for role in &policy.approval_roles {
        if v.has_exception(&format!("approval:{role}")) {
            continue;
        }
        let of_role: Vec<_> = v.approvals.iter().filter(|a| &a.role == role).collect();
        let valid = of_role
            .iter()
            .any(|a| parse_time(&a.expires_at).is_ok_and(|expires| expires > now));
        if valid {
            continue;
        }
        match of_role.last() {
            None => refusals.push(RuleRefusal {
                rule: "approval",
                message: format!(
                    "{to} needs an approval from role {role} for {}: weir registry approve ... --role {role} --by NAME",
                    v.label()
                ),
            }),
            Some(a) => refusals.push(RuleRefusal {
                rule: "approval_expired",
                message: format!(
                    "{to} needs an unexpired approval from role {role} for {}; the one by {} expired at {}",
                    v.label(),
                    a.by,
                    a.expires_at
                ),
            }),
        }
    }
    refusals
}

/// Whether `label` may serve in `role`. `new_in_route` is true when the version is not already
/// serving in this route (deprecated versions keep serving where they are, but take no new route).
pub fn check_servable<'r>(
    registry: &'r Registry,
    label: &str,
    role: Role,
    new_in_route: bool,
) -> Result<&'r ModelVersion, PinRefusal> {
    let refuse = |rule: &'static str, message: String| PinRefusal {
        label: label.to_string(),
        role: role.as_str(),
        rule,
        message,
    };
    let Some(v) = registry.find(label) else {
        return Err(refuse(
            "unregistered",
            "it is not in the registry; register it with `weir registry add`".to_string(),
        ));
    };
    match v.stage {
        Stage::Draft => {
            return Err(refuse(
                "draft",
                "it is a draft; draft versions are never served".into(),
            ))
        }
        Stage::Retired => {
            return Err(refuse(
                "retired",
                "it is retired; retired versions are never served".into(),
            ))
        }
        Stage::Deprecated if new_in_route => {
            return Err(refuse(
                "deprecated",
                "it is deprecated; deprecated versions take no new routes".into(),
            ))
        }
        _ => {}
    }
    if let Some(refusal) = signature_refusal(&registry.policy, v, v.stage) {
        return Err(refuse(refusal.rule, refusal.message));
    }
    let allowed = match role {
        Role::Stable => matches!(
            v.stage,
            Stage::Approved | Stage::Production | Stage::Deprecated
        ),
        Role::Candidate => matches!(v.stage, Stage::Candidate | Stage::Approved),
    };
    if !allowed {
        let needs = match role {
            Role::Stable => "approved or production",
            Role::Candidate => "candidate or approved",
        };
        return Err(refuse(
            "stage",
            format!(
                "its stage is {}; the {} role needs {needs}",
                v.stage,
                role.as_str()
            ),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{days, format_time, Approval, Reference};

    fn version(stage: Stage) -> ModelVersion {
        ModelVersion {
            model: "chat".into(),
            version: "v2".into(),
            digest: "a".repeat(64),
            stage,
            identity: None,
            artifact_uri: None,
            base_model: None,
            fine_tune_method: None,
            license: None,
            allowed_uses: vec![],
            prohibited_uses: vec![],
            risk: None,
            owner: None,
            backup_owner: None,
            provenance: Some(Reference {
                uri: "p.json".into(),
                sha256: "b".repeat(64),
            }),
            sbom: Some(Reference {
                uri: "s.json".into(),
                sha256: "c".repeat(64),
            }),
            training_data: vec![],
            eval_data: vec![],
            approvals: vec![],
            exceptions: vec![],
            manifest: vec![],
            signature: None,
        }
    }

    fn approve(v: &mut ModelVersion, role: &str, expires_in_days: i64) {
        let now = SystemTime::now();
        let expires = if expires_in_days >= 0 {
            now + days(expires_in_days as u32)
        } else {
            now - days((-expires_in_days) as u32)
        };
        v.approvals.push(Approval {
            by: "alice".into(),
            role: role.into(),
            at: format_time(now - days(100)),
            expires_at: format_time(expires),
        });
    }

    fn rules(result: Result<(), Vec<RuleRefusal>>) -> Vec<&'static str> {
        result
            .err()
            .unwrap_or_default()
            .iter()
            .map(|r| r.rule)
            .collect()
    }

    #[test]
    fn each_rule_refuses_with_its_name() {
        let policy = Policy::default();
        let now = SystemTime::now();

        let mut no_provenance = version(Stage::Draft);
        no_provenance.provenance = None;
        assert_eq!(
            rules(check_stage_change(
                &policy,
                &no_provenance,
                Stage::Candidate,
                now
            )),
            ["provenance"]
        );
        no_provenance.sbom = None;
        assert_eq!(
            rules(check_stage_change(
                &policy,
                &no_provenance,
                Stage::Candidate,
                now
            )),
            ["provenance", "sbom"]
        );

        let mut candidate = version(Stage::Candidate);
        approve(&mut candidate, "platform", 30);
        approve(&mut candidate, "product", -1);
        let refusals = check_stage_change(&policy, &candidate, Stage::Approved, now).unwrap_err();
        let by_rule: Vec<_> = refusals
            .iter()
            .map(|r| {
                (
                    r.rule,
                    r.message.contains("product") || r.message.contains("security"),
                )
            })
            .collect();
        assert_eq!(by_rule, [("approval_expired", true), ("approval", true)]);
        approve(&mut candidate, "product", 30);
        approve(&mut candidate, "security", 30);
        assert_eq!(
            check_stage_change(&policy, &candidate, Stage::Approved, now),
            Ok(())
        );

        assert_eq!(
            rules(check_stage_change(
                &policy,
                &version(Stage::Draft),
                Stage::Production,
                now
            )),
            ["lifecycle"]
        );
        assert_eq!(
            rules(check_stage_change(
                &policy,
                &version(Stage::Retired),
                Stage::Draft,
                now
            )),
            ["lifecycle"]
        );
    }

    #[test]
    fn exceptions_waive_their_rule_only() {
        let mut v = version(Stage::Draft);
        v.provenance = None;
        v.sbom = None;
        v.exceptions.push(crate::registry::Exception {
            rule: "sbom".into(),
            reason: "vendor model, SBOM pending".into(),
            granted_by: "carol".into(),
        });
        assert_eq!(
            rules(check_stage_change(
                &Policy::default(),
                &v,
                Stage::Candidate,
                SystemTime::now()
            )),
            ["provenance"]
        );
    }

    #[test]
    fn pins_are_checked_against_stage_and_role() {
        let mut registry = Registry::default();
        for (version, stage) in [
            ("v1", Stage::Production),
            ("v2", Stage::Candidate),
            ("v3", Stage::Draft),
            ("v4", Stage::Retired),
            ("v5", Stage::Deprecated),
        ] {
            let mut v = version_named(version);
            v.stage = stage;
            registry.versions.push(v);
        }
        let rule = |label: &str, role: Role, new: bool| {
            check_servable(&registry, label, role, new)
                .err()
                .map(|e| e.rule)
        };
        assert_eq!(rule("chat@v1", Role::Stable, true), None);
        assert_eq!(rule("chat@v2", Role::Candidate, true), None);
        assert_eq!(rule("chat@v2", Role::Stable, true), Some("stage"));
        assert_eq!(rule("chat@v1", Role::Candidate, true), Some("stage"));
        assert_eq!(rule("chat@v3", Role::Candidate, true), Some("draft"));
        assert_eq!(rule("chat@v4", Role::Stable, false), Some("retired"));
        assert_eq!(rule("chat@v5", Role::Stable, true), Some("deprecated"));
        assert_eq!(rule("chat@v5", Role::Stable, false), None);
        assert_eq!(rule("chat@v9", Role::Stable, true), Some("unregistered"));
        let message = check_servable(&registry, "chat@v3", Role::Candidate, true)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("chat@v3 cannot serve as candidate"),
            "{message}"
        );
    }

    #[test]
    fn a_policy_asking_for_signatures_serves_no_unsigned_production_version() {
        let mut registry = Registry::default();
        registry.policy.signature_stages = vec![Stage::Production];
        registry.policy.signing_keys = vec!["trusted".into()];
        for (version, stage, key) in [
            ("v1", Stage::Production, None),
            ("v2", Stage::Production, Some("untrusted")),
            ("v3", Stage::Production, Some("trusted")),
            ("v4", Stage::Candidate, None),
        ] {
            let mut v = version_named(version);
            v.stage = stage;
            v.signature = key.map(|key| crate::registry::SignatureRecord {
                bundle: Reference {
                    uri: "model.sig".into(),
                    sha256: "0".repeat(64),
                },
                key: key.into(),
                subject_sha256: "0".repeat(64),
                verified_at: "2026-12-03T00:00:00Z".into(),
            });
            registry.versions.push(v);
        }
        let rule = |label: &str, role: Role| {
            check_servable(&registry, label, role, true)
                .err()
                .map(|e| e.rule)
        };
        assert_eq!(rule("chat@v1", Role::Stable), Some("signature"));
        assert_eq!(rule("chat@v2", Role::Stable), Some("signature"));
        assert_eq!(rule("chat@v3", Role::Stable), None);
        assert_eq!(
            rule("chat@v4", Role::Candidate),
            None,
            "candidates need none"
        );
    }

    fn version_named(v: &str) -> ModelVersion {
        let mut m = version(Stage::Draft);
        m.version = v.into();
        m
    }
}
