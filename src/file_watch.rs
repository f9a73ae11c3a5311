//! Polling files for changes. A ConfigMap or Secret volume swaps a symlink
//! when it changes, which a watch on the file misses; reading it again does not.

use std::time::Duration;

/// Runs `reload` on the blocking pool every `interval` (first after one
/// interval) and hands each result to `report`, until the task is dropped.
/// `reload` says whether anything changed; a panic in it counts as no change.
pub async fn poll<E: Send + 'static>(
    interval: Duration,
    reload: impl Fn() -> Result<bool, E> + Clone + Send + 'static,
    mut report: impl FnMut(Result<bool, E>),
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let reload = reload.clone();
        let result = tokio::task::spawn_blocking(reload)
            .await
            .unwrap_or(Ok(false));
        report(result);
    }
}
