//! The one shutdown signal every long-lived task watches: a `watch` flag that turns true once.

use tokio::sync::watch;

/// Resolves once the flag turns true (or its sender is gone).
pub(crate) async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}
