//! A fleet's state: the `state` key in etcd, committed in one transaction with the audit record
//! (see [`Fleet::commit`]), plus a local copy for a start that cannot reach etcd.

use std::sync::Arc;

use crate::control::audit::{AuditLog, Entry, Prepared};
use crate::control::fleet::{Fleet, FleetError};
use crate::control::state::{RoutingState, StateBody, StateStore, STATE_FORMAT};

/// The revision a replica that started without etcd has while it has not joined yet: no state
/// key ever has it, so a commit then is always stale and catches up (joining) first.
pub const NOT_JOINED: i64 = -1;

#[derive(Debug)]
pub struct EtcdStore {
    pub fleet: Arc<Fleet>,
    /// The revision of the state this replica last applied.
    pub revision: i64,
    copy: StateStore,
}

impl EtcdStore {
    pub fn new(fleet: Arc<Fleet>, revision: i64, copy: StateStore) -> EtcdStore {
        EtcdStore {
            fleet,
            revision,
            copy,
        }
    }

    /// Commits `state` with the record of `entry` in one etcd transaction, then appends the
    /// record to the local copy of the chain.
    pub async fn commit(
        &mut self,
        audit: &mut AuditLog,
        state: &RoutingState,
        entry: Entry<'_>,
        fenced: bool,
    ) -> Result<(), FleetError> {
        let prepared: Prepared = audit.prepare(entry);
        let body = StateBody {
            format: STATE_FORMAT,
            state: state.clone(),
            audit_head: Some(prepared.head()),
        };
        self.revision = self
            .fleet
            .commit(self.revision, &body, &prepared, fenced)
            .await?;
        // Committed fleet-wide; a failed local append is refilled from etcd at the next
        // catch-up (it starts from the local copy's end). Forgetting the revision makes that
        // catch-up happen before this replica writes again.
        if let Err(e) = audit.append(&prepared) {
            tracing::error!(error = %e, "cannot append to the local copy of the audit chain; it will be refilled from etcd");
            let _ = audit.refresh();
            self.revision = 0;
        }
        Ok(())
    }

    /// Keeps the state this replica routes by in its state directory, so that a restart while
    /// etcd is away serves it instead of nothing. etcd holds the fleet's state; this copy is only
    /// read at a start that cannot reach etcd, and a failure to write it is only worth a warning.
    pub fn keep_copy(&self, state: &RoutingState) {
        let body = StateBody {
            format: STATE_FORMAT,
            state: state.clone(),
            audit_head: None,
        };
        if let Err(e) = self.copy.save(&body) {
            tracing::warn!(error = %e, "cannot keep a copy of the fleet's routing state for a start without etcd");
        }
    }
}
