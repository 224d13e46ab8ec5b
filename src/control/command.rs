//! What a routing change is and who asks for it: the vocabulary the writer, the admin API, the
//! canary controller and [`super::state::RouteState::apply`] share.

/// Who asks for a change: in the audit record and the log; only the canary controller is held
/// back by a pause, and only its changes are fenced in fleet mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// The canary controller (`canary`).
    Canary,
    /// weir itself: startup, catch-up (`weir`).
    Weir,
    /// The identity prober, recording a backend that serves another model (`identity-probe`).
    IdentityProbe,
    /// The MLflow watcher, applying aliases moved in MLflow (`mlflow`).
    Mlflow,
    /// An operator, by admin token (`admin:<fingerprint>`), signal (`signal:SIGHUP`) or CLI.
    Operator(String),
}

impl Actor {
    pub fn as_str(&self) -> &str {
        match self {
            Actor::Canary => "canary",
            Actor::Weir => "weir",
            Actor::IdentityProbe => "identity-probe",
            Actor::Mlflow => "mlflow",
            Actor::Operator(name) => name,
        }
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A routing change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    SetWeight {
        route: String,
        basis_points: u16,
    },
    Promote {
        route: String,
    },
    Rollback {
        route: String,
    },
    Pause {
        route: String,
    },
    Resume {
        route: String,
    },
    /// Re-read the config file (and MLflow's aliases) and merge it with the live state.
    Reload,
    /// Apply MLflow's aliases as read by the watcher, merged with the live state as a reload.
    Sync,
}

impl Command {
    pub fn action(&self) -> &'static str {
        match self {
            Command::SetWeight { .. } => "set_weight",
            Command::Promote { .. } => "promote",
            Command::Rollback { .. } => "rollback",
            Command::Pause { .. } => "pause",
            Command::Resume { .. } => "resume",
            Command::Reload => "reload",
            Command::Sync => "mlflow_sync",
        }
    }

    pub fn route(&self) -> Option<&str> {
        match self {
            Command::SetWeight { route, .. }
            | Command::Promote { route }
            | Command::Rollback { route }
            | Command::Pause { route }
            | Command::Resume { route } => Some(route),
            Command::Reload | Command::Sync => None,
        }
    }
}

/// A command with who asks for it and under which conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub command: Command,
    pub actor: Actor,
    pub reason: Option<String>,
    /// Apply only if the live generation is still this one.
    pub if_match: Option<u64>,
}
