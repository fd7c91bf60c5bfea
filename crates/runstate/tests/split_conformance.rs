//! The conformance suite on split stores: documents in one backend, leases
//! from another, opened by URL (`<docs URL>?locks=<percent-encoded lock
//! service URL>`), every case including the stopped-holder and
//! multi-process ones:
//!
//! - `file+redis`, `file+postgres`, `sqlite+redis`, `postgres+redis`,
//!   `s3+redis` (S3 fences by version only), `memory+memory`;
//! - `hosts`: file+redis whose child processes each run as another host
//!   (their own UTS, pid and mount namespaces, another host name and
//!   machine id), so no same-host shortcut such as breaking a dead pid
//!   applies between them: the shared-folder case WEPPcloud's workers are.

#[path = "support/urls.rs"]
#[allow(dead_code)] // each test crate uses its own part
mod urls;

use std::sync::Arc;

use runstate::{Error, ErrorKind, Lock, async_trait};
use runstate_conformance::{Harness, is_required};
use urls::{encode, with_option};

/// The URL of a server from the environment, or `None` (the harness then
/// reports the backend as not configured).
fn server(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// Where each backend keeps a namespace.
#[derive(Clone, Copy)]
enum Part {
    File,
    Sqlite,
    Postgres,
    Redis,
    S3,
    Memory,
}

impl Part {
    fn url(self, namespace: &str) -> Option<String> {
        let tmp = std::env::temp_dir();
        Some(match self {
            Part::File => format!(
                "file://{}",
                tmp.join(format!("runstate-split-{namespace}")).display()
            ),
            Part::Sqlite => format!(
                "sqlite://{}",
                tmp.join(format!("runstate-split-{namespace}.db")).display()
            ),
            Part::Postgres => with_option(
                &server("RUNSTATE_POSTGRES_URL")?,
                &format!("prefix={namespace}_"),
            ),
            Part::Redis => with_option(
                &server("RUNSTATE_REDIS_URL")?,
                &format!("prefix=rstest:{namespace}"),
            ),
            Part::S3 => {
                let base = server("RUNSTATE_S3_URL")?;
                let (path, query) = base.split_once('?').unwrap_or((&base, ""));
                format!("{}/{namespace}?{query}", path.trim_end_matches('/'))
            }
            Part::Memory => format!("memory://split-{namespace}"),
        })
    }

    async fn cleanup(self, namespace: &str) -> Result<(), Error> {
        let tmp = std::env::temp_dir();
        match self {
            Part::File => {
                let _ = std::fs::remove_dir_all(tmp.join(format!("runstate-split-{namespace}")));
            }
            Part::Sqlite => {
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let _ = std::fs::remove_file(
                        tmp.join(format!("runstate-split-{namespace}.db{suffix}")),
                    );
                }
            }
            Part::Postgres => {
                if let Some(url) = self.url(namespace) {
                    let store = runstate::sql::SqlStore::connect(&url).await?;
                    store.uninstall().await?;
                    store.close().await;
                }
            }
            Part::Redis => {
                if let Some(url) = self.url(namespace) {
                    runstate::redis::RedisStore::connect(&url)
                        .await?
                        .purge_prefix()
                        .await?;
                }
            }
            Part::S3 => {
                if let Some(url) = self.url(namespace) {
                    runstate::s3::S3Store::connect(&url)
                        .await?
                        .purge_prefix()
                        .await?;
                }
            }
            Part::Memory => {}
        }
        Ok(())
    }
}

async fn open_split(
    docs: Part,
    locks: Part,
    namespace: &str,
) -> Result<Option<Arc<dyn Lock>>, Error> {
    let (Some(docs), Some(locks)) = (docs.url(namespace), locks.url(namespace)) else {
        return Ok(None);
    };
    let url = with_option(&docs, &format!("locks={}", encode(&locks)));
    let store = runstate::open(&url).await?;
    let backend = store.capabilities().backend;
    if !backend.contains('+') {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{url} did not open a split store: {backend}"),
        ));
    }
    Ok(Some(store.into_lock()))
}

macro_rules! split_harness {
    ($module:ident, $name:literal, $docs:expr, $locks:expr, $var:expr) => {
        mod $module {
            use super::*;

            pub struct Split;

            #[async_trait]
            impl Harness for Split {
                const BACKEND: &'static str = $name;
                const URL_VAR: Option<&'static str> = $var;
                const CROSS_PROCESS: bool = !matches!($docs, Part::Memory);

                async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
                    open_split($docs, $locks, namespace).await
                }

                async fn cleanup(namespace: &str) -> Result<(), Error> {
                    $docs.cleanup(namespace).await?;
                    $locks.cleanup(namespace).await
                }
            }

            runstate_conformance::suite!(Split);
        }
    };
}

split_harness!(
    memory_memory,
    "memory+memory",
    Part::Memory,
    Part::Memory,
    None
);
split_harness!(
    file_redis,
    "file+redis",
    Part::File,
    Part::Redis,
    Some("RUNSTATE_REDIS_URL")
);
split_harness!(
    file_postgres,
    "file+postgres",
    Part::File,
    Part::Postgres,
    Some("RUNSTATE_POSTGRES_URL")
);
split_harness!(
    sqlite_redis,
    "sqlite+redis",
    Part::Sqlite,
    Part::Redis,
    Some("RUNSTATE_REDIS_URL")
);
split_harness!(
    postgres_redis,
    "postgres+redis",
    Part::Postgres,
    Part::Redis,
    Some("RUNSTATE_REDIS_URL")
);
split_harness!(
    s3_redis,
    "s3+redis",
    Part::S3,
    Part::Redis,
    Some("RUNSTATE_S3_URL")
);

/// file+redis with every child process in namespaces of its own, as
/// another host would be.
mod hosts {
    use super::*;

    pub struct Hosts;

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
    }

    #[async_trait]
    impl Harness for Hosts {
        const BACKEND: &'static str = "hosts";
        const URL_VAR: Option<&'static str> = Some("RUNSTATE_REDIS_URL");

        async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
            if !is_root() {
                if is_required("hosts") {
                    panic!("the multi-host split test needs root to make namespaces");
                }
                return Ok(None);
            }
            open_split(Part::File, Part::Redis, namespace).await
        }

        async fn cleanup(namespace: &str) -> Result<(), Error> {
            Part::File.cleanup(namespace).await?;
            Part::Redis.cleanup(namespace).await
        }

        /// Another host: its own host name (UTS namespace), pid numbering
        /// (pid namespace, so its pids mean nothing here) and machine id
        /// (a file bind-mounted over /etc/machine-id in its own mount
        /// namespace). It shares the folder and reaches Redis on loopback,
        /// as a worker on another machine shares NFS and reaches the cache.
        fn child_wrapper(index: usize) -> Vec<String> {
            let machine_id = std::env::temp_dir().join(format!("runstate-host{index}-machine-id"));
            let _ = std::fs::write(
                &machine_id,
                format!("{:032x}\n", 0xfeed_0000 + index as u128),
            );
            let script = format!(
                "hostname worker-host-{index} && mount --bind '{}' /etc/machine-id && exec \"$@\"",
                machine_id.display()
            );
            [
                "unshare",
                "--uts",
                "--pid",
                "--fork",
                "--mount",
                "--mount-proc",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                "worker",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
        }
    }

    runstate_conformance::suite!(Hosts);
}

/// Which split stores say hosts may share them: files whose leases come
/// from Redis (the shared folder of WEPPcloud's workers) do; in-process
/// documents and a SQLite file do not, whatever the lock service (they
/// claimed to, from their fence watermarks alone).
#[tokio::test]
async fn only_shareable_documents_make_a_multi_host_split_store() {
    let Some(redis) = runstate_conformance::server_url("redis", "RUNSTATE_REDIS_URL", "multi-host")
    else {
        return;
    };
    let locks = format!("locks={}", encode(&redis));
    let root = std::env::temp_dir().join(format!("runstate-multihost-{:x}", fastrand::u64(..)));
    let cases = [
        (format!("file://{}", root.join("files").display()), true),
        ("memory://multihost".to_owned(), false),
        (
            format!("sqlite://{}", root.join("db.sqlite").display()),
            false,
        ),
    ];
    std::fs::create_dir_all(&root).expect("root");
    for (docs, shared) in cases {
        let store = runstate::open(&with_option(&docs, &locks))
            .await
            .unwrap_or_else(|e| panic!("{docs}: {e}"));
        assert_eq!(store.capabilities().multi_host, shared, "{docs}");
    }
    let _ = std::fs::remove_dir_all(&root);
}
