//! The conformance suite against the file backend, one test per case.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use runstate_conformance::Harness;
use runstate_core::{DocName, Error, ErrorKind, Lock, RunId, async_trait};
use runstate_file::{FileConfig, FileStore, SaveStep};

struct Files;

/// Documents made unwritable by [`Harness::make_unwritable`]: the path
/// prefix of their temporary files (`<root>/<run>/.<doc>.json.`), in every
/// namespace of this process.
static UNWRITABLE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The fault hook installed on every store the harness opens: writing the
/// bytes of an unwritable document fails as a full disk would.
fn full_disk_for_unwritable(step: SaveStep, path: &Path) -> std::io::Result<()> {
    let unwritable = UNWRITABLE.lock().unwrap_or_else(PoisonError::into_inner);
    if step == SaveStep::Write
        && path
            .to_str()
            .is_some_and(|p| unwritable.iter().any(|prefix| p.starts_with(prefix)))
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "no space left on device (staged by the conformance harness)",
        ));
    }
    Ok(())
}

fn root(namespace: &str) -> PathBuf {
    std::env::temp_dir()
        .join("runstate-conformance")
        .join(namespace)
}

#[async_trait]
impl Harness for Files {
    const BACKEND: &'static str = "file";
    const URL_VAR: Option<&'static str> = None;

    async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
        let config =
            FileConfig::new(root(namespace)).with_fault_hook(Arc::new(full_disk_for_unwritable));
        let store = FileStore::open(config).await?;
        Ok(Some(Arc::new(store)))
    }

    async fn make_unwritable(namespace: &str, run: &RunId, doc: &DocName) -> Result<bool, Error> {
        let prefix = format!(
            "{}/.{doc}.json.",
            root(namespace).join(run.as_str()).display()
        );
        UNWRITABLE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(prefix);
        Ok(true)
    }

    async fn cleanup(namespace: &str) -> Result<(), Error> {
        let dir = root(namespace);
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(
                Error::new(ErrorKind::Backend, format!("removing {}", dir.display()))
                    .with_source(e),
            ),
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Backend, "cleanup task").with_source(e))?
    }
}

runstate_conformance::suite!(Files);
