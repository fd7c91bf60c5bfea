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
//! - W3: locked update of a 4 KiB typed document (acquire → load → mutate →
//!   save → release, through `Run::update`).
//! - W4: 8 concurrent updaters on one document; updates/s, lost updates.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate::{Bytes, Client, DocName, Document, GetOptions, Lock, PutOptions, RunId, WaitPolicy};
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

/// W1–W4 on a store, with per-round baselines supplied by `baseline`.
struct Workloads {
    backend: String,
    store: Arc<dyn Lock>,
    run: RunId,
}

impl Workloads {
    async fn w1_load(&self, n: usize) -> Series {
        let doc = DocName::new("w1").expect("valid");
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
        let doc = DocName::new("w2").expect("valid");
        let mut s = Series::default();
        let doc = &doc;
        block(&mut s, n, |i| async move {
            self.store
                .put(&self.run, doc, payload(offset + i), PutOptions::overwrite())
                .await
                .expect("W2 put");
        })
        .await;
        s
    }

    async fn w3_update(&self, n: usize) -> Series {
        let run = Client::new(Arc::clone(&self.store)).run(self.run.clone());
        let mut s = Series::default();
        block(&mut s, n, |_| {
            let run = run.clone();
            async move {
                run.update(|d: &mut Bench4k| d.count += 1)
                    .await
                    .expect("W3 update");
            }
        })
        .await;
        s
    }

    /// 8 updaters × `each` updates of one document; returns the series of
    /// update latencies, the wall time and the lost updates.
    async fn w4_concurrent(&self, each: usize) -> (Series, Duration, u64) {
        const UPDATERS: usize = 8;
        let doc_run = self.run.clone();
        let seed = Client::new(Arc::clone(&self.store)).run(doc_run.clone());
        let before = seed.load::<Bench4k>().await.expect("W4 seed").count;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..UPDATERS {
            let run = Client::new(Arc::clone(&self.store))
                .with_wait(WaitPolicy::with_timeout(Duration::from_secs(300)))
                .run(doc_run.clone());
            tasks.push(tokio::spawn(async move {
                let mut s = Series::default();
                for _ in 0..each {
                    let t = Instant::now();
                    run.update(|d: &mut Bench4k| d.count += 1)
                        .await
                        .expect("W4 update");
                    s.record(t.elapsed());
                }
                s
            }));
        }
        let mut all = Series::default();
        for task in tasks {
            let s = task.await.expect("W4 task");
            all.latencies.extend(s.latencies);
        }
        let wall = start.elapsed();
        all.busy = wall;
        let after = seed.load::<Bench4k>().await.expect("W4 final").count;
        let lost = (UPDATERS * each) as u64 - (after - before);
        (all, wall, lost)
    }

    async fn seed(&self) {
        self.store
            .put(
                &self.run,
                &DocName::new("w1").expect("valid"),
                payload(0),
                PutOptions::overwrite(),
            )
            .await
            .expect("seed W1");
        Client::new(Arc::clone(&self.store))
            .run(self.run.clone())
            .save(&bench4k(0))
            .await
            .expect("seed W3");
    }
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
        backend: "file".into(),
        store,
        run: RunId::new("bench").expect("valid"),
    };
    w.seed().await;
    let raw_dir = root.join("raw");
    fs::create_dir_all(&raw_dir).expect("raw dir");
    fs::write(raw_dir.join("read.json"), payload(0)).expect("raw seed");

    let mut raw_read = Series::default();
    let mut raw_read_inline = Series::default();
    let mut raw_write = Series::default();
    let mut raw_write_inline = Series::default();
    let (mut w1, mut w2, mut w3) = (Series::default(), Series::default(), Series::default());
    for round in 0..plan.rounds {
        let path = raw_dir.join("read.json");
        block(&mut raw_read, plan.reads, |_| {
            let path = path.clone();
            async move {
                let bytes = tokio::task::spawn_blocking(move || fs::read(path).expect("read"))
                    .await
                    .expect("join");
                assert_eq!(bytes.len(), DOC_SIZE);
            }
        })
        .await;
        block(&mut raw_read_inline, plan.reads, |_| {
            let path = path.clone();
            async move {
                assert_eq!(fs::read(path).expect("read").len(), DOC_SIZE);
            }
        })
        .await;
        w1.latencies.extend(w.w1_load(plan.reads).await.latencies);

        block(&mut raw_write, plan.writes, |i| {
            let dir = raw_dir.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    file_raw::durable_write(&dir, "write.json", &payload(i))
                })
                .await
                .expect("join");
            }
        })
        .await;
        block(&mut raw_write_inline, plan.writes, |i| {
            let dir = raw_dir.clone();
            async move { file_raw::durable_write(&dir, "write.json", &payload(i)) }
        })
        .await;
        w2.latencies.extend(
            w.w2_save(plan.writes, (round * plan.writes) as u64)
                .await
                .latencies,
        );
        w3.latencies
            .extend(w.w3_update(plan.updates).await.latencies);
    }
    for s in [&mut w1, &mut w2, &mut w3] {
        s.busy = s.latencies.iter().sum();
    }
    let (w4, wall, lost) = w.w4_concurrent(plan.concurrent_each).await;

    let read_base = "raw read (std::fs::read on the blocking pool)";
    let write_base = "raw durable write (std on the blocking pool)";
    rows.push(row(
        "file",
        "raw read, blocking pool",
        &raw_read,
        None,
        None,
    ));
    rows.push(row(
        "file",
        "raw read, inline",
        &raw_read_inline,
        None,
        None,
    ));
    rows.push(row(
        "file",
        "raw durable write, blocking pool",
        &raw_write,
        None,
        None,
    ));
    rows.push(row(
        "file",
        "raw durable write, inline",
        &raw_write_inline,
        None,
        None,
    ));
    rows.push(row(
        "file",
        "W1 load 4 KiB",
        &w1,
        Some((read_base, &raw_read)),
        Some(1.3),
    ));
    rows.push(row(
        "file",
        "W2 durable save 4 KiB",
        &w2,
        Some((write_base, &raw_write)),
        Some(1.15),
    ));
    rows.push(row(
        "file",
        "W3 locked update 4 KiB",
        &w3,
        Some((write_base, &raw_write)),
        Some(1.5),
    ));
    let mut r4 = row("file", "W4 8 concurrent updaters", &w4, None, None);
    r4.ops_per_sec = w4.latencies.len() as f64 / wall.as_secs_f64();
    r4.ratio = Some(r4.ops_per_sec / w3.ops_per_sec());
    r4.baseline = Some("W3 single-updater rate".into());
    r4.note = format!("lost updates: {lost}");
    r4.meets_target = Some(lost == 0);
    rows.push(r4);
    let _ = w.backend;
    fs::remove_dir_all(&root).expect("cleanup");
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
            r.target.map_or(String::new(), |x| format!("≤ {x:.2}×")),
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
    });
    let known = ["file"];
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
