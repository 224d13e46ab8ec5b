//! Where the routing state lives, behind one [`Store::commit`]: the new state and the audit
//! record of the change that made it are written together or not at all.
//!
//! - [`file`]: one weir, `routing-state.json` in the state directory beside the audit log, under
//!   the state lock;
//! - [`etcd`]: a fleet, one etcd transaction conditioned on the revision this replica last
//!   applied, with a local copy of the state for a start without etcd.

pub mod etcd;
pub mod file;

use std::sync::Arc;

use super::audit::{AuditError, AuditLog, Entry};
use super::fleet::{Fleet, FleetError};
use super::state::{RoutingState, StateError};
pub use etcd::EtcdStore;
pub use file::{record_offline, FileStore};

/// Why a change could not be made durable. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot lock the state directory: {0}")]
    Lock(#[source] std::io::Error),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// What etcd holds cannot be read back (or a local file beside it cannot be written).
    #[error(transparent)]
    Fleet(FleetError),
    #[error("the fleet's state under {prefix} is gone from etcd (deleted by hand?); restart a replica to write it again")]
    Gone { prefix: String },
}

/// Why a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// Fleet mode: etcd did not take the transaction (away, another replica first, …).
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

/// Where the state lives.
#[derive(Debug)]
pub enum Store {
    File(FileStore),
    Fleet(EtcdStore),
}

impl Store {
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        match self {
            Store::Fleet(etcd) => Some(&etcd.fleet),
            Store::File(_) => None,
        }
    }

    /// Fleet mode: the etcd revision of the state this replica routes by.
    pub fn revision(&self) -> Option<i64> {
        match self {
            Store::Fleet(etcd) => Some(etcd.revision),
            Store::File(_) => None,
        }
    }

    /// Fleet mode: records the revision of the state this replica now routes by.
    pub fn applied(&mut self, revision: i64) {
        if let Store::Fleet(etcd) = self {
            etcd.revision = revision;
        }
    }

    /// Makes `state` durable with the audit record of `entry`, then appends the record to the
    /// local log. Nothing is written when this fails. `fenced`: only while this replica leads
    /// the canary (fleet mode).
    pub async fn commit(
        &mut self,
        audit: &mut AuditLog,
        state: &RoutingState,
        entry: Entry<'_>,
        fenced: bool,
    ) -> Result<(), CommitError> {
        match self {
            Store::File(file) => {
                let locked = file.lock()?;
                Ok(file.commit(&locked, audit, Some(state), entry)?)
            }
            Store::Fleet(etcd) => Ok(etcd.commit(audit, state, entry, fenced).await?),
        }
    }

    /// Fleet mode: keeps the state this replica routes by in its state directory (see
    /// [`EtcdStore::keep_copy`]). File mode: the commit already wrote it.
    pub fn keep_copy(&self, state: &RoutingState) {
        if let Store::Fleet(etcd) = self {
            etcd.keep_copy(state);
        }
    }
}
