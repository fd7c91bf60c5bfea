//! Every backend of the workspace as a URL in a fresh namespace, for tests
//! that go through `runstate::open` (the facade's and the command line's).
//!
//! Servers come from the same variables as the conformance suite
//! (`RUNSTATE_REDIS_URL`, `RUNSTATE_POSTGRES_URL`, `RUNSTATE_MYSQL_URL`,
//! `RUNSTATE_S3_URL`). A missing one skips that backend loudly, or fails
//! the test when `RUNSTATE_REQUIRE_BACKENDS` names it.

#![allow(dead_code)] // each test crate uses its own part

use std::path::PathBuf;

mod urls;
#[allow(unused_imports)] // each test crate uses its own part
pub use urls::{encode, with_option};

/// A backend, as `runstate::open` knows it.
pub use runstate::Scheme as Backend;

/// Every backend that outlives a process, in the order of the real-run
/// round trip (the in-memory store has its own conformance test).
pub const ALL: [Backend; 6] = [
    Backend::File,
    Backend::Sqlite,
    Backend::Postgres,
    Backend::Mysql,
    Backend::Redis,
    Backend::S3,
];

/// The environment variable holding the URL of a backend's server.
fn url_var(backend: Backend) -> Option<&'static str> {
    match backend {
        Backend::Postgres => Some("RUNSTATE_POSTGRES_URL"),
        Backend::Mysql => Some("RUNSTATE_MYSQL_URL"),
        Backend::Redis => Some("RUNSTATE_REDIS_URL"),
        Backend::S3 => Some("RUNSTATE_S3_URL"),
        _ => None,
    }
}

/// Places in fresh namespaces, on every backend.
pub trait Places: Sized {
    /// A fresh, empty place on this backend, or `None` (after a loud
    /// message) when its server is not configured and not required.
    ///
    /// # Panics
    /// When the server is required (`RUNSTATE_REQUIRE_BACKENDS`) and its
    /// URL is not set.
    fn place(self, test: &str) -> Option<Place> {
        self.place_with(test, "")
    }

    /// As [`place`](Self::place), with extra URL options (`ext=nodb`).
    fn place_with(self, test: &str, options: &str) -> Option<Place>;
}

impl Places for Backend {
    fn place_with(self, test: &str, options: &str) -> Option<Place> {
        let ns = format!("rsm{:010x}", fastrand::u64(..) >> 24);
        let tmp = std::env::temp_dir();
        let url = match self {
            Backend::File => {
                let root = tmp.join(format!("runstate-{ns}"));
                format!("file://{}", root.display())
            }
            Backend::Sqlite => {
                let file = tmp.join(format!("runstate-{ns}.db"));
                format!("sqlite://{}", file.display())
            }
            Backend::Postgres | Backend::Mysql | Backend::Redis | Backend::S3 => {
                let var = url_var(self).expect("server backends have a variable");
                let base = runstate_conformance::server_url(self.name(), var, test)?;
                let mut url =
                    url::Url::parse(&base).expect("a valid server URL in the environment");
                match self {
                    Backend::S3 => {
                        let path = format!("{}/{ns}", url.path().trim_end_matches('/'));
                        url.set_path(&path);
                    }
                    Backend::Redis => {
                        url.query_pairs_mut()
                            .append_pair("prefix", &format!("rstest:{ns}"));
                    }
                    _ => {
                        url.query_pairs_mut()
                            .append_pair("prefix", &format!("{ns}_"));
                    }
                }
                url.to_string()
            }
            other => panic!("no test place for backend `{other}`"),
        };
        let url = if options.is_empty() {
            url
        } else {
            with_option(&url, options)
        };
        Some(Place {
            backend: self,
            url,
            ns,
        })
    }
}

/// A namespace on one backend: its URL, and how to remove everything in it.
#[derive(Debug)]
pub struct Place {
    pub backend: Backend,
    pub url: String,
    ns: String,
}

impl Place {
    /// The folder of a file place.
    pub fn file_root(&self) -> Option<PathBuf> {
        (self.backend == Backend::File)
            .then(|| std::env::temp_dir().join(format!("runstate-{}", self.ns)))
    }

    /// Removes the namespace: folders, database files, tables, keys,
    /// objects.
    pub async fn cleanup(&self) {
        let tmp = std::env::temp_dir();
        match self.backend {
            Backend::File => {
                let _ = std::fs::remove_dir_all(tmp.join(format!("runstate-{}", self.ns)));
            }
            Backend::Sqlite => {
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let _ =
                        std::fs::remove_file(tmp.join(format!("runstate-{}.db{suffix}", self.ns)));
                }
            }
            Backend::Postgres | Backend::Mysql => {
                let store = runstate::sql::SqlStore::connect(&self.url)
                    .await
                    .expect("reopen for cleanup");
                store
                    .uninstall()
                    .await
                    .expect("drop the namespace's tables");
            }
            Backend::Redis => {
                let store = runstate::redis::RedisStore::connect(&self.url)
                    .await
                    .expect("reopen for cleanup");
                store
                    .purge_prefix()
                    .await
                    .expect("delete the namespace's keys");
            }
            Backend::S3 => {
                let store = runstate::s3::S3Store::connect(&self.url)
                    .await
                    .expect("reopen for cleanup");
                store
                    .purge_prefix()
                    .await
                    .expect("delete the namespace's objects");
            }
            other => panic!("no test place for backend `{other}`"),
        }
    }
}
