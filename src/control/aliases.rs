//! The MLflow watcher: re-reads the aliases on an interval (MLflow has no watch API) and hands
//! what moved to the writer, which validates, persists and audits it like any routing change.

use std::sync::Arc;

use tokio::sync::watch;

use super::mlflow::Fetched;
use super::writer::Writer;
use crate::shutdown::stopped;

/// Runs until `stop`: every `[registry] mlflow_interval`, reads the aliases and applies them
/// when they differ from the last read that was applied.
pub async fn watch(writer: Arc<Writer>, mut stop: watch::Receiver<bool>) {
    let Some(source) = writer.mlflow().cloned() else {
        return;
    };
    let mut applied: Option<Fetched> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(source.interval()) => {}
            _ = stopped(&mut stop) => return,
        }
        let config = writer.config().await;
        let state = writer.live().state.clone();
        let fetched = match source.fetch(&config, Some(&state)).await {
            Ok(fetched) => fetched,
            Err(e) if e.is_outage() => continue, // said once by the source, and by /readyz
            Err(e) => {
                tracing::warn!(error = %e, "cannot read MLflow's aliases; the routes keep their pins");
                continue;
            }
        };
        if applied.as_ref() == Some(&fetched) {
            continue;
        }
        match writer.sync_mlflow(&fetched).await {
            Ok(done) => {
                if done.changed {
                    tracing::info!(generation = done.generation, notes = %done.notes.join("; "), "applied MLflow's aliases");
                }
                applied = Some(fetched);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot apply MLflow's aliases; the routes keep their pins, retrying at the next read")
            }
        }
    }
}
