//! The runstate benchmark: workloads W1–W4 on each backend, each against a
//! raw baseline measured in the same run, interleaved round by round so the
//! noise of a shared machine hits both alike.
//!
//! Run it with `cargo xtask bench [--backend NAME] [--quick]`, which calls
//! `cargo bench -p runstate --bench workloads -- …`. It prints a markdown
//! table and writes `target/bench/report.json`.
//!
//! - W1: load a 4 KiB document.
//! - W2: durable save of a 4 KiB document.
//! - W3: locked update of a 4 KiB document: acquire → load → mutate →
//!   fenced save → release, as `acquire_and_load` + `save_and_release`
//!   (W3t: the same through the typed `Run::update`, JSON included).
//! - W4: 8 concurrent updaters on one document (W3 each, waiting with
//!   `LockExt`); updates/s against W3's single-updater rate, lost updates.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate::{
    Bytes, Client, DocName, Document, GetOptions, Lock, LockExt, LockKey, Owner, PutMode,
    PutOptions, RunId, WaitPolicy,
};
use serde::{Deserialize, Serialize};

const DOC_SIZE: usize = 4096;

#[derive(Debug, Clone)]
struct Args {
    backends: Vec<String>,
    quick: bool,
    out: PathBuf,
}

fn parse_args() -> Args {
    let mut backends = Vec::new();
    let mut quick = false;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => backends.push(args.next().expect("--backend NAME")),
            "--quick" => quick = true,
            "--out" => out = Some(PathBuf::from(args.next().expect("--out PATH"))),
            // cargo bench passes --bench; ignore what is not ours.
            _ => {}
        }
    }
    let out = out.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(
                || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
                PathBuf::from,
            )
            .join("bench/report.json")
    });
    Args {
        backends,
        quick,
        out,
    }
}

/// One measured series.
#[derive(Debug, Clone, Default)]
struct Series {
    latencies: Vec<Duration>,
    busy: Duration,
}

impl Series {
    fn record(&mut self, d: Duration) {
        self.latencies.push(d);
        self.busy += d;
    }

    fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let index = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted[index]
    }

    fn median(&self) -> Duration {
        self.quantile(0.5)
    }

    fn ops_per_sec(&self) -> f64 {
        if self.busy.is_zero() {
            return 0.0;
        }
        self.latencies.len() as f64 / self.busy.as_secs_f64()
    }
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    backend: String,
    workload: String,
    ops: usize,
    median_us: f64,
    p99_us: f64,
    ops_per_sec: f64,
    baseline: Option<String>,
    baseline_median_us: Option<f64>,
    ratio: Option<f64>,
    target: Option<f64>,
    meets_target: Option<bool>,
    note: String,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn row(
    backend: &str,
    workload: &str,
    series: &Series,
    baseline: Option<(&str, &Series)>,
    target: Option<f64>,
) -> Row {
    let median = us(series.median());
    let (baseline_name, baseline_median, ratio) = match baseline {
        Some((name, base)) => {
            let b = us(base.median());
            (Some(name.to_owned()), Some(b), Some(median / b))
        }
        None => (None, None, None),
    };
    Row {
        backend: backend.to_owned(),
        workload: workload.to_owned(),
        ops: series.latencies.len(),
        median_us: median,
        p99_us: us(series.quantile(0.99)),
        ops_per_sec: series.ops_per_sec(),
        baseline: baseline_name,
        baseline_median_us: baseline_median,
        ratio,
        target,
        meets_target: ratio.zip(target).map(|(r, t)| r <= t),
        note: String::new(),
    }
}

/// The typed 4 KiB document of W3 and W4.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Bench4k {
    count: u64,
    payload: String,
}

impl Document for Bench4k {
    const NAME: &'static str = "bench4k";
}

fn bench4k(count: u64) -> Bench4k {
    let mut doc = Bench4k {
        count,
        payload: String::new(),
    };
    // Fill so the JSON encoding is about 4 KiB.
    doc.payload = "x".repeat(DOC_SIZE - 30);
    doc
}

fn payload(i: u64) -> Bytes {
    let mut bytes = vec![b'r'; DOC_SIZE];
    bytes[..8].copy_from_slice(&i.to_le_bytes());
    Bytes::from(bytes)
}

struct Plan {
    rounds: usize,
    reads: usize,
    writes: usize,
    updates: usize,
    concurrent_each: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 3,
                reads: 300,
                writes: 40,
                updates: 40,
                concurrent_each: 10,
            }
        } else {
            Plan {
                rounds: 5,
                reads: 2000,
                writes: 200,
                updates: 200,
                concurrent_each: 50,
            }
        }
    }
}

/// Measures one block of `n` calls of `f`.
async fn block<F, Fut>(series: &mut Series, n: usize, mut f: F)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for i in 0..n {
        let start = Instant::now();
        f(i as u64).await;
        series.record(start.elapsed());
    }
}

/// W1–W4 on one store.
struct Workloads {
    store: Arc<dyn Lock>,
    run: RunId,
}

const LEASE_TTL: Duration = Duration::from_secs(30);

fn counter_of(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

impl Workloads {
    fn doc(name: &str) -> DocName {
        DocName::new(name).expect("valid")
    }

    async fn seed(&self) {
        for name in ["w1", "w3", "w4"] {
            self.store
                .put(
                    &self.run,
                    &Self::doc(name),
                    payload(0),
                    PutOptions::overwrite(),
                )
                .await
                .expect("seed");
        }
        Client::new(Arc::clone(&self.store))
            .run(self.run.clone())
            .save(&bench4k(0))
            .await
            .expect("seed W3t");
    }

    async fn w1_load(&self, n: usize) -> Series {
        let doc = Self::doc("w1");
        let mut s = Series::default();
        block(&mut s, n, |_| async {
            let got = self
                .store
                .get(&self.run, &doc, GetOptions::new())
                .await
                .expect("W1 get");
            assert_eq!(got.expect("present").bytes.len(), DOC_SIZE);
        })
        .await;
        s
    }

    async fn w2_save(&self, n: usize, offset: u64) -> Series {
        let doc = Self::doc("w2");
        let doc = &doc;
        let mut s = Series::default();
        block(&mut s, n, |i| async move {
            self.store
                .put(&self.run, doc, payload(offset + i), PutOptions::overwrite())
                .await
                .expect("W2 put");
        })
        .await;
        s
    }

    /// One locked update: acquire → load → mutate → fenced save → release.
    async fn locked_increment(
        store: &dyn Lock,
        run: &RunId,
        doc: &DocName,
        owner: &Owner,
        wait: Option<&WaitPolicy>,
    ) {
        let key = LockKey::Doc(run.clone(), doc.clone());
        let (lease, stored) = match wait {
            None => {
                store
                    .acquire_and_load(&key, doc, owner, LEASE_TTL, GetOptions::new())
                    .await
            }
            Some(policy) => {
                store
                    .acquire_and_load_waiting(
                        &key,
                        doc,
                        owner,
                        LEASE_TTL,
                        GetOptions::new(),
                        policy,
                    )
                    .await
            }
        }
        .expect("acquire and load");
        let stored = stored.expect("present");
        let next = payload(counter_of(&stored.bytes) + 1);
        store
            .save_and_release(&lease, doc, next, PutMode::Update(stored.version))
            .await
            .expect("save and release");
    }

    async fn w3_update(&self, n: usize) -> Series {
        let doc = Self::doc("w3");
        let owner = Owner::for_this_process();
        let mut s = Series::default();
        block(&mut s, n, |_| {
            Self::locked_increment(&*self.store, &self.run, &doc, &owner, None)
        })
        .await;
        s
    }

    async fn w3_typed(&self, n: usize) -> Series {
        let run = Client::new(Arc::clone(&self.store)).run(self.run.clone());
        let mut s = Series::default();
        block(&mut s, n, |_| {
            let run = run.clone();
            async move {
                run.update(|d: &mut Bench4k| d.count += 1)
                    .await
                    .expect("W3t update");
            }
        })
        .await;
        s
    }

    /// 8 updaters × `each` locked updates of one document; returns the
    /// latencies (busy = wall time) and the lost updates.
    async fn w4_concurrent(&self, each: usize) -> (Series, u64) {
        const UPDATERS: usize = 8;
        let doc = Self::doc("w4");
        let read = |store: Arc<dyn Lock>, run: RunId, doc: DocName| async move {
            counter_of(
                &store
                    .get(&run, &doc, GetOptions::new())
                    .await
                    .expect("get")
                    .expect("present")
                    .bytes,
            )
        };
        let before = read(Arc::clone(&self.store), self.run.clone(), doc.clone()).await;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..UPDATERS {
            let (store, run, doc) = (Arc::clone(&self.store), self.run.clone(), doc.clone());
            tasks.push(tokio::spawn(async move {
                let owner = Owner::for_this_process();
                let policy = WaitPolicy::with_timeout(Duration::from_secs(300));
                let mut s = Series::default();
                for _ in 0..each {
                    let t = Instant::now();
                    Self::locked_increment(&*store, &run, &doc, &owner, Some(&policy)).await;
                    s.record(t.elapsed());
                }
                s
            }));
        }
        let mut all = Series::default();
        for task in tasks {
            all.latencies.extend(task.await.expect("W4 task").latencies);
        }
        all.busy = start.elapsed();
        let after = read(Arc::clone(&self.store), self.run.clone(), doc).await;
        let lost = (UPDATERS * each) as u64 - (after - before);
        (all, lost)
    }
}

/// A measured set of workloads of one backend, with its two baselines.
struct Measured {
    raw_read: Series,
    raw_write: Series,
    w1: Series,
    w2: Series,
    w3: Series,
    w3t: Series,
}

/// Runs the rounds: baselines and workloads interleaved.
async fn measure<R, RF, W, WF>(
    w: &Workloads,
    plan: &Plan,
    mut raw_read: R,
    mut raw_write: W,
) -> Measured
where
    R: FnMut(u64) -> RF,
    RF: std::future::Future<Output = ()>,
    W: FnMut(u64) -> WF,
    WF: std::future::Future<Output = ()>,
{
    let mut m = Measured {
        raw_read: Series::default(),
        raw_write: Series::default(),
        w1: Series::default(),
        w2: Series::default(),
        w3: Series::default(),
        w3t: Series::default(),
    };
    for round in 0..plan.rounds {
        block(&mut m.raw_read, plan.reads, &mut raw_read).await;
        m.w1.latencies.extend(w.w1_load(plan.reads).await.latencies);
        block(&mut m.raw_write, plan.writes, &mut raw_write).await;
        m.w2.latencies.extend(
            w.w2_save(plan.writes, (round * plan.writes) as u64)
                .await
                .latencies,
        );
        m.w3.latencies
            .extend(w.w3_update(plan.updates).await.latencies);
        m.w3t
            .latencies
            .extend(w.w3_typed(plan.updates).await.latencies);
    }
    for s in [&mut m.w1, &mut m.w2, &mut m.w3, &mut m.w3t] {
        s.busy = s.latencies.iter().sum();
    }
    m
}

/// The rows of one backend.
#[allow(clippy::too_many_arguments)]
fn push_rows(
    rows: &mut Vec<Row>,
    backend: &str,
    m: &Measured,
    (read_name, write_name): (&str, &str),
    (t1, t2, t3): (f64, f64, f64),
    w4: &Series,
    lost: u64,
    w4_target: Option<f64>,
) {
    rows.push(row(
        backend,
        &format!("raw: {read_name}"),
        &m.raw_read,
        None,
        None,
    ));
    rows.push(row(
        backend,
        &format!("raw: {write_name}"),
        &m.raw_write,
        None,
        None,
    ));
    rows.push(row(
        backend,
        "W1 load 4 KiB",
        &m.w1,
        Some((read_name, &m.raw_read)),
        Some(t1),
    ));
    rows.push(row(
        backend,
        "W2 durable save 4 KiB",
        &m.w2,
        Some((write_name, &m.raw_write)),
        Some(t2),
    ));
    rows.push(row(
        backend,
        "W3 locked update 4 KiB",
        &m.w3,
        Some((write_name, &m.raw_write)),
        Some(t3),
    ));
    rows.push(row(
        backend,
        "W3t typed Run::update 4 KiB",
        &m.w3t,
        Some((write_name, &m.raw_write)),
        None,
    ));
    let mut r4 = row(backend, "W4 8 concurrent updaters", w4, None, None);
    r4.ops_per_sec = w4.latencies.len() as f64 / w4.busy.as_secs_f64();
    r4.ratio = Some(r4.ops_per_sec / m.w3.ops_per_sec());
    r4.baseline = Some("W3 single-updater rate".into());
    r4.target = w4_target;
    r4.note = format!("lost updates: {lost}");
    r4.meets_target = Some(lost == 0 && w4_target.is_none_or(|t| r4.ratio.unwrap_or(0.0) >= t));
    rows.push(r4);
}

// ---------------------------------------------------------------- file

mod file_raw {
    //! The raw file baselines: the same syscalls a durable save needs,
    //! written directly with std.

    use super::*;

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
}

async fn bench_file(plan: &Plan, rows: &mut Vec<Row>) {
    use runstate::file::FileStore;

    let root = std::env::temp_dir().join(format!("runstate-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let store: Arc<dyn Lock> =
        Arc::new(FileStore::open_path(&root).await.expect("open file store"));
    let w = Workloads {
        store,
        run: RunId::new("bench").expect("valid"),
    };
    w.seed().await;
    let raw_dir = root.join("raw");
    fs::create_dir_all(&raw_dir).expect("raw dir");
    let read_path = raw_dir.join("read.json");
    fs::write(&read_path, payload(0)).expect("raw seed");

    // The raw calls run on the blocking pool, as any async caller's must
    // (what tokio::fs does); the inline timings are reported beside them.
    let m = measure(
        &w,
        plan,
        |_| {
            let path = read_path.clone();
            async move {
                let bytes = tokio::task::spawn_blocking(move || fs::read(path).expect("read"))
                    .await
                    .expect("join");
                assert_eq!(bytes.len(), DOC_SIZE);
            }
        },
        |i| {
            let dir = raw_dir.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    file_raw::durable_write(&dir, "write.json", &payload(i))
                })
                .await
                .expect("join");
            }
        },
    )
    .await;
    let mut inline_read = Series::default();
    block(&mut inline_read, plan.reads, |_| {
        let path = read_path.clone();
        async move { assert_eq!(fs::read(path).expect("read").len(), DOC_SIZE) }
    })
    .await;
    let mut inline_write = Series::default();
    block(&mut inline_write, plan.writes, |i| {
        let dir = raw_dir.clone();
        async move { file_raw::durable_write(&dir, "write.json", &payload(i)) }
    })
    .await;
    let (w4, lost) = w.w4_concurrent(plan.concurrent_each).await;
    push_rows(
        rows,
        "file",
        &m,
        (
            "std::fs::read, blocking pool",
            "write+fsync+rename+dir fsync, blocking pool",
        ),
        (1.3, 1.15, 1.5),
        &w4,
        lost,
        None,
    );
    rows.push(row(
        "file",
        "info: std::fs::read inline",
        &inline_read,
        None,
        None,
    ));
    rows.push(row(
        "file",
        "info: durable write inline",
        &inline_write,
        None,
        None,
    ));
    fs::remove_dir_all(&root).expect("cleanup");
}

#[cfg(feature = "redis")]
async fn bench_redis(plan: &Plan, rows: &mut Vec<Row>) {
    use redis::AsyncCommands;
    use runstate::redis::{RedisConfig, RedisStore};

    let url = std::env::var("RUNSTATE_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned());
    let prefix = format!("rsbench:{}", std::process::id());
    let config = RedisConfig::from_url(&url)
        .expect("RUNSTATE_REDIS_URL")
        .with_prefix(&prefix)
        .expect("prefix");
    let store = RedisStore::open(config).await.expect("open redis store");
    let w = Workloads {
        store: Arc::new(store.clone()),
        run: RunId::new("bench").expect("valid"),
    };
    w.seed().await;

    // The raw baseline: redis-rs GET/SET of the same 4 KiB through the same
    // kind of connection (a ConnectionManager) to the same server.
    let client = redis::Client::open(url.as_str()).expect("redis client");
    let raw = client
        .get_connection_manager()
        .await
        .expect("raw connection");
    let raw_key = format!("{prefix}:raw");
    let mut seed = raw.clone();
    let _: () = seed
        .set(&raw_key, payload(0).as_ref())
        .await
        .expect("raw seed");
    let m = measure(
        &w,
        plan,
        |_| {
            let (mut con, key) = (raw.clone(), raw_key.clone());
            async move {
                let bytes: Vec<u8> = con.get(&key).await.expect("GET");
                assert_eq!(bytes.len(), DOC_SIZE);
            }
        },
        |i| {
            let (mut con, key) = (raw.clone(), raw_key.clone());
            async move {
                let _: () = con.set(&key, payload(i).as_ref()).await.expect("SET");
            }
        },
    )
    .await;
    let (w4, lost) = w.w4_concurrent(plan.concurrent_each).await;
    push_rows(
        rows,
        "redis",
        &m,
        ("redis-rs GET", "redis-rs SET"),
        (1.15, 1.15, 2.3),
        &w4,
        lost,
        Some(0.4),
    );
    store.purge_prefix().await.expect("cleanup");
}

/// One SQL database: W1–W4 through `SqlStore` against a bare sqlx
/// `SELECT` by primary key and a bare upsert of the same 4 KiB, on the
/// database's native sqlx driver, in a table beside the store's.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
async fn bench_sql(backend: &str, url: &str, plan: &Plan, rows: &mut Vec<Row>) {
    use runstate::sql::{SqlConfig, SqlStore};
    use sqlx::{AssertSqlSafe, Executor};

    let prefix = format!("rsbench{}_", std::process::id());
    let config = SqlConfig::from_url(url)
        .expect("database URL")
        .with_prefix(&prefix)
        .expect("prefix");
    let store = SqlStore::open(config).await.expect("open sql store");
    let w = Workloads {
        store: Arc::new(store.clone()),
        run: RunId::new("bench").expect("valid"),
    };
    w.seed().await;
    let table = format!("{prefix}raw");

    macro_rules! raw {
        ($pool:expr, $create:expr, $select:expr, $upsert:expr) => {{
            let pool = $pool;
            pool.execute(sqlx::raw_sql(AssertSqlSafe($create)))
                .await
                .expect("raw table");
            let select: String = $select;
            let upsert: String = $upsert;
            sqlx::query(AssertSqlSafe(upsert.clone()))
                .bind("k")
                .bind(payload(0).to_vec())
                .execute(&pool)
                .await
                .expect("raw seed");
            let m = measure(
                &w,
                plan,
                |_| {
                    let (pool, select) = (pool.clone(), select.clone());
                    async move {
                        let row: (Vec<u8>,) = sqlx::query_as(AssertSqlSafe(select))
                            .bind("k")
                            .fetch_one(&pool)
                            .await
                            .expect("raw select");
                        assert_eq!(row.0.len(), DOC_SIZE);
                    }
                },
                |i| {
                    let (pool, upsert) = (pool.clone(), upsert.clone());
                    async move {
                        sqlx::query(AssertSqlSafe(upsert))
                            .bind("k")
                            .bind(payload(i).to_vec())
                            .execute(&pool)
                            .await
                            .expect("raw upsert");
                    }
                },
            )
            .await;
            pool.execute(sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {table}"))))
                .await
                .expect("drop raw");
            pool.close().await;
            m
        }};
    }

    let m = match backend {
        #[cfg(feature = "postgres")]
        "postgres" => raw!(
            sqlx::PgPool::connect(url).await.expect("raw pool"),
            format!("CREATE TABLE {table} (k TEXT PRIMARY KEY, v BYTEA NOT NULL)"),
            format!("SELECT v FROM {table} WHERE k = $1"),
            format!(
                "INSERT INTO {table} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
            )
        ),
        #[cfg(feature = "mysql")]
        "mysql" => raw!(
            sqlx::MySqlPool::connect(url).await.expect("raw pool"),
            format!("CREATE TABLE {table} (k VARCHAR(64) PRIMARY KEY, v LONGBLOB NOT NULL)"),
            format!("SELECT v FROM {table} WHERE k = ?"),
            format!(
                "INSERT INTO {table} (k, v) VALUES (?, ?) ON DUPLICATE KEY UPDATE v = VALUES(v)"
            )
        ),
        #[cfg(feature = "sqlite")]
        "sqlite" => raw!(
            sqlx::SqlitePool::connect(url).await.expect("raw pool"),
            format!("CREATE TABLE {table} (k TEXT PRIMARY KEY, v BLOB NOT NULL)"),
            format!("SELECT v FROM {table} WHERE k = ?"),
            format!(
                "INSERT INTO {table} (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
            )
        ),
        other => panic!("no raw baseline for {other}"),
    };
    let (w4, lost) = w.w4_concurrent(plan.concurrent_each).await;
    push_rows(
        rows,
        backend,
        &m,
        ("bare sqlx SELECT by key", "bare sqlx upsert"),
        (1.2, 1.2, 2.5),
        &w4,
        lost,
        None,
    );
    store.uninstall().await.expect("drop the bench tables");
    store.close().await;
}

/// S3: W1–W4 through `S3Store` against bare object_store `get`/`put` of
/// the same 4 KiB through the same kind of client.
#[cfg(feature = "s3")]
async fn bench_s3(url: &str, plan: &Plan, rows: &mut Vec<Row>) {
    use object_store::path::Path as ObjectPath;
    use object_store::{ClientOptions, ObjectStoreExt};
    use runstate::s3::{S3Config, S3Store};

    let config = S3Config::from_url(url).expect("RUNSTATE_S3_URL");
    let prefix = format!("{}/bench-{}", config.prefix(), std::process::id())
        .trim_start_matches('/')
        .to_owned();
    let config = config.with_prefix(&prefix).expect("prefix");
    let store = S3Store::open(config.clone()).await.expect("open s3 store");
    let w = Workloads {
        store: Arc::new(store.clone()),
        run: RunId::new("bench").expect("valid"),
    };
    w.seed().await;

    let parsed = url::Url::parse(url).expect("url");
    let option = |name: &str| {
        parsed
            .query_pairs()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.into_owned())
    };
    let mut builder = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(config.bucket())
        .with_client_options(
            ClientOptions::new().with_allow_http(option("allow_http").as_deref() == Some("true")),
        );
    if let Some(endpoint) = option("endpoint") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = option("region") {
        builder = builder.with_region(region);
    }
    let raw = Arc::new(builder.build().expect("raw client"));
    let raw_path = ObjectPath::from(format!("{prefix}/raw.json"));
    raw.put(&raw_path, payload(0).into())
        .await
        .expect("raw seed");
    let m = measure(
        &w,
        plan,
        |_| {
            let (raw, path) = (Arc::clone(&raw), raw_path.clone());
            async move {
                let bytes = raw
                    .get(&path)
                    .await
                    .expect("raw get")
                    .bytes()
                    .await
                    .expect("raw body");
                assert_eq!(bytes.len(), DOC_SIZE);
            }
        },
        |i| {
            let (raw, path) = (Arc::clone(&raw), raw_path.clone());
            async move {
                raw.put(&path, payload(i).into()).await.expect("raw put");
            }
        },
    )
    .await;
    let (w4, lost) = w.w4_concurrent(plan.concurrent_each).await;
    push_rows(
        rows,
        "s3",
        &m,
        ("object_store get", "object_store put"),
        (1.1, 1.1, 4.5),
        &w4,
        lost,
        None,
    );
    store.purge_prefix().await.expect("cleanup");
}

fn print_table(rows: &[Row]) {
    println!(
        "| backend | workload | ops | median µs | p99 µs | ops/s | baseline | ratio | target | |"
    );
    println!("|---|---|---:|---:|---:|---:|---|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {} | {} | {} | {}{} |",
            r.backend,
            r.workload,
            r.ops,
            r.median_us,
            r.p99_us,
            r.ops_per_sec,
            r.baseline.as_deref().unwrap_or(""),
            r.ratio.map_or(String::new(), |x| format!("{x:.2}×")),
            r.target.map_or(String::new(), |x| {
                if r.workload.starts_with("W4") {
                    format!("≥ {x:.2}×")
                } else {
                    format!("≤ {x:.2}×")
                }
            }),
            match r.meets_target {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "",
            },
            if r.note.is_empty() {
                String::new()
            } else {
                format!(" {}", r.note)
            },
        );
    }
}

fn main() {
    let args = parse_args();
    let plan = Plan::new(args.quick);
    let wanted = |name: &str| args.backends.is_empty() || args.backends.iter().any(|b| b == name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    runtime.block_on(async {
        if wanted("file") {
            bench_file(&plan, &mut rows).await;
        }
        #[cfg(feature = "redis")]
        if wanted("redis") {
            bench_redis(&plan, &mut rows).await;
        }
        #[cfg(feature = "postgres")]
        if wanted("postgres") {
            let url = std::env::var("RUNSTATE_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            bench_sql("postgres", &url, &plan, &mut rows).await;
        }
        #[cfg(feature = "mysql")]
        if wanted("mysql") {
            let url = std::env::var("RUNSTATE_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
            bench_sql("mysql", &url, &plan, &mut rows).await;
        }
        #[cfg(feature = "s3")]
        if wanted("s3") {
            match std::env::var("RUNSTATE_S3_URL") {
                Ok(url) => bench_s3(&url, &plan, &mut rows).await,
                Err(_) => eprintln!("s3: RUNSTATE_S3_URL is not set (cargo xtask bench starts moto and sets it); skipped"),
            }
        }
        #[cfg(feature = "sqlite")]
        if wanted("sqlite") {
            let path =
                std::env::temp_dir().join(format!("runstate-bench-{}.db", std::process::id()));
            let url = format!("sqlite://{}", path.display());
            bench_sql("sqlite", &url, &plan, &mut rows).await;
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    });
    let known: &[&str] = &[
        "file",
        #[cfg(feature = "redis")]
        "redis",
        #[cfg(feature = "postgres")]
        "postgres",
        #[cfg(feature = "mysql")]
        "mysql",
        #[cfg(feature = "sqlite")]
        "sqlite",
        #[cfg(feature = "s3")]
        "s3",
    ];
    for b in &args.backends {
        assert!(
            known.contains(&b.as_str()),
            "unknown or disabled backend `{b}` (known: {known:?})"
        );
    }
    print_table(&rows);
    if let Some(dir) = args.out.parent() {
        fs::create_dir_all(dir).expect("report folder");
    }
    let report = serde_json::json!({
        "quick": args.quick,
        "doc_size": DOC_SIZE,
        "rows": rows,
    });
    fs::write(&args.out, serde_json::to_vec_pretty(&report).expect("json")).expect("write report");
    println!("\nreport: {}", args.out.display());
}
