//! `runstate demo`: worker processes updating documents under leases on the
//! embedded file backend, and a report proving nothing was lost.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate::file::{FileConfig, FileStore};
use runstate::{Client, Doc, Run, RunId, Store, WaitPolicy};
use serde::{Deserialize, Serialize};

use crate::{CliError, Global, default_data_dir, output};

/// The documents the workers update, named like WEPPcloud controllers.
const DOCS: [&str; 3] = ["climate", "watershed", "wepp"];

/// Printed by a worker for each acknowledged update.
const ACK: &str = "ack ";

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Folder of the file store.
    #[arg(long, default_value_os_t = default_data_dir())]
    root: PathBuf,
    /// The run to create (replaced if it exists).
    #[arg(long, default_value = "demo")]
    run: String,
    /// Worker processes to start.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Locked updates per worker.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    updates: u32,
}

#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    run: String,
    #[arg(long)]
    name: String,
    #[arg(long)]
    updates: u32,
    #[arg(long)]
    seed: u64,
}

/// The state every demo document holds: one type, stored under each of
/// the three names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Controller {
    updates: u64,
    by_worker: BTreeMap<String, u64>,
    last_worker: String,
    last_fence: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Ack {
    worker: String,
    pid: u32,
    doc: String,
    fence: u64,
}

async fn open(root: &PathBuf) -> Result<Arc<FileStore>, CliError> {
    let store = FileStore::open(FileConfig::new(root)).await?;
    Ok(Arc::new(store))
}

fn run_id(run: &str) -> Result<RunId, CliError> {
    RunId::new(run)
        .map_err(|e| CliError::from(e).with_hint("run ids are 1-128 bytes of A-Z a-z 0-9 . _ -"))
}

/// The typed handle of one demo document.
fn controller(run: &Run, name: &str) -> Result<Doc<Controller>, CliError> {
    Ok(run.doc::<Controller>(name)?)
}

/// One locked update of `doc` by `worker`: lock, change, commit.
async fn bump(doc: &Doc<Controller>, worker: &str) -> Result<u64, CliError> {
    let mut guard = doc.lock().await?;
    let fence = guard.lease().fence().get();
    guard.updates += 1;
    *guard.by_worker.entry(worker.to_owned()).or_default() += 1;
    guard.last_worker = worker.to_owned();
    guard.last_fence = fence;
    // A little work while holding the lock, as a model step would.
    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..1500))).await;
    guard.commit().await?;
    Ok(fence)
}

pub(crate) async fn worker(args: WorkerArgs) -> Result<ExitCode, CliError> {
    let store = open(&args.root).await?;
    let client = Client::new(store).with_wait(WaitPolicy::with_timeout(Duration::from_secs(120)));
    let run = client.run(run_id(&args.run)?);
    let docs = DOCS
        .iter()
        .map(|name| controller(&run, name))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rng = fastrand::Rng::with_seed(args.seed);
    for _ in 0..args.updates {
        let doc = &docs[rng.usize(..docs.len())];
        let fence = bump(doc, &args.name).await?;
        let ack = Ack {
            worker: args.name.clone(),
            pid: std::process::id(),
            doc: doc.name().to_string(),
            fence,
        };
        let line = serde_json::to_string(&ack)
            .map_err(|e| CliError::msg(format!("could not encode an ack: {e}")))?;
        out!("{ACK}{line}")?;
    }
    Ok(ExitCode::SUCCESS)
}

struct WorkerReport {
    name: String,
    pid: u32,
    acks: Vec<Ack>,
}

fn spawn_worker(args: &DemoArgs, index: u32) -> Result<std::process::Child, CliError> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .arg("demo-worker")
        .arg("--root")
        .arg(&args.root)
        .args(["--run", &args.run, "--name", &format!("w{}", index + 1)])
        .args([
            "--updates",
            &args.updates.to_string(),
            "--seed",
            &index.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    Ok(child)
}

fn collect(mut child: std::process::Child, name: String) -> Result<WorkerReport, CliError> {
    let pid = child.id();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CliError::msg("worker stdout missing"))?;
    let mut acks = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(json) = line.strip_prefix(ACK) {
            let ack: Ack = serde_json::from_str(json)
                .map_err(|e| CliError::msg(format!("a worker printed an unreadable ack: {e}")))?;
            acks.push(ack);
        }
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(CliError::msg(format!(
            "worker {name} (pid {pid}) failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(WorkerReport { name, pid, acks })
}

fn fence_ranges(acks: &[Ack]) -> String {
    let mut by_doc: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for ack in acks {
        let entry = by_doc.entry(&ack.doc).or_insert((ack.fence, ack.fence));
        entry.0 = entry.0.min(ack.fence);
        entry.1 = entry.1.max(ack.fence);
    }
    by_doc
        .iter()
        .map(|(doc, (lo, hi))| format!("{doc} {lo}–{hi}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn load_all(run: &Run) -> Result<Vec<(&'static str, Controller)>, CliError> {
    let mut all = Vec::with_capacity(DOCS.len());
    for name in DOCS {
        all.push((name, controller(run, name)?.load().await?));
    }
    Ok(all)
}

/// One worker in the `--json` report.
#[derive(Serialize)]
struct WorkerRow {
    name: String,
    pid: u32,
    /// Acknowledged updates per document.
    updates: BTreeMap<String, u64>,
    total: u64,
    /// First and last fence held per document.
    fences: BTreeMap<String, (u64, u64)>,
}

/// One document in the `--json` report.
#[derive(Serialize)]
struct DocumentRow<'a> {
    name: &'a str,
    #[serde(flatten)]
    state: &'a Controller,
}

/// `demo --json`.
#[derive(Serialize)]
struct DemoOutput<'a> {
    root: String,
    run: &'a str,
    workers: Vec<WorkerRow>,
    documents: Vec<DocumentRow<'a>>,
    acknowledged: u64,
    final_count: u64,
    elapsed_secs: f64,
    updates_per_sec: f64,
    consistent: bool,
}

fn fences_by_doc(acks: &[Ack]) -> BTreeMap<String, (u64, u64)> {
    let mut by_doc: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for ack in acks {
        let entry = by_doc
            .entry(ack.doc.clone())
            .or_insert((ack.fence, ack.fence));
        entry.0 = entry.0.min(ack.fence);
        entry.1 = entry.1.max(ack.fence);
    }
    by_doc
}

/// Whether the final state holds exactly the acknowledged updates, each
/// under its own grant.
fn check_consistent(reports: &[WorkerReport], finals: &[(&str, Controller)]) -> bool {
    let mut consistent = true;
    for (doc, state) in finals {
        let mut fences: Vec<u64> = reports
            .iter()
            .flat_map(|r| r.acks.iter())
            .filter(|a| a.doc == *doc)
            .map(|a| a.fence)
            .collect();
        let acked = fences.len() as u64;
        fences.sort_unstable();
        fences.dedup();
        consistent &= fences.len() as u64 == acked
            && state.updates == acked
            && fences.last().copied().unwrap_or(0) == state.last_fence
            && state.by_worker.values().sum::<u64>() == state.updates;
        for report in reports {
            let by_this = report.acks.iter().filter(|a| a.doc == *doc).count() as u64;
            consistent &= state.by_worker.get(&report.name).copied().unwrap_or(0) == by_this;
        }
    }
    let acknowledged: usize = reports.iter().map(|r| r.acks.len()).sum();
    let stored: u64 = finals.iter().map(|(_, s)| s.updates).sum();
    consistent && stored == acknowledged as u64
}

pub(crate) async fn run(global: &Global, args: DemoArgs) -> Result<ExitCode, CliError> {
    // The demo replaces its run: it never goes near the store of --url or
    // RUNSTATE_URL, which may be a real one.
    global.refuse_url(
        "demo",
        "the demo runs on a file store of its own: pass --root FOLDER (default ./runstate-data)",
    )?;
    let id = run_id(&args.run)?;
    let store = open(&args.root).await?;
    store.delete_run(&id).await?;
    let client = Client::new(store.clone());
    let run = client.run(id.clone());
    for name in DOCS {
        controller(&run, name)?.save(&Controller::default()).await?;
    }

    if !global.json {
        out!(
            "runstate demo: {} worker processes × {} locked updates of run `{}` in {}\n",
            args.workers,
            args.updates,
            args.run,
            args.root.display()
        )?;
    }
    let started = Instant::now();
    let mut children = Vec::new();
    for i in 0..args.workers {
        children.push((format!("w{}", i + 1), spawn_worker(&args, i)?));
    }
    let mut handles = Vec::new();
    for (name, child) in children {
        handles.push(tokio::task::spawn_blocking(move || collect(child, name)));
    }
    let mut reports = Vec::new();
    for handle in handles {
        reports.push(
            handle
                .await
                .map_err(|e| CliError::msg(format!("a worker thread failed: {e}")))??,
        );
    }
    let elapsed = started.elapsed();

    let finals = load_all(&run).await?;
    let consistent = check_consistent(&reports, &finals);
    let acknowledged: usize = reports.iter().map(|r| r.acks.len()).sum();
    let stored_total: u64 = finals.iter().map(|(_, s)| s.updates).sum();
    let rate = acknowledged as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    if global.json {
        output::json(&DemoOutput {
            root: args.root.display().to_string(),
            run: &args.run,
            workers: reports
                .iter()
                .map(|r| {
                    let mut updates = BTreeMap::new();
                    for ack in &r.acks {
                        *updates.entry(ack.doc.clone()).or_insert(0) += 1;
                    }
                    WorkerRow {
                        name: r.name.clone(),
                        pid: r.pid,
                        updates,
                        total: r.acks.len() as u64,
                        fences: fences_by_doc(&r.acks),
                    }
                })
                .collect(),
            documents: finals
                .iter()
                .map(|(name, state)| DocumentRow { name, state })
                .collect(),
            acknowledged: acknowledged as u64,
            final_count: stored_total,
            elapsed_secs: elapsed.as_secs_f64(),
            updates_per_sec: rate,
            consistent,
        })?;
        return Ok(if consistent {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(crate::EXIT_DIFFERENCES)
        });
    }
    let workers: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();

    out!(
        "{:<7} {:>8} {:>9} {:>10} {:>6} {:>6}  fences held (first–last grant per document)",
        "worker",
        "pid",
        "climate",
        "watershed",
        "wepp",
        "total"
    )?;
    for report in &reports {
        let count = |doc: &str| report.acks.iter().filter(|a| a.doc == doc).count();
        out!(
            "{:<7} {:>8} {:>9} {:>10} {:>6} {:>6}  {}",
            report.name,
            report.pid,
            count("climate"),
            count("watershed"),
            count("wepp"),
            report.acks.len(),
            fence_ranges(&report.acks)
        )?;
    }

    out!(
        "\n{:<10} {:>8}  {:<24} {:<12} {:>10}",
        "document",
        "updates",
        format!("by {}", workers.join("/")),
        "last update",
        "last fence"
    )?;
    for (doc, state) in &finals {
        let per_worker: Vec<String> = workers
            .iter()
            .map(|w| state.by_worker.get(*w).copied().unwrap_or(0).to_string())
            .collect();
        out!(
            "{:<10} {:>8}  {:<24} {:<12} {:>10}",
            doc,
            state.updates,
            per_worker.join("/"),
            state.last_worker,
            state.last_fence
        )?;
    }
    out!("\nacknowledged updates: {acknowledged}")?;
    out!("final count:          {stored_total} (sum of the documents' update counters)")?;
    out!(
        "elapsed:              {:.2} s ({rate:.0} locked updates/s across {} processes)",
        elapsed.as_secs_f64(),
        args.workers
    )?;
    out!(
        "files:                {}",
        args.root.join(&args.run).display()
    )?;
    if consistent {
        out!(
            "\nconsistent: every acknowledged update is in the final state, each under its own lease grant (distinct fences), none lost"
        )?;
        Ok(ExitCode::SUCCESS)
    } else {
        out!("\nINCONSISTENT: the final state does not match the acknowledged updates")?;
        Ok(ExitCode::from(crate::EXIT_DIFFERENCES))
    }
}
