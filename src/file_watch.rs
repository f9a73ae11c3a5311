//! Noticing changed files. A ConfigMap or Secret volume swaps a symlink in
//! the file's folder when it changes, so the folder is watched (inotify),
//! not the file; a change is then read at once. A slow poll stays as a net
//! for file systems that send no notifications.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};

/// How long a burst of notifications is gathered before reading: a writer
/// that replaces several files (a Secret's certificate and key) ends first.
const SETTLE: Duration = Duration::from_millis(200);

/// Runs `reload` on the blocking pool when a file in the folders of `files`
/// changes, and at least every `interval`, and hands each result to
/// `report`, until the task is dropped. `reload` says whether anything
/// changed; a panic in it counts as no change.
pub async fn watch<E: Send + 'static>(
    files: &[&Path],
    interval: Duration,
    reload: impl Fn() -> Result<bool, E> + Clone + Send + 'static,
    mut report: impl FnMut(Result<bool, E>),
) {
    let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel::<()>();
    // Kept alive for as long as the loop runs; without it, polling alone.
    let _watcher = folder_watcher(files, notified);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = notifications.recv() => {
                tokio::time::sleep(SETTLE).await;
                while notifications.try_recv().is_ok() {}
            }
        }
        let reload = reload.clone();
        let result = tokio::task::spawn_blocking(reload)
            .await
            .unwrap_or(Ok(false));
        report(result);
    }
}

/// A watcher of the folders holding `files`; `None` (with a warning) where
/// the platform offers none.
fn folder_watcher(
    files: &[&Path],
    notified: tokio::sync::mpsc::UnboundedSender<()>,
) -> Option<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| !event.kind.is_access()) {
            let _ = notified.send(());
        }
    })
    .inspect_err(|error| tracing::warn!(%error, "no file notifications: polling only"))
    .ok()?;
    let mut folders: Vec<PathBuf> = files.iter().map(|file| folder_of(file)).collect();
    folders.sort();
    folders.dedup();
    for folder in folders {
        if let Err(error) = watcher.watch(&folder, RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %folder.display(), %error, "cannot watch the folder: polling it only");
        }
    }
    Some(watcher)
}

fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn a_change_in_the_folder_is_read_without_waiting_for_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        std::fs::write(&file, "a").unwrap();
        let reads = Arc::new(AtomicUsize::new(0));
        let (changed, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let counter = reads.clone();
        let path = file.clone();
        let watching = tokio::spawn(async move {
            watch(
                &[&path],
                // A poll this slow never runs during the test.
                Duration::from_secs(3600),
                move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ()>(true)
                },
                move |result| {
                    let _ = changed.send(result);
                },
            )
            .await
        });
        // Let the watcher start, then swap the file in as a ConfigMap does.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let staged = dir.path().join("..data_tmp");
        std::fs::write(&staged, "b").unwrap();
        std::fs::rename(&staged, &file).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(20), seen.recv()).await;
        watching.abort();
        assert_eq!(
            result.expect("a notification should trigger a read"),
            Some(Ok(true))
        );
        assert!(reads.load(Ordering::SeqCst) >= 1);
    }
}
