//! The raw baselines of the benchmarks: each backend's own client doing the
//! least a read or a durable write of one value needs, with nothing of
//! runstate in the way.
//!
//! - file: `std::fs::read`; write + fsync + rename + folder fsync, on the
//!   blocking pool (as any async caller's file I/O must run).
//! - redis: redis-rs `GET`/`SET` through a `ConnectionManager`.
//! - redis-cluster: redis-rs `GET`/`SET` through its cluster client
//!   (`RUNSTATE_REDIS_CLUSTER_URL`).
//! - postgres, mysql, sqlite: a bare sqlx `SELECT` by primary key and a
//!   bare upsert, on the database's native driver, in a table of its own.
//! - s3: object_store `get`/`put` through the same kind of client.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use runstate::Bytes;

/// A raw client of one backend, confined to its own folder, key prefix,
/// table or object prefix.
pub enum Raw {
    File(PathBuf),
    Redis(redis::aio::ConnectionManager, String),
    RedisCluster(redis::cluster_async::ClusterConnection, String),
    Postgres(sqlx::PgPool, String),
    Mysql(sqlx::MySqlPool, String),
    Sqlite(sqlx::SqlitePool, String, PathBuf),
    S3(Arc<object_store::aws::AmazonS3>, String),
}

/// The server URL of a backend, from the environment.
pub fn server_url(backend: &str) -> Option<String> {
    let var = match backend {
        "redis" => "RUNSTATE_REDIS_URL",
        "postgres" => "RUNSTATE_POSTGRES_URL",
        "mysql" => "RUNSTATE_MYSQL_URL",
        "s3" => "RUNSTATE_S3_URL",
        _ => return None,
    };
    std::env::var(var).ok()
}

/// The values of the raw SQL table: a text key, a blob value.
fn sql_statements(backend: &str, table: &str) -> (String, String, String) {
    let (key_type, blob, upsert_tail, p1, p2) = match backend {
        "postgres" => (
            "TEXT",
            "BYTEA",
            "ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
            "$1",
            "$2",
        ),
        "mysql" => (
            "VARCHAR(64)",
            "LONGBLOB",
            "ON DUPLICATE KEY UPDATE v = VALUES(v)",
            "?",
            "?",
        ),
        _ => (
            "TEXT",
            "BLOB",
            "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            "?",
            "?",
        ),
    };
    (
        format!("CREATE TABLE {table} (k {key_type} PRIMARY KEY, v {blob} NOT NULL)"),
        format!("SELECT v FROM {table} WHERE k = {p1}"),
        format!("INSERT INTO {table} (k, v) VALUES ({p1}, {p2}) {upsert_tail}"),
    )
}

/// Runs one of the sqlx statements on whichever pool the variant holds.
macro_rules! on_sql_pool {
    ($self:expr, |$pool:ident, $backend:ident, $table:ident| $body:expr) => {
        match $self {
            Raw::Postgres($pool, $table) => {
                let $backend = "postgres";
                $body
            }
            Raw::Mysql($pool, $table) => {
                let $backend = "mysql";
                $body
            }
            Raw::Sqlite($pool, $table, _) => {
                let $backend = "sqlite";
                $body
            }
            _ => unreachable!("not an SQL backend"),
        }
    };
}

impl Raw {
    /// Opens the raw client of `backend` under `tag` (unique per run).
    pub async fn open(backend: &str, tag: &str) -> Raw {
        match backend {
            "file" => {
                let dir = std::env::temp_dir().join(format!("runstate-raw-{tag}"));
                fs::create_dir_all(&dir).expect("raw folder");
                Raw::File(dir)
            }
            "redis" => {
                let url = server_url("redis").expect("RUNSTATE_REDIS_URL");
                let client = redis::Client::open(url.as_str()).expect("redis client");
                let con = client
                    .get_connection_manager()
                    .await
                    .expect("raw connection");
                Raw::Redis(con, format!("rsraw:{tag}"))
            }
            "redis-cluster" => {
                let url = std::env::var("RUNSTATE_REDIS_CLUSTER_URL")
                    .expect("RUNSTATE_REDIS_CLUSTER_URL");
                let nodes: Vec<String> = url
                    .trim_start_matches("redis+cluster://")
                    .split(['/', '?'])
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|node| format!("redis://{node}"))
                    .collect();
                let con = redis::cluster::ClusterClient::new(nodes)
                    .expect("cluster client")
                    .get_async_connection()
                    .await
                    .expect("raw cluster connection");
                Raw::RedisCluster(con, format!("rsraw:{tag}"))
            }
            "postgres" | "mysql" | "sqlite" => {
                use sqlx::{AssertSqlSafe, Executor};
                let table = format!("rsraw_{tag}");
                let raw = match backend {
                    "postgres" => Raw::Postgres(
                        sqlx::PgPool::connect(
                            &server_url("postgres").expect("RUNSTATE_POSTGRES_URL"),
                        )
                        .await
                        .expect("raw pool"),
                        table,
                    ),
                    "mysql" => Raw::Mysql(
                        sqlx::MySqlPool::connect(&server_url("mysql").expect("RUNSTATE_MYSQL_URL"))
                            .await
                            .expect("raw pool"),
                        table,
                    ),
                    _ => {
                        // As the store's document pool: WAL, full sync.
                        let path = std::env::temp_dir().join(format!("runstate-raw-{tag}.db"));
                        let options = sqlx::sqlite::SqliteConnectOptions::new()
                            .filename(&path)
                            .create_if_missing(true)
                            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                            .synchronous(sqlx::sqlite::SqliteSynchronous::Full);
                        Raw::Sqlite(
                            sqlx::SqlitePool::connect_with(options)
                                .await
                                .expect("raw pool"),
                            table,
                            path,
                        )
                    }
                };
                on_sql_pool!(&raw, |pool, backend, table| {
                    let (create, _, _) = sql_statements(backend, table);
                    pool.execute(sqlx::raw_sql(AssertSqlSafe(create)))
                        .await
                        .expect("raw table");
                });
                raw
            }
            "s3" => {
                use object_store::ClientOptions;
                let url = server_url("s3").expect("RUNSTATE_S3_URL");
                let config = runstate::s3::S3Config::from_url(&url).expect("RUNSTATE_S3_URL");
                let parsed = url::Url::parse(&url).expect("url");
                let option = |name: &str| {
                    parsed
                        .query_pairs()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.into_owned())
                };
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(config.bucket())
                    .with_client_options(
                        ClientOptions::new()
                            .with_allow_http(option("allow_http").as_deref() == Some("true")),
                    );
                if let Some(endpoint) = option("endpoint") {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = option("region") {
                    builder = builder.with_region(region);
                }
                let prefix = format!("{}/raw-{tag}", config.prefix())
                    .trim_start_matches('/')
                    .to_owned();
                Raw::S3(Arc::new(builder.build().expect("raw client")), prefix)
            }
            other => panic!("no raw baseline for `{other}` (or its feature is off)"),
        }
    }

    /// What the baselines are called in the tables: (read, write).
    pub fn names(&self) -> (&'static str, &'static str) {
        match self {
            Raw::File(_) => (
                "std::fs::read, blocking pool",
                "write+fsync+rename+dir fsync, blocking pool",
            ),
            Raw::Redis(..) => ("redis-rs GET", "redis-rs SET"),
            Raw::RedisCluster(..) => ("redis-rs cluster GET", "redis-rs cluster SET"),
            Raw::S3(..) => ("object_store get", "object_store put"),
            _ => ("bare sqlx SELECT by key", "bare sqlx upsert"),
        }
    }

    /// Reads the value under `key`.
    pub async fn read(&self, key: &str) -> Bytes {
        match self {
            Raw::File(dir) => {
                let path = dir.join(key);
                Bytes::from(
                    tokio::task::spawn_blocking(move || fs::read(path).expect("read"))
                        .await
                        .expect("join"),
                )
            }
            Raw::Redis(con, prefix) => {
                use redis::AsyncCommands;
                let mut con = con.clone();
                let bytes: Vec<u8> = con.get(format!("{prefix}:{key}")).await.expect("GET");
                Bytes::from(bytes)
            }
            Raw::RedisCluster(con, prefix) => {
                use redis::AsyncCommands;
                let mut con = con.clone();
                let bytes: Vec<u8> = con.get(format!("{prefix}:{key}")).await.expect("GET");
                Bytes::from(bytes)
            }
            Raw::S3(store, prefix) => {
                use object_store::ObjectStoreExt;
                let path = object_store::path::Path::from(format!("{prefix}/{key}"));
                store
                    .get(&path)
                    .await
                    .expect("raw get")
                    .bytes()
                    .await
                    .expect("raw body")
            }
            sql => on_sql_pool!(sql, |pool, backend, table| {
                use sqlx::AssertSqlSafe;
                let (_, select, _) = sql_statements(backend, table);
                let row: (Vec<u8>,) = sqlx::query_as(AssertSqlSafe(select))
                    .bind(key)
                    .fetch_one(pool)
                    .await
                    .expect("raw select");
                Bytes::from(row.0)
            }),
        }
    }

    /// Writes `bytes` under `key`, as durably as the backend writes.
    pub async fn write(&self, key: &str, bytes: Bytes) {
        match self {
            Raw::File(dir) => {
                let dir = dir.clone();
                let key = key.to_owned();
                tokio::task::spawn_blocking(move || durable_write(&dir, &key, &bytes))
                    .await
                    .expect("join");
            }
            Raw::Redis(con, prefix) => {
                use redis::AsyncCommands;
                let mut con = con.clone();
                let _: () = con
                    .set(format!("{prefix}:{key}"), bytes.as_ref())
                    .await
                    .expect("SET");
            }
            Raw::RedisCluster(con, prefix) => {
                use redis::AsyncCommands;
                let mut con = con.clone();
                let _: () = con
                    .set(format!("{prefix}:{key}"), bytes.as_ref())
                    .await
                    .expect("SET");
            }
            Raw::S3(store, prefix) => {
                use object_store::ObjectStoreExt;
                let path = object_store::path::Path::from(format!("{prefix}/{key}"));
                store.put(&path, bytes.into()).await.expect("raw put");
            }
            sql => on_sql_pool!(sql, |pool, backend, table| {
                use sqlx::AssertSqlSafe;
                let (_, _, upsert) = sql_statements(backend, table);
                sqlx::query(AssertSqlSafe(upsert))
                    .bind(key)
                    .bind(bytes.to_vec())
                    .execute(pool)
                    .await
                    .expect("raw upsert");
            }),
        }
    }

    /// Lists every value written so far with one listing of the client's
    /// prefix, and returns how many it holds; `None` for backends whose
    /// migrations do not list the source through a request (only S3's
    /// listing is a request of its own whose cost grows with the run).
    pub async fn list(&self) -> Option<usize> {
        match self {
            Raw::S3(store, prefix) => {
                use object_store::ObjectStore;
                let prefix = object_store::path::Path::from(prefix.as_str());
                let listed = store
                    .list_with_delimiter(Some(&prefix))
                    .await
                    .expect("raw list");
                Some(listed.objects.len())
            }
            _ => None,
        }
    }

    /// Removes the folder, keys, table or objects.
    pub async fn cleanup(self) {
        match self {
            Raw::File(dir) => {
                let _ = fs::remove_dir_all(dir);
            }
            Raw::RedisCluster(mut con, prefix) => {
                // The only keys the benchmark writes.
                for key in ["read", "write"] {
                    let _: () = redis::cmd("DEL")
                        .arg(format!("{prefix}:{key}"))
                        .query_async(&mut con)
                        .await
                        .expect("DEL");
                }
            }
            Raw::Redis(mut con, prefix) => {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{prefix}:*"))
                    .query_async(&mut con)
                    .await
                    .expect("KEYS");
                if !keys.is_empty() {
                    let _: () = redis::cmd("DEL")
                        .arg(keys)
                        .query_async(&mut con)
                        .await
                        .expect("DEL");
                }
            }
            Raw::S3(store, prefix) => {
                use futures_util::TryStreamExt;
                use object_store::{ObjectStore, ObjectStoreExt};
                let prefix = object_store::path::Path::from(prefix);
                let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.expect("list");
                for meta in listed {
                    store.delete(&meta.location).await.expect("delete");
                }
            }
            sql => {
                on_sql_pool!(&sql, |pool, _backend, table| {
                    use sqlx::{AssertSqlSafe, Executor};
                    pool.execute(sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {table}"))))
                        .await
                        .expect("drop raw");
                    pool.close().await;
                });
                if let Raw::Sqlite(_, _, path) = &sql {
                    for suffix in ["", "-wal", "-shm"] {
                        let _ = fs::remove_file(format!("{}{suffix}", path.display()));
                    }
                }
            }
        }
    }
}

/// What a durable file save has to do, written directly with std.
pub fn durable_write(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.raw-tmp"));
    let mut f = fs::File::create(&tmp).expect("create");
    f.write_all(bytes).expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    fs::rename(&tmp, dir.join(name)).expect("rename");
    fs::File::open(dir)
        .expect("open dir")
        .sync_all()
        .expect("dir fsync");
}
