//! The cache benchmark (issue 12): what a cache in front of a store buys.
//!
//! - **Validated loads of a 512 KiB document**, on files, PostgreSQL and S3:
//!   the bare store's `get` against a cached load whose hit is validated
//!   with a conditional read (`get_if_changed`, no bytes sent when
//!   unchanged), with an in-process cache and with a Redis cache. Where the
//!   bytes travel a network the validated hit must cost less than the bare
//!   get.
//! - **Optimistic updates of a 4 KiB document**, on Redis and PostgreSQL,
//!   with a warm in-process cache: one conditional save per update when
//!   nobody else writes, against a raw `SET` / upsert (target ≤ 1.3×). On
//!   Redis two floor rows show what the server work of any conditional
//!   write costs against that `SET` from a bare client (see `Floor`).
//!
//! Baselines and workloads are interleaved round by round. Run it with
//! `cargo xtask bench`; it writes `target/bench/cache.json`.

use std::time::{Duration, Instant};

use runstate::{Bytes, DocName, RunId, StoreExt};
use serde::{Deserialize, Serialize};
use support::Args;
use support::places::{Backend, Places, encode, with_option};
use support::raw::Raw;

mod support;

const BIG: usize = 512 * 1024;
const SMALL: usize = 4096;

#[derive(Debug, Serialize)]
struct Row {
    backend: String,
    workload: String,
    ops: usize,
    median_us: f64,
    p99_us: f64,
    baseline: Option<String>,
    ratio: Option<f64>,
    target: Option<String>,
    meets_target: Option<bool>,
}

#[derive(Default)]
struct Series(Vec<Duration>);

impl Series {
    fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0.0;
        }
        sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6
    }
}

async fn time<F: std::future::Future<Output = ()>>(series: &mut Series, f: F) {
    let start = Instant::now();
    f.await;
    series.0.push(start.elapsed());
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Small {
    count: u64,
    payload: String,
}

/// Bare, memory-cached and Redis-cached loads of one 512 KiB document.
async fn validated_loads(
    backend: Backend,
    redis_url: Option<&str>,
    rounds: usize,
    n: usize,
    rows: &mut Vec<Row>,
) {
    let Some(place) = backend.place("bench_cache") else {
        return;
    };
    let run = RunId::new("cache").expect("valid");
    let doc = DocName::new("big").expect("valid");
    let bare = runstate::open(&place.url).await.expect("open");
    bare.put_bytes(&run, &doc, Bytes::from(vec![b'c'; BIG]))
        .await
        .expect("seed");
    let memory = runstate::open(&with_option(&place.url, "cache=memory"))
        .await
        .expect("open cached");
    let redis = match redis_url {
        Some(redis) => Some(
            runstate::open(&with_option(
                &place.url,
                &format!("cache={}", encode(redis)),
            ))
            .await
            .expect("open redis-cached"),
        ),
        None => None,
    };
    let mut series: [Series; 3] = Default::default();
    for store in [Some(&memory), redis.as_ref()].into_iter().flatten() {
        store.get_bytes(&run, &doc).await.expect("warm");
    }
    for _ in 0..rounds {
        for _ in 0..n {
            time(&mut series[0], async {
                assert_eq!(
                    bare.get_bytes(&run, &doc)
                        .await
                        .expect("get")
                        .expect("present")
                        .bytes
                        .len(),
                    BIG
                );
            })
            .await;
        }
        for (i, store) in [Some(&memory), redis.as_ref()].into_iter().enumerate() {
            let Some(store) = store else { continue };
            for _ in 0..n {
                time(&mut series[i + 1], async {
                    assert_eq!(
                        store
                            .get_bytes(&run, &doc)
                            .await
                            .expect("get")
                            .expect("present")
                            .bytes
                            .len(),
                        BIG
                    );
                })
                .await;
            }
        }
    }
    let name = backend.name();
    let base = series[0].quantile(0.5);
    // The bytes travel a network on every backend but files.
    let networked = backend != Backend::File;
    rows.push(Row {
        backend: name.to_owned(),
        workload: "load 512 KiB: bare get".into(),
        ops: series[0].0.len(),
        median_us: base,
        p99_us: series[0].quantile(0.99),
        baseline: None,
        ratio: None,
        target: None,
        meets_target: None,
    });
    for (i, what) in [
        (1, "cached, memory (validated hit)"),
        (2, "cached, redis (validated hit)"),
    ] {
        if series[i].0.is_empty() {
            continue;
        }
        let median = series[i].quantile(0.5);
        rows.push(Row {
            backend: name.to_owned(),
            workload: format!("load 512 KiB: {what}"),
            ops: series[i].0.len(),
            median_us: median,
            p99_us: series[i].quantile(0.99),
            baseline: Some("bare get".into()),
            ratio: Some(median / base),
            target: networked.then(|| "< 1.00×".to_owned()),
            meets_target: networked.then_some(median < base),
        });
    }
    place.cleanup().await;
}

/// The least server work a conditional write of a document needs on Redis,
/// from a bare redis-rs client: the floor under the optimistic update
/// (Redis 6.2 and 7 have no conditional `SET`, so the version check and the
/// write can only be made atomic by a script). Two forms, each checking
/// the version, writing version and bytes, and announcing the write with
/// a `PUBLISH`, atomically, in one round trip:
///
/// - `EVALSHA` with the bytes as an argument (`HSET` inside the script);
/// - the form the Redis store uses: the bytes staged by an `HSET` in a
///   `MULTI`/`EXEC` with an `EVALSHA` that checks and `RENAME`s them into
///   place (the bytes never pass through Lua).
struct Floor {
    con: redis::aio::ConnectionManager,
    prefix: String,
    in_argv: redis::Script,
    staged: redis::Script,
    /// The version each form last wrote.
    versions: [String; 2],
    writes: u64,
}

impl Floor {
    async fn open(bytes: &Bytes) -> Option<Floor> {
        let url = support::raw::server_url("redis")?;
        let mut con = redis::Client::open(url.as_str())
            .expect("redis client")
            .get_connection_manager()
            .await
            .expect("raw connection");
        let prefix = format!("rsfloor:{}", std::process::id());
        let in_argv = redis::Script::new(
            "if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return {'precondition'} end
             redis.call('HSET', KEYS[1], 'version', ARGV[2], 'data', ARGV[3])
             redis.call('PUBLISH', KEYS[2], 'c ' .. ARGV[2] .. ' floor')
             return {'ok'}",
        );
        let staged = redis::Script::new(
            "if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
               redis.call('DEL', KEYS[2])
               return {'precondition'}
             end
             redis.call('RENAME', KEYS[2], KEYS[1])
             redis.call('PUBLISH', KEYS[3], 'c ' .. ARGV[2] .. ' floor')
             return {'ok'}",
        );
        for (i, script) in [&in_argv, &staged].into_iter().enumerate() {
            script.load_async(&mut con).await.expect("script load");
            let () = redis::cmd("HSET")
                .arg(format!("{prefix}:{{f}}:doc{i}"))
                .arg("version")
                .arg("v0")
                .arg("data")
                .arg(bytes.as_ref())
                .query_async(&mut con)
                .await
                .expect("seed");
        }
        Some(Floor {
            con,
            prefix,
            in_argv,
            staged,
            versions: ["v0".to_owned(), "v0".to_owned()],
            writes: 0,
        })
    }

    /// One conditional write of `bytes` in form `form` (0: bytes in the
    /// arguments, 1: staged); panics unless it was made.
    async fn write(&mut self, form: usize, bytes: &Bytes) {
        self.writes += 1;
        let next = format!("v{}", self.writes);
        let p = &self.prefix;
        let (doc, events) = (format!("{p}:{{f}}:doc{form}"), format!("{p}:{{f}}:events"));
        let reply: redis::Value = if form == 0 {
            self.in_argv
                .key(&doc)
                .key(&events)
                .arg(&self.versions[0])
                .arg(&next)
                .arg(bytes.as_ref())
                .invoke_async(&mut self.con)
                .await
                .expect("floor write")
        } else {
            let staging = format!("{p}:{{f}}:staging");
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HSET")
                .arg(&staging)
                .arg("version")
                .arg(&next)
                .arg("data")
                .arg(bytes.as_ref())
                .ignore()
                .cmd("EVALSHA")
                .arg(self.staged.get_hash())
                .arg(3)
                .arg(&doc)
                .arg(&staging)
                .arg(&events)
                .arg(&self.versions[1])
                .arg(&next);
            let (reply,): (redis::Value,) =
                pipe.query_async(&mut self.con).await.expect("floor write");
            reply
        };
        assert!(format!("{reply:?}").contains("ok"), "{reply:?}");
        self.versions[form] = next;
    }

    async fn cleanup(mut self) {
        let p = &self.prefix;
        let _: redis::RedisResult<i64> = redis::cmd("DEL")
            .arg(format!("{p}:{{f}}:doc0"))
            .arg(format!("{p}:{{f}}:doc1"))
            .arg(format!("{p}:{{f}}:staging"))
            .query_async(&mut self.con)
            .await;
    }
}

/// Optimistic updates of a 4 KiB document with a warm in-process cache,
/// against the raw write (and, on Redis, against the floor: see [`Floor`]).
async fn optimistic(backend: Backend, rounds: usize, n: usize, rows: &mut Vec<Row>) {
    let Some(place) = backend.place("bench_optimistic") else {
        return;
    };
    let store = runstate::open(&with_option(&place.url, "cache=memory"))
        .await
        .expect("open cached");
    let doc = store
        .client()
        .run(RunId::new("optimistic").expect("valid"))
        .doc::<Small>("counter")
        .expect("valid");
    doc.save(&Small {
        count: 0,
        payload: "o".repeat(SMALL - 30),
    })
    .await
    .expect("seed");
    doc.update_optimistic(|d| d.count += 1).await.expect("warm");
    let raw = Raw::open(backend.name(), &format!("opt{}", std::process::id())).await;
    let bytes = Bytes::from(vec![b'r'; SMALL]);
    let mut floor = match backend {
        Backend::Redis => Floor::open(&bytes).await,
        _ => None,
    };
    let (mut raw_series, mut series) = (Series::default(), Series::default());
    let mut floor_series: [Series; 2] = Default::default();
    for _ in 0..rounds {
        for _ in 0..n {
            time(&mut raw_series, raw.write("optimistic", bytes.clone())).await;
        }
        if let Some(floor) = floor.as_mut() {
            for (form, series) in floor_series.iter_mut().enumerate() {
                for _ in 0..n {
                    time(series, floor.write(form, &bytes)).await;
                }
            }
        }
        for _ in 0..n {
            time(&mut series, async {
                doc.update_optimistic(|d| d.count += 1)
                    .await
                    .expect("update");
            })
            .await;
        }
    }
    let (_, write_name) = raw.names();
    let base = raw_series.quantile(0.5);
    let median = series.quantile(0.5);
    rows.push(Row {
        backend: backend.name().to_owned(),
        workload: format!("raw: {write_name}"),
        ops: raw_series.0.len(),
        median_us: base,
        p99_us: raw_series.quantile(0.99),
        baseline: None,
        ratio: None,
        target: None,
        meets_target: None,
    });
    for (sample, what) in floor_series.iter().zip([
        "raw floor: conditional write, one EVALSHA, bytes in ARGV",
        "raw floor: conditional write, MULTI/HSET staged + EVALSHA/EXEC",
    ]) {
        if sample.0.is_empty() {
            continue;
        }
        let floor_median = sample.quantile(0.5);
        rows.push(Row {
            backend: backend.name().to_owned(),
            workload: what.into(),
            ops: sample.0.len(),
            median_us: floor_median,
            p99_us: sample.quantile(0.99),
            baseline: Some(write_name.to_owned()),
            ratio: Some(floor_median / base),
            target: None,
            meets_target: None,
        });
    }
    rows.push(Row {
        backend: backend.name().to_owned(),
        workload: "optimistic update 4 KiB (warm memory cache)".into(),
        ops: series.0.len(),
        median_us: median,
        p99_us: series.quantile(0.99),
        baseline: Some(write_name.to_owned()),
        ratio: Some(median / base),
        target: Some("≤ 1.30×".into()),
        meets_target: Some(median / base <= 1.3),
    });
    // What the client adds to the server work any conditional write needs:
    // against the floor in the store's own form (bytes staged).
    if !floor_series[1].0.is_empty() {
        rows.push(Row {
            backend: backend.name().to_owned(),
            workload: "optimistic update 4 KiB, against the staged floor".into(),
            ops: series.0.len(),
            median_us: median,
            p99_us: series.quantile(0.99),
            baseline: Some("raw floor (staged)".into()),
            ratio: Some(median / floor_series[1].quantile(0.5)),
            target: None,
            meets_target: None,
        });
    }
    assert_eq!(
        doc.load().await.expect("load").count,
        (1 + rounds * n) as u64,
        "every optimistic update applied once"
    );
    raw.cleanup().await;
    if let Some(floor) = floor {
        floor.cleanup().await;
    }
    place.cleanup().await;
}

fn main() {
    let args = Args::parse("cache.json");
    let (rounds, n) = if args.quick { (3, 30) } else { (5, 200) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let redis_url =
        support::raw::server_url("redis").map(|url| with_option(&url, "prefix=rsbenchcache"));
    let mut rows = Vec::new();
    runtime.block_on(async {
        for backend in [Backend::File, Backend::Postgres, Backend::S3] {
            if args.wants(backend.name()) {
                validated_loads(backend, redis_url.as_deref(), rounds, n / 2, &mut rows).await;
            }
        }
        for backend in [Backend::Redis, Backend::Postgres] {
            if args.wants(backend.name()) {
                optimistic(backend, rounds, n, &mut rows).await;
            }
        }
        if let Some(url) = &redis_url
            && let Ok(store) = runstate::redis::RedisStore::connect(url).await
        {
            let _ = store.purge_prefix().await;
        }
    });
    println!("\n## cache: validated loads and optimistic updates\n");
    println!("| backend | workload | ops | median µs | p99 µs | baseline | ratio | target | |");
    println!("|---|---|---:|---:|---:|---|---:|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} |",
            r.backend,
            r.workload,
            r.ops,
            r.median_us,
            r.p99_us,
            r.baseline.as_deref().unwrap_or(""),
            r.ratio.map_or(String::new(), |x| format!("{x:.2}×")),
            r.target.as_deref().unwrap_or(""),
            match r.meets_target {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "",
            }
        );
    }
    args.write_report(&serde_json::json!({ "cache": rows }));
}
