//! `runstate demo`: worker processes updating documents under leases on the
//! embedded file backend, and a report proving nothing was lost.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate::file::{FileConfig, FileStore};
use runstate::{Client, Document, Run, RunId, Store, WaitPolicy};
use serde::{Deserialize, Serialize};

use crate::{CliError, default_data_dir};

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

/// The state every demo document holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Controller {
    updates: u64,
    by_worker: BTreeMap<String, u64>,
    last_worker: String,
    last_fence: u64,
}

macro_rules! controller {
    ($ty:ident, $name:literal) => {
        #[derive(Debug, Clone, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        struct $ty(Controller);

        impl Document for $ty {
            const NAME: &'static str = $name;
        }

        impl Deref for $ty {
            type Target = Controller;
            fn deref(&self) -> &Controller {
                &self.0
            }
        }

        impl DerefMut for $ty {
            fn deref_mut(&mut self) -> &mut Controller {
                &mut self.0
            }
        }
    };
}

controller!(Climate, "climate");
controller!(Watershed, "watershed");
controller!(Wepp, "wepp");

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

/// One locked update of document `T` by `worker`: lock, change, commit.
async fn bump<T>(run: &Run, worker: &str) -> Result<u64, CliError>
where
    T: Document + DerefMut<Target = Controller>,
{
    let mut guard = run.lock::<T>().await?;
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
    let mut rng = fastrand::Rng::with_seed(args.seed);
    for _ in 0..args.updates {
        let doc = DOCS[rng.usize(..DOCS.len())];
        let fence = match doc {
            "climate" => bump::<Climate>(&run, &args.name).await?,
            "watershed" => bump::<Watershed>(&run, &args.name).await?,
            _ => bump::<Wepp>(&run, &args.name).await?,
        };
        let ack = Ack {
            worker: args.name.clone(),
            pid: std::process::id(),
            doc: doc.to_owned(),
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
    Ok(vec![
        ("climate", run.load::<Climate>().await?.0),
        ("watershed", run.load::<Watershed>().await?.0),
        ("wepp", run.load::<Wepp>().await?.0),
    ])
}

pub(crate) async fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    let id = run_id(&args.run)?;
    let store = open(&args.root).await?;
    store.delete_run(&id).await?;
    let client = Client::new(store.clone());
    let run = client.run(id.clone());
    run.save(&Climate::default()).await?;
    run.save(&Watershed::default()).await?;
    run.save(&Wepp::default()).await?;

    out!(
        "runstate demo: {} worker processes × {} locked updates of run `{}` in {}\n",
        args.workers,
        args.updates,
        args.run,
        args.root.display()
    )?;
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
    let mut consistent = true;
    let mut stored_total = 0;
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
        stored_total += state.updates;
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
        for report in &reports {
            let by_this = report.acks.iter().filter(|a| a.doc == *doc).count() as u64;
            consistent &= state.by_worker.get(&report.name).copied().unwrap_or(0) == by_this;
        }
    }
    let acknowledged: usize = reports.iter().map(|r| r.acks.len()).sum();
    out!("\nacknowledged updates: {acknowledged}")?;
    out!("final count:          {stored_total} (sum of the documents' update counters)")?;
    out!(
        "elapsed:              {:.2} s ({:.0} locked updates/s across {} processes)",
        elapsed.as_secs_f64(),
        acknowledged as f64 / elapsed.as_secs_f64(),
        args.workers
    )?;
    out!(
        "files:                {}",
        args.root.join(&args.run).display()
    )?;
    if consistent && stored_total == acknowledged as u64 {
        out!(
            "\nconsistent: every acknowledged update is in the final state, each under its own lease grant (distinct fences), none lost"
        )?;
        Ok(ExitCode::SUCCESS)
    } else {
        out!("\nINCONSISTENT: the final state does not match the acknowledged updates")?;
        Ok(ExitCode::from(2))
    }
}
