//! The conformance suite against the file backend, one test per case.

use std::path::PathBuf;
use std::sync::Arc;

use runstate_conformance::Harness;
use runstate_core::{Error, ErrorKind, Lock, async_trait};
use runstate_file::{FileConfig, FileStore};

struct Files;

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
        let store = FileStore::open(FileConfig::new(root(namespace))).await?;
        Ok(Some(Arc::new(store)))
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
