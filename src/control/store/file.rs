//! One weir's state: `routing-state.json` in the state directory, beside the audit log, both
//! written under the state lock so `weir registry` steps in another process interleave safely.

use std::path::{Path, PathBuf};

use super::PersistError;
use crate::control::audit::{AuditLog, Entry};
use crate::control::state::{
    RoutingState, StateBody, StateError, StateLock, StateStore, STATE_FORMAT,
};

/// The state file of one state directory.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    file: StateStore,
}

impl FileStore {
    pub fn new(dir: &Path) -> FileStore {
        FileStore {
            dir: dir.to_path_buf(),
            file: StateStore::new(dir),
        }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn load(&self) -> Result<Option<StateBody>, StateError> {
        self.file.load()
    }

    pub fn save(&self, body: &StateBody) -> Result<(), StateError> {
        self.file.save(body)
    }

    /// Takes the state directory's lock, held while a commit reads and writes.
    pub fn lock(&self) -> Result<StateLock, PersistError> {
        StateLock::acquire(&self.dir).map_err(PersistError::Lock)
    }

    /// Appends the record of `entry` to the chain and saves `state` (none: the state on disk,
    /// kept as it is) with the chain's new head, under the lock. If the append fails, the state
    /// file is put back as it was, so state and log agree on what happened: nothing.
    pub fn commit(
        &self,
        _locked: &StateLock,
        audit: &mut AuditLog,
        state: Option<&RoutingState>,
        entry: Entry<'_>,
    ) -> Result<(), PersistError> {
        // Another process (`weir registry`, or weir) may have appended since this log last wrote.
        audit.refresh()?;
        let on_disk = self.file.load()?;
        let (body, entry) = match (state, &on_disk) {
            (Some(state), _) => {
                let body = StateBody {
                    format: STATE_FORMAT,
                    state: state.clone(),
                    audit_head: None,
                };
                (Some(body), entry)
            }
            // An event beside the state: numbered with the generation on disk.
            (None, on_disk) => {
                let generation = on_disk.as_ref().map_or(0, |b| b.state.generation);
                (
                    on_disk.clone(),
                    Entry {
                        generation,
                        ..entry
                    },
                )
            }
        };
        let prepared = audit.prepare(entry);
        if let Some(mut body) = body {
            body.audit_head = Some(prepared.head());
            self.file.save(&body)?;
        }
        if let Err(e) = audit.append(&prepared) {
            let restored = match &on_disk {
                Some(body) => self.file.save(body),
                None => Ok(()),
            };
            if let Err(r) = restored {
                tracing::error!(error = %r, "cannot restore the state file after a failed audit append; the next start will repair the log from it");
            }
            return Err(e.into());
        }
        Ok(())
    }
}

/// Appends one record from outside the running writer (the registry commands): under the state
/// lock, continuing the chain and moving the state file's head with it.
pub fn record_offline(dir: &Path, entry: Entry<'_>) -> Result<(), String> {
    let store = FileStore::new(dir);
    let locked =
        StateLock::acquire(dir).map_err(|e| format!("cannot lock {}: {e}", dir.display()))?;
    let body = store.load().map_err(|e| e.to_string())?;
    let mut log = AuditLog::open(dir, body.as_ref().and_then(|b| b.audit_head.as_ref()))
        .map_err(|e| e.to_string())?;
    if log.is_fleet_copy() {
        return Err(format!(
            "{} holds a fleet replica's copy of the audit chain in etcd; a record added here \
             would fork it, and the replica would refuse to run. Give --state-dir a directory of \
             its own for registry steps",
            log.path().display()
        ));
    }
    store
        .commit(&locked, &mut log, None, entry)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("weir-store-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn offline_records_go_to_a_plain_state_dir_but_never_into_a_fleet_replicas_copy() {
        let entry = || Entry {
            actor: "registry:test",
            action: "approve",
            route: None,
            before: serde_json::Value::Null,
            after: serde_json::Value::Null,
            generation: 0,
            reason: None,
            window: None,
        };
        let plain = temp_dir("offline-plain");
        record_offline(&plain, entry()).unwrap();
        record_offline(&plain, entry()).unwrap();
        assert_eq!(AuditLog::open(&plain, None).unwrap().next_seq(), 3);

        let fleet = temp_dir("offline-fleet");
        let mut log = AuditLog::open(&fleet, None).unwrap();
        log.set_replica("r1");
        let prepared = log.prepare(entry());
        log.append(&prepared).unwrap();
        let err = record_offline(&fleet, entry()).unwrap_err();
        assert!(err.contains("fleet replica's copy"), "{err}");
        assert_eq!(
            AuditLog::open(&fleet, None).unwrap().next_seq(),
            2,
            "nothing appended"
        );
        let _ = fs::remove_dir_all(&plain);
        let _ = fs::remove_dir_all(&fleet);
    }
}
