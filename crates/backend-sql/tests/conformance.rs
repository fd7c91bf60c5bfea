//! The conformance suite against PostgreSQL (`RUNSTATE_POSTGRES_URL`),
//! MySQL/MariaDB (`RUNSTATE_MYSQL_URL`) and SQLite (a temporary file). Each
//! case works under its own table prefix (or its own SQLite file) and drops
//! only what it created.

use std::sync::Arc;

use runstate_conformance::Harness;
use runstate_core::{DocName, Error, ErrorKind, Lock, RunId, async_trait};
use runstate_sql::{SqlConfig, SqlStore};
use sqlx::{Connection, Executor};

/// Runs `statements` on a connection of its own to `url` (sqlx directly,
/// not the store: this is the harness reaching behind the store's back).
async fn raw_execute(url: &str, statements: &[String]) -> Result<(), Error> {
    let failed =
        |e: sqlx::Error| Error::new(ErrorKind::Backend, "staging SQL failed").with_source(e);
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.map_err(failed)?;
    for statement in statements {
        conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone())))
            .await
            .map_err(failed)?;
    }
    conn.close().await.map_err(failed)
}

/// The condition "this row is `run`/`doc`" in SQL. Ids are made of
/// `[A-Za-z0-9._-]`, so they need no quoting beyond the quotes.
fn is_row(run: &RunId, doc: &DocName, row: &str) -> String {
    format!(
        "{row}run = '{}' AND {row}name = '{}'",
        run.as_str(),
        doc.as_str()
    )
}

/// `returning`: MariaDB's acquire-and-load as one `INSERT … RETURNING`
/// (its default), or as MySQL's procedure, so that both paths are tested
/// on a MariaDB server.
async fn open_server(
    var: &str,
    namespace: &str,
    returning: bool,
) -> Result<Option<SqlStore>, Error> {
    let Ok(url) = std::env::var(var) else {
        return Ok(None);
    };
    let config = SqlConfig::from_url(&url)?
        .with_prefix(format!("{namespace}_"))?
        .with_mariadb_returning(returning);
    SqlStore::open(config).await.map(Some)
}

macro_rules! server_harness {
    ($module:ident, $name:ident, $backend:literal, $var:literal, $returning:literal) => {
        mod $module {
            use super::*;

            pub struct $name;

            #[async_trait]
            impl Harness for $name {
                const BACKEND: &'static str = $backend;
                const URL_VAR: Option<&'static str> = Some($var);

                async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
                    Ok(open_server($var, namespace, $returning)
                        .await?
                        .map(|s| Arc::new(s) as Arc<dyn Lock>))
                }

                async fn cleanup(namespace: &str) -> Result<(), Error> {
                    if let Some(store) = open_server($var, namespace, $returning).await? {
                        store.uninstall().await?;
                        store.close().await;
                    }
                    Ok(())
                }

                /// A CHECK constraint refusing that row, as a server
                /// refusing the write would; dropped with the table.
                async fn make_unwritable(
                    namespace: &str,
                    run: &RunId,
                    doc: &DocName,
                ) -> Result<bool, Error> {
                    let Ok(url) = std::env::var($var) else {
                        return Ok(false);
                    };
                    raw_execute(
                        &url,
                        &[format!(
                            "ALTER TABLE {namespace}_documents ADD CONSTRAINT {namespace}_unwritable \
                             CHECK (NOT ({}))",
                            is_row(run, doc, "")
                        )],
                    )
                    .await?;
                    Ok(true)
                }
            }

            runstate_conformance::suite!($name);
        }
    };
}

server_harness!(
    postgres,
    Postgres,
    "postgres",
    "RUNSTATE_POSTGRES_URL",
    true
);
server_harness!(mysql, MySql, "mysql", "RUNSTATE_MYSQL_URL", true);
// MySQL's path (the acquire_and_load procedure), on whatever server
// RUNSTATE_MYSQL_URL names: on MariaDB, the path MySQL servers take.
server_harness!(
    mysql_procedure,
    MySqlProcedure,
    "mysql",
    "RUNSTATE_MYSQL_URL",
    false
);

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

        /// Triggers aborting any insert or update of that row.
        async fn make_unwritable(
            namespace: &str,
            run: &RunId,
            doc: &DocName,
        ) -> Result<bool, Error> {
            let url = format!("sqlite://{}", path(namespace).display());
            let table = format!("{}documents", runstate_sql::DEFAULT_PREFIX);
            let statements = ["INSERT", "UPDATE"].map(|event| {
                format!(
                    "CREATE TRIGGER unwritable_{event} BEFORE {event} ON {table} \
                     WHEN {} BEGIN SELECT RAISE(ABORT, 'unwritable'); END",
                    is_row(run, doc, "NEW.")
                )
            });
            raw_execute(&url, &statements).await?;
            Ok(true)
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
