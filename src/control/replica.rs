//! Fleet mode's replica tasks: follow the fleet's state, lead (campaign for) the canary
//! election, compact etcd's history, and publish this replica's counters.
//!
//! The [`Fleet`](super::fleet::Fleet) is etcd's client and knows nothing of the writer; these tasks
//! tie the two together, so `fleet.rs` is not part of an import cycle with the writer or the
//! canary.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::fleet::{FleetError, PUBLISH_INTERVAL};
use super::{CommandError, Writer};
use crate::shutdown::stopped;

/// Keeps this replica in step with the fleet until `stop`: applies what other replicas changed
/// (a watch wakes it; a one-second poll backs the watch up and notices etcd coming and going)
/// and keeps the fleet gauges current.
pub async fn follow(writer: Arc<Writer>, mut stop: watch::Receiver<bool>) {
    let Some(fleet) = writer.fleet().cloned() else {
        return;
    };
    let mut revision = 0;
    let mut failures = 0u32;
    loop {
        let synced = writer.sync().await;
        writer.metrics().set_fleet(fleet.is_leader(), fleet.is_up());
        // Only a state this replica cannot build (or a chain it cannot follow) is a problem of
        // its own; etcd away or busy is reported elsewhere and passes.
        match &synced {
            Ok(_) => fleet.set_apply_problem(writer.metrics(), None),
            Err(CommandError::CannotApply(why)) => {
                fleet.set_apply_problem(writer.metrics(), Some(&why.to_string()))
            }
            Err(_) => {}
        }
        let backoff = match synced {
            Ok(applied) => {
                revision = applied;
                failures = 0;
                None
            }
            Err(e) => {
                // A watch from a revision not yet applied would fire at once: back off instead,
                // and say so once the failure is not a blip.
                failures += 1;
                if failures == 3 {
                    tracing::warn!(error = %e, "cannot apply the fleet's state; retrying");
                } else {
                    tracing::debug!(error = %e, "fleet sync failed; retrying");
                }
                Some(Duration::from_millis(200 << failures.min(4)))
            }
        };
        tokio::select! {
            _ = fleet.changed_after(revision, Duration::from_secs(1)), if backoff.is_none() => {}
            _ = tokio::time::sleep(backoff.unwrap_or_default()), if backoff.is_some() => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Campaigns for the canary controller's seat and holds it while the lease lives; resigns on
/// `stop` so a successor takes over at once.
pub async fn lead(writer: Arc<Writer>, mut stop: watch::Receiver<bool>) {
    let Some(fleet) = writer.fleet().cloned() else {
        return;
    };
    // A replica that cannot apply the fleet's state would judge and change a state it does not
    // route by: it leaves the seat (or its place in the queue) to the others until it can. Its
    // lease is kept alive meanwhile: the counters it publishes on it must not lapse.
    let until_problem_is = |present: bool| {
        let fleet = Arc::clone(&fleet);
        async move {
            while fleet.apply_problem().is_some() != present {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    loop {
        let held = async {
            let lease = fleet.lease().await?;
            let seat = async {
                loop {
                    until_problem_is(false).await;
                    tokio::select! {
                        campaigned = fleet.campaign(lease) => campaigned?,
                        // Dropping the campaign withdraws it (etcd resigns a cancelled one).
                        _ = until_problem_is(true) => continue,
                    }
                    tracing::info!(
                        replica = fleet.replica(),
                        "this replica now runs the canary controller"
                    );
                    writer.metrics().set_fleet(true, fleet.is_up());
                    until_problem_is(true).await;
                    fleet
                        .step_down("it cannot apply the fleet's routing state")
                        .await;
                    writer.metrics().set_fleet(false, fleet.is_up());
                }
            };
            tokio::select! {
                _ = fleet.keep_lease(lease) => {
                    fleet.lost_leadership("its etcd lease lapsed or could not be renewed");
                    Ok::<(), FleetError>(())
                }
                result = seat => result,
            }
        };
        tokio::select! {
            result = held => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "canary election: retrying");
                }
            }
            _ = stopped(&mut stop) => break,
        }
        writer.metrics().set_fleet(fleet.is_leader(), fleet.is_up());
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stopped(&mut stop) => break,
        }
    }
    fleet.resign().await;
    writer.metrics().set_fleet(false, fleet.is_up());
}

/// While this replica leads, compacts etcd's history every `compaction_interval`, up to the
/// revision it saw one interval earlier, as kube-apiserver does. etcd keeps every revision until
/// compacted, and each replica publishes its counters twice a second: uncompacted, a fleet of a
/// few replicas fills etcd's default 2 GiB quota within days, after which etcd refuses every
/// write. Nothing in weir reads history (a watch that finds its start compacted falls back to
/// reading the current state).
pub async fn compact_history(writer: Arc<Writer>, mut stop: watch::Receiver<bool>) {
    let Some(fleet) = writer.fleet().cloned() else {
        return;
    };
    let Some(every) = fleet.config().compaction_interval else {
        return;
    };
    let mut seen = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut stop) => return,
        }
        if !fleet.is_leader() {
            seen = None;
            continue;
        }
        let now = match fleet.revision().await {
            Ok(now) => now,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read etcd's revision to compact");
                continue;
            }
        };
        if let Some(old) = seen.filter(|old| *old < now) {
            match fleet.compact(old).await {
                Ok(true) => tracing::debug!(revision = old, "compacted etcd's history"),
                Ok(false) => tracing::debug!(revision = old, "etcd was already compacted"),
                Err(e) => tracing::warn!(error = %e, "cannot compact etcd's history"),
            }
        }
        seen = Some(now);
    }
}

/// Publishes this replica's counters every [`PUBLISH_INTERVAL`] until `stop`.
pub async fn publish_counters(writer: Arc<Writer>, mut stop: watch::Receiver<bool>) {
    let Some(fleet) = writer.fleet().cloned() else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PUBLISH_INTERVAL) => {}
            _ = stopped(&mut stop) => return,
        }
        let mut counters = super::canary::published(&writer.table().load(), &fleet.incarnation);
        counters.apply_problem = fleet.apply_problem();
        let value = serde_json::to_string(&counters).expect("counters serialize");
        if let Err(e) = fleet.publish(value).await {
            tracing::debug!(error = %e, "cannot publish counters");
        }
    }
}
