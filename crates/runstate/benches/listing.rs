//! "list 100,000 runs": listing every run of a store, page by page
//! (`StoreExt::list_all_runs`, pages of 1,000), must cost O(n) in total, so
//! the time per run listed stays flat from 1,000 to 100,000 runs.
//!
//! Each backend gets two namespaces, one of 1,000 runs and one of 100,000
//! (`--quick`: 10,000), each run holding one small document. They are
//! seeded the fastest honest way for each backend (files written directly,
//! one bulk `INSERT … SELECT` on SQL, concurrent puts on Redis and S3), then
//! listed three times; the median is reported as µs per run, with the
//! ratio of the large listing's per-run time to the small one's.
//!
//! Run it with `cargo xtask bench`; it writes `target/bench/listing.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use runstate::{Bytes, DocName, RunId, StoreExt};
use serde::Serialize;
use support::Args;
use support::places::{Backend, Place, Places};

mod support;

/// The backends the issue names (MySQL lists like PostgreSQL).
const BACKENDS: [Backend; 5] = [
    Backend::File,
    Backend::Sqlite,
    Backend::Postgres,
    Backend::Redis,
    Backend::S3,
];

#[derive(Debug, Serialize)]
struct Row {
    backend: String,
    runs: usize,
    median_ms: f64,
    us_per_run: f64,
    /// µs per run at this size ÷ µs per run at the smallest size.
    ratio_to_small: f64,
    seed_s: f64,
}

fn run_id(i: usize) -> String {
    format!("run{i:07}")
}

/// Puts one document in each of `n` runs of the store at `place`.
async fn seed(place: &Place, n: usize) {
    match place.backend {
        Backend::File => {
            let root = place.file_root().expect("a file place");
            tokio::task::spawn_blocking(move || {
                for i in 0..n {
                    let dir = root.join(run_id(i));
                    std::fs::create_dir_all(&dir).expect("run folder");
                    std::fs::write(dir.join("d.json"), b"{}").expect("document");
                }
            })
            .await
            .expect("seed");
        }
        Backend::Sqlite | Backend::Postgres => {
            // Opening creates the schema; then one statement inserts them all.
            let store = runstate::open(&place.url).await.expect("open");
            drop(store);
            let prefix = place
                .url
                .split("prefix=")
                .nth(1)
                .map(|p| p.split('&').next().unwrap_or(p).to_owned())
                .unwrap_or_else(|| "runstate_".to_owned());
            let table = format!("{prefix}documents");
            use sqlx::{AssertSqlSafe, Executor};
            if place.backend == Backend::Postgres {
                let base = place.url.split('?').next().unwrap_or(&place.url);
                let pool = sqlx::PgPool::connect(base).await.expect("postgres");
                pool.execute(AssertSqlSafe(format!(
                    "INSERT INTO {table} (run, name, version, bytes, size, updated_at) \
                     SELECT 'run' || lpad(i::text, 7, '0'), 'd', i, '\\x7b7d'::bytea, 2, now() \
                     FROM generate_series(0, {}) AS i",
                    n - 1
                )))
                .await
                .expect("bulk insert");
                pool.close().await;
            } else {
                let path = place.url.trim_start_matches("sqlite://");
                let path = path.split('?').next().unwrap_or(path);
                let pool = sqlx::SqlitePool::connect(&format!("sqlite://{path}"))
                    .await
                    .expect("sqlite");
                pool.execute(AssertSqlSafe(format!(
                    "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < {}) \
                     INSERT INTO {table} (run, name, version, bytes, size, updated_at) \
                     SELECT printf('run%07d', i), 'd', i + 1, x'7b7d', 2, \
                     strftime('%Y-%m-%d %H:%M:%f', 'now') FROM seq",
                    n - 1
                )))
                .await
                .expect("bulk insert");
                pool.close().await;
            }
        }
        Backend::Redis | Backend::S3 => {
            let store = runstate::open(&place.url).await.expect("open");
            let store = Arc::clone(store.lock());
            let doc = DocName::new("d").expect("valid");
            let concurrency = if place.backend == Backend::S3 { 32 } else { 64 };
            futures_util::stream::iter(0..n)
                .map(|i| {
                    let (store, doc) = (Arc::clone(&store), doc.clone());
                    async move {
                        let run = RunId::new(run_id(i)).expect("valid");
                        store
                            .put_bytes(&run, &doc, Bytes::from_static(b"{}"))
                            .await
                            .expect("put");
                    }
                })
                .buffer_unordered(concurrency)
                .collect::<Vec<()>>()
                .await;
        }
        other => panic!("no listing bench for {other}"),
    }
}

/// Lists every run three times; returns the median time.
async fn list(place: &Place, n: usize) -> Duration {
    let store = runstate::open(&place.url).await.expect("open");
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let runs = store.list_all_runs().await.expect("list");
        times.push(started.elapsed());
        assert_eq!(runs.len(), n, "every run listed once");
        assert!(runs.windows(2).all(|w| w[0] < w[1]), "in order");
    }
    times.sort_unstable();
    times[1]
}

fn main() {
    let args = Args::parse("listing.json");
    let large = if args.quick { 10_000 } else { 100_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows: Vec<Row> = Vec::new();
    runtime.block_on(async {
        for backend in BACKENDS {
            if !args.wants(backend.name()) {
                continue;
            }
            let mut small_per_run = None;
            // moto's ListObjectsV2 with a delimiter walks every key of the
            // bucket for each page of 1,000 prefixes, so a 100,000-run
            // listing costs moto itself O(n²) and outlasts any timeout;
            // S3 is listed at 10,000 (real S3 pages by index, not by scan).
            let large = if backend == Backend::S3 {
                large.min(10_000)
            } else {
                large
            };
            for n in [1_000, large] {
                let Some(place) = backend.place("listing") else {
                    break;
                };
                let seeded = Instant::now();
                seed(&place, n).await;
                let seed_s = seeded.elapsed().as_secs_f64();
                let median = list(&place, n).await;
                place.cleanup().await;
                let us_per_run = median.as_secs_f64() * 1e6 / n as f64;
                let small = *small_per_run.get_or_insert(us_per_run);
                let row = Row {
                    backend: backend.name().to_owned(),
                    runs: n,
                    median_ms: median.as_secs_f64() * 1e3,
                    us_per_run,
                    ratio_to_small: us_per_run / small,
                    seed_s,
                };
                eprintln!("{row:?}");
                rows.push(row);
            }
        }
    });
    println!("\n## list every run (pages of 1,000)\n");
    println!(
        "| backend | runs | list ms (median of 3) | µs per run | per-run ratio to 1,000 runs |"
    );
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2}× |",
            r.backend, r.runs, r.median_ms, r.us_per_run, r.ratio_to_small
        );
    }
    args.write_report(&serde_json::json!({ "listing": rows }));
}
