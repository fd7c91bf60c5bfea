//! The conformance suite against PostgreSQL (`RUNSTATE_POSTGRES_URL`),
//! MySQL/MariaDB (`RUNSTATE_MYSQL_URL`) and SQLite (a temporary file). Each
//! case works under its own table prefix (or its own SQLite file) and drops
//! only what it created.

use std::sync::Arc;

use runstate_conformance::Harness;
use runstate_core::{Error, Lock, async_trait};
use runstate_sql::{SqlConfig, SqlStore};

async fn open_server(var: &str, namespace: &str) -> Result<Option<SqlStore>, Error> {
    let Ok(url) = std::env::var(var) else {
        return Ok(None);
    };
    let config = SqlConfig::from_url(&url)?.with_prefix(format!("{namespace}_"))?;
    SqlStore::open(config).await.map(Some)
}

macro_rules! server_harness {
    ($module:ident, $name:ident, $backend:literal, $var:literal) => {
        mod $module {
            use super::*;

            pub struct $name;

            #[async_trait]
            impl Harness for $name {
                const BACKEND: &'static str = $backend;
                const URL_VAR: Option<&'static str> = Some($var);

                async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
                    Ok(open_server($var, namespace)
                        .await?
                        .map(|s| Arc::new(s) as Arc<dyn Lock>))
                }

                async fn cleanup(namespace: &str) -> Result<(), Error> {
                    if let Some(store) = open_server($var, namespace).await? {
                        store.uninstall().await?;
                        store.close().await;
                    }
                    Ok(())
                }
            }

            runstate_conformance::suite!($name);
        }
    };
}

server_harness!(postgres, Postgres, "postgres", "RUNSTATE_POSTGRES_URL");
server_harness!(mysql, MySql, "mysql", "RUNSTATE_MYSQL_URL");

mod sqlite {
    use super::*;

    pub struct Sqlite;

    fn path(namespace: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("runstate-sqlite-{namespace}.db"))
    }

    #[async_trait]
    impl Harness for Sqlite {
        const BACKEND: &'static str = "sqlite";
        const URL_VAR: Option<&'static str> = None;

        async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
            let url = format!("sqlite://{}", path(namespace).display());
            Ok(Some(Arc::new(SqlStore::connect(&url).await?)))
        }

        async fn cleanup(namespace: &str) -> Result<(), Error> {
            let file = path(namespace);
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
            Ok(())
        }
    }

    runstate_conformance::suite!(Sqlite);
}
