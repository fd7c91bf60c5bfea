//! `migrate` and `verify`: moving runs between stores and comparing them.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use runstate::migrate::{self, MigrateOptions, MigrationReport, Progress, Selection};
use runstate::{AnyStore, DocName, RunId};
use serde::Serialize;

use crate::docs::run_id;
use crate::{CliError, EXIT_DIFFERENCES, Global, open_url, output};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
A target run that already holds documents is refused (exit 4) unless every one of them is
byte-identical to the source's: that is a copy interrupted earlier, which is resumed. Run the
same command again after any interruption; it ends in the same state.

Example:
  runstate migrate --from file:///srv/runs?ext=nodb --to postgres://lab-db/runs --all")]
pub(crate) struct MigrateArgs {
    /// The store to copy from (default: --url / RUNSTATE_URL).
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// The store to copy to.
    #[arg(long, value_name = "URL")]
    to: String,
    /// A run to copy (repeat for several).
    #[arg(
        long = "run",
        value_name = "ID",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    runs: Vec<String>,
    /// Copy every run of the source.
    #[arg(long)]
    all: bool,
    /// Check and report what would be copied; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace target documents that differ, and delete those the source lacks.
    #[arg(long)]
    overwrite: bool,
    /// Delete each run from the source once its copy verified.
    #[arg(long)]
    delete_source: bool,
    /// Documents copied at the same time.
    #[arg(long, default_value_t = migrate::DEFAULT_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
}

#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// One side (default: --url / RUNSTATE_URL).
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// The other side.
    #[arg(long, value_name = "URL")]
    to: String,
    /// A run to compare (repeat for several); without it, every run of either store.
    #[arg(long = "run", value_name = "ID")]
    runs: Vec<String>,
}

/// The runs named with `--run`, or every run.
fn selection(runs: &[String], all: bool) -> Result<Selection, CliError> {
    if all {
        return Ok(Selection::All);
    }
    let runs = runs.iter().map(|r| run_id(r)).collect::<Result<_, _>>()?;
    Ok(Selection::Runs(runs))
}

/// Opens the source (`--from`, else `--url` / `RUNSTATE_URL`) and the
/// target, refusing the same URL on both sides.
async fn open_both(
    global: &Global,
    from: Option<&str>,
    to: &str,
) -> Result<(AnyStore, AnyStore), CliError> {
    let from = from.or(global.url.as_deref()).ok_or_else(|| {
        CliError::usage("no source store given")
            .with_hint("pass --from URL (or --url URL, or set RUNSTATE_URL)")
    })?;
    if from.trim() == to.trim() {
        return Err(CliError::usage(
            "the source and the target are the same store",
        ));
    }
    Ok((open_url(from).await?, open_url(to).await?))
}

/// A progress bar over documents, on standard error when it is a terminal.
struct Bar {
    bar: ProgressBar,
    runs: AtomicUsize,
    run: AtomicUsize,
    bytes: AtomicU64,
}

impl Bar {
    fn new(hidden: bool) -> Self {
        let bar = if hidden {
            ProgressBar::hidden()
        } else {
            // Hidden by indicatif itself when standard error is not a terminal.
            ProgressBar::new(0)
        };
        if let Ok(style) = ProgressStyle::with_template(
            "[{elapsed_precise}] {wide_bar} {pos}/{len} documents  {msg}",
        ) {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar {
            bar,
            runs: AtomicUsize::new(0),
            run: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn runs(&self, total: usize) {
        self.runs.store(total, Ordering::Relaxed);
    }

    fn run_started(&self, run: &RunId, documents: usize, _bytes: u64) {
        let index = self.run.fetch_add(1, Ordering::Relaxed) + 1;
        self.bar.inc_length(documents as u64);
        self.bar.set_message(format!(
            "run {index}/{} {run}",
            self.runs.load(Ordering::Relaxed)
        ));
    }

    fn document_done(&self, _run: &RunId, _doc: &DocName, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.bar.inc(1);
    }
}

/// The largest resident set this process had, from `/proc/self/status`
/// (`VmHWM`), where the system reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[derive(Serialize)]
struct MigrateOutput<'a> {
    from: String,
    to: String,
    #[serde(flatten)]
    report: &'a MigrationReport,
    documents_per_sec: f64,
    mb_per_sec: f64,
    peak_rss_bytes: Option<u64>,
}

pub(crate) async fn migrate(global: &Global, args: MigrateArgs) -> Result<ExitCode, CliError> {
    let selection = selection(&args.runs, args.all)?;
    let (source, target) = open_both(global, args.from.as_deref(), &args.to).await?;
    let config = source.client_config();
    let options = MigrateOptions::new(selection)
        .with_dry_run(args.dry_run)
        .with_overwrite(args.overwrite)
        .with_delete_source(args.delete_source)
        .with_ttl(config.ttl)
        .with_wait(config.wait.clone())
        .with_owner(config.owner.clone())
        .with_concurrency(usize::from(args.concurrency));
    let bar = Bar::new(global.json);
    let outcome = migrate::migrate(&**source.lock(), &**target.lock(), &options, &bar).await;
    bar.finish();
    let report = outcome?;
    let peak = peak_rss_bytes();
    if global.json {
        output::json(&MigrateOutput {
            from: source.url().to_owned(),
            to: target.url().to_owned(),
            report: &report,
            documents_per_sec: report.documents_per_sec(),
            mb_per_sec: report.mb_per_sec(),
            peak_rss_bytes: peak,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = report
        .runs
        .iter()
        .map(|r| {
            vec![
                r.run.as_ref().map(ToString::to_string).unwrap_or_default(),
                r.documents.to_string(),
                output::size(r.bytes),
                r.copied.to_string(),
                r.identical.to_string(),
                r.replaced.to_string(),
                r.removed.to_string(),
                r.verified.to_string(),
                if r.source_deleted { "deleted" } else { "kept" }.to_owned(),
            ]
        })
        .collect();
    output::table(
        &[
            "RUN",
            "DOCS",
            "SIZE",
            "COPIED",
            "IDENTICAL",
            "REPLACED",
            "REMOVED",
            "VERIFIED",
            "SOURCE",
        ],
        &rows,
    )?;
    let verb = if report.dry_run {
        "would copy"
    } else {
        "copied"
    };
    println!(
        "{verb} {} document(s), {} in {:.2} s ({:.0} documents/s, {:.2} MB/s); {} verified by SHA-256{}",
        report.documents,
        output::size(report.bytes),
        report.elapsed_secs,
        report.documents_per_sec(),
        report.mb_per_sec(),
        report.verified,
        peak.map_or_else(String::new, |p| format!(
            "; peak memory {}",
            output::size(p)
        )),
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn verify(global: &Global, args: VerifyArgs) -> Result<ExitCode, CliError> {
    let selection = selection(&args.runs, args.runs.is_empty())?;
    let (source, target) = open_both(global, args.from.as_deref(), &args.to).await?;
    let bar = Bar::new(global.json);
    let outcome = migrate::verify(&**source.lock(), &**target.lock(), &selection, &bar).await;
    bar.finish();
    let report = outcome?;
    if global.json {
        output::json(&report)?;
    } else {
        for difference in &report.differences {
            println!("{difference}");
        }
        println!(
            "compared {} run(s), {} document(s), {}: {}",
            report.runs,
            report.documents,
            output::size(report.bytes),
            if report.identical() {
                "identical".to_owned()
            } else {
                format!("{} difference(s)", report.differences.len())
            }
        );
    }
    Ok(if report.identical() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERENCES)
    })
}
