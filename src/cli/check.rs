//! `weir check`: every problem of a config file, each with its path — the config's own, the
//! registry's verdict on the versions its routes pin (MLflow's aliases read as `weir serve` reads
//! them at start), and the eval sets its canaries need.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::control::mlflow::{MlflowSource, SourceError};
use crate::control::state::{RoutingState, StateStore};

pub const HELP: &str = "Examples:\n  \
    weir check --config config/weir.toml\n  \
    weir check --config weir.toml --offline   where MLflow cannot be reached (a CI job): \
    its aliases are not read";

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The config file to check.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Contact nothing. Routes pinned by MLflow aliases are then checked as config only, not
    /// the versions their aliases name (weir serve still checks those at start).
    #[arg(long)]
    pub offline: bool,
}

pub fn run(args: &CheckArgs) -> ExitCode {
    let config = match Config::from_file(&args.config) {
        Ok(config) => config,
        Err(e) => {
            println!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    // With MLflow: the config its aliases pin, or None when they could not be read.
    let pinned = match &config.mlflow {
        None => Some(config.clone()),
        Some(mlflow) if args.offline => {
            notes.push(format!(
                "MLflow at {}: not contacted (--offline); the versions its aliases name are not checked",
                mlflow.url
            ));
            None
        }
        Some(_) => match mlflow_pins(&config) {
            Ok(read) => {
                problems.extend(read.problems);
                notes.extend(read.notes);
                read.config
            }
            Err(problem) => {
                problems.push(problem);
                None
            }
        },
    };
    match &pinned {
        Some(pinned) => problems.extend(pin_problems(pinned, |_| true)),
        // The routes MLflow pins have no versions to check; the others do.
        None => problems.extend(pin_problems(&config, |route| {
            config
                .routes
                .iter()
                .any(|r| r.name == route && r.mlflow.is_none())
        })),
    }
    problems.extend(eval_set_problems(&config));
    let path = args.config.display();
    if !problems.is_empty() {
        println!(
            "{path}: {} problem{}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        for p in problems.iter().chain(&notes) {
            println!("  {p}");
        }
        return ExitCode::FAILURE;
    }
    println!(
        "{path}: ok ({} versions, {} routes)",
        pinned.as_ref().unwrap_or(&config).versions.len(),
        config.routes.len()
    );
    for note in &notes {
        println!("  {note}");
    }
    if let Some(fleet) = &config.fleet {
        // Checked offline: reachability is for `weir serve` (and /readyz) to tell.
        println!(
            "  fleet mode: state under {} in etcd at {} (not contacted by check)",
            fleet.prefix,
            fleet.endpoints.join(", ")
        );
    }
    ExitCode::SUCCESS
}

/// What reading MLflow's aliases found: the config they pin (None when a route has no
/// servable pin), refusals as problems, and the pins as notes.
struct MlflowRead {
    config: Option<Config>,
    problems: Vec<String>,
    notes: Vec<String>,
}

/// Reads the aliases of every MLflow route and settles them against the policy, as weir does at
/// start, without keeping anything. Err: MLflow could not be read.
fn mlflow_pins(config: &Config) -> Result<MlflowRead, String> {
    let url = config.mlflow.as_ref().map_or("", |m| m.url.as_str());
    let source = MlflowSource::new(config, &crate::Metrics::new())
        .map_err(|e| format!("registry.mlflow: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let previous = persisted(config);
    // Quietly: the source's log lines speak of traffic, which a check has none of.
    let fetched =
        tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
            runtime.block_on(source.fetch(config, previous.as_ref()))
        })
        .map_err(|e| {
            format!(
                "registry.mlflow: cannot read the aliases from MLflow at {url}: {e} \
                 (--offline checks the rest without it)"
            )
        })?;
    let at = |route: &str| {
        let index = config
            .routes
            .iter()
            .position(|r| r.name == route)
            .unwrap_or(0);
        format!("routes[{index}].mlflow_model ({route})")
    };
    let settled = match source.settle(config, &fetched, previous.as_ref()) {
        Ok(settled) => settled,
        Err(SourceError::Refused(refusals)) => {
            return Ok(MlflowRead {
                config: None,
                problems: refusals
                    .iter()
                    .map(|r| format!("{}: {}", at(&r.route), r.message))
                    .collect(),
                notes: Vec::new(),
            })
        }
        Err(e) => return Err(format!("registry: {e}")),
    };
    let problems = settled
        .refusals
        .iter()
        .map(|r| format!("{}: {}", at(&r.route), r.message))
        .collect();
    let notes = settled
        .resolution
        .routes
        .iter()
        .map(|(route, pins)| {
            let candidate = pins
                .candidate
                .as_ref()
                .map_or("none".to_string(), |c| c.describe());
            format!(
                "{}: MLflow pins stable {}, candidate {candidate}",
                at(route),
                pins.stable.describe()
            )
        })
        .collect();
    Ok(MlflowRead {
        config: Some(settled.config),
        problems,
        notes,
    })
}

/// The routing state in the config's state directory, when there is one: a version already
/// serving in a route may stay there deprecated.
fn persisted(config: &Config) -> Option<RoutingState> {
    StateStore::new(&config.state_dir)
        .load()
        .ok()
        .flatten()
        .map(|b| b.state)
}

/// The registry's verdict on the routes `checked` selects, as problems.
fn pin_problems(config: &Config, checked: impl Fn(&str) -> bool) -> Vec<String> {
    use crate::control::pins::{load_registry, pin_refusals};
    let registry = match load_registry(config) {
        Ok(Some(registry)) => registry,
        Ok(None) => return Vec::new(),
        Err(e) => return vec![format!("registry: {e}")],
    };
    let wanted = RoutingState::from_config(config);
    let routes: Vec<_> = wanted
        .routes
        .into_iter()
        .filter(|r| checked(&r.name))
        .collect();
    pin_refusals(&registry, &routes, persisted(config).as_ref())
        .into_iter()
        .map(|r| {
            let index = config
                .routes
                .iter()
                .position(|c| c.name == r.route)
                .unwrap_or(0);
            format!("routes[{index}].{}: {}", r.field, r.refusal)
        })
        .collect()
}

/// Every route's held-out eval set loads, has cases, and has the categories its policy
/// requires.
fn eval_set_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let Some(gate) = route.canary.as_ref().and_then(|c| c.eval.as_ref()) else {
            continue;
        };
        let at = format!("routes[{i}].canary.eval ({})", route.name);
        match crate::eval::EvalSet::load(&gate.file) {
            Err(e) => problems.push(format!("{at}: {e}")),
            Ok(set) => {
                for category in gate.categories.keys() {
                    if !set.cases.iter().any(|c| c.category() == category) {
                        problems.push(format!(
                            "{at}: the eval set {} has no {category:?} cases, which the policy requires",
                            gate.file.display()
                        ));
                    }
                }
            }
        }
    }
    problems
}
