//! `migrate` and `verify`: moving runs between stores and comparing them.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use runstate::migrate::{self, MigrateOptions, MigrationReport, Progress, RunReport, Selection};
use runstate::{AnyStore, DocName, ErrorKind, OpenMode, RunId, StoreExt};
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
    /// The store to copy from (or RUNSTATE_FROM_URL).
    #[arg(
        long,
        value_name = "URL",
        env = "RUNSTATE_FROM_URL",
        hide_env_values = true
    )]
    from: String,
    /// The store to copy to (a URL with a password is better passed in
    /// RUNSTATE_TO_URL than on the command line, where `ps` shows it).
    #[arg(
        long,
        value_name = "URL",
        env = "RUNSTATE_TO_URL",
        hide_env_values = true
    )]
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
    /// Runs copied at the same time, each under its own leases.
    #[arg(long, value_name = "N", default_value_t = migrate::DEFAULT_JOBS as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: u16,
    /// Go on with the other runs when one fails; report every failure and
    /// exit 5 if any run failed (without it the first failure stops the
    /// migration with its own exit code).
    #[arg(long)]
    keep_going: bool,
    /// Documents copied at the same time within a run.
    #[arg(long, default_value_t = migrate::DEFAULT_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
}

#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// One side (or RUNSTATE_FROM_URL).
    #[arg(
        long,
        value_name = "URL",
        env = "RUNSTATE_FROM_URL",
        hide_env_values = true
    )]
    from: String,
    /// The other side (or RUNSTATE_TO_URL).
    #[arg(
        long,
        value_name = "URL",
        env = "RUNSTATE_TO_URL",
        hide_env_values = true
    )]
    to: String,
    /// A run to compare (repeat for several).
    #[arg(
        long = "run",
        value_name = "ID",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    runs: Vec<String>,
    /// Compare every run of either store.
    #[arg(long)]
    all: bool,
}

/// The runs named with `--run`, or every run.
fn selection(runs: &[String], all: bool) -> Result<Selection, CliError> {
    if all {
        return Ok(Selection::All);
    }
    let runs = runs.iter().map(|r| run_id(r)).collect::<Result<_, _>>()?;
    Ok(Selection::Runs(runs))
}

/// The source URL, checked against the target's: they must differ.
/// `--url` is refused: these commands name two stores, with --from and --to.
fn source_url<'a>(
    global: &Global,
    command: &str,
    from: &'a str,
    to: &str,
) -> Result<&'a str, CliError> {
    global.refuse_url(
        command,
        format!("name both stores: runstate {command} --from URL --to URL (or RUNSTATE_FROM_URL and RUNSTATE_TO_URL)"),
    )?;
    let same = |url: &str| url.trim().trim_end_matches('/').to_owned();
    if same(from) == same(to) {
        return Err(CliError::usage(
            "the source and the target are the same store",
        ));
    }
    Ok(from)
}

/// What a dry run into a store that does not exist yet would do: copy every
/// document of the selected runs.
async fn plan_into_nothing(
    source: &AnyStore,
    selection: &Selection,
) -> Result<MigrationReport, CliError> {
    let runs = match selection.named_runs() {
        Some(runs) => runs,
        None => source.list_all_runs().await?,
    };
    let mut report = MigrationReport {
        dry_run: true,
        ..MigrationReport::default()
    };
    for run in runs {
        let docs = source.list_all_docs(&run).await?;
        if docs.is_empty() {
            return Err(
                runstate::Error::new(ErrorKind::NotFound, "the source has no such run")
                    .with_run(&run)
                    .into(),
            );
        }
        let bytes: u64 = docs.iter().map(|m| m.size).sum();
        report.documents += docs.len() as u64;
        report.bytes += bytes;
        report.runs.push(RunReport {
            run: Some(run),
            documents: docs.len() as u64,
            bytes,
            copied: docs.len() as u64,
            copied_bytes: bytes,
            ..RunReport::default()
        });
    }
    Ok(report)
}

/// A progress bar over documents, on standard error when it is a terminal.
struct Bar {
    bar: ProgressBar,
    runs: AtomicUsize,
    run: AtomicUsize,
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

    fn document_done(&self, _run: &RunId, _doc: &DocName, _bytes: u64) {
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
    let from = source_url(global, "migrate", &args.from, &args.to)?;
    let source = open_url(from, OpenMode::Existing).await?;
    // A dry run writes nothing, not even a new target's folder or file.
    let target_mode = if args.dry_run {
        OpenMode::Existing
    } else {
        OpenMode::Create
    };
    let target = match open_url(&args.to, target_mode).await {
        Ok(target) => target,
        Err(error) if args.dry_run && error.is_missing_store() => {
            let report = plan_into_nothing(&source, &selection).await?;
            eprintln!("runstate: the target does not exist yet; a real run creates it");
            return print_migration(global, &source, &runstate::redact_url(&args.to), &report);
        }
        Err(error) => return Err(error),
    };
    let config = source.client_config();
    let options = MigrateOptions::new(selection)
        .with_dry_run(args.dry_run)
        .with_overwrite(args.overwrite)
        .with_delete_source(args.delete_source)
        .with_ttl(config.ttl)
        .with_wait(config.wait.clone())
        .with_owner(config.owner.clone())
        .with_concurrency(usize::from(args.concurrency))
        .with_jobs(usize::from(args.jobs))
        .with_keep_going(args.keep_going);
    let bar = Bar::new(global.json);
    let outcome = migrate::migrate(&**source.lock(), &**target.lock(), &options, &bar).await;
    bar.finish();
    let report = outcome?;
    print_migration(global, &source, target.url(), &report)
}

/// Prints a migration report as a table and a summary line, or as JSON.
fn print_migration(
    global: &Global,
    source: &AnyStore,
    to: &str,
    report: &MigrationReport,
) -> Result<ExitCode, CliError> {
    let peak = peak_rss_bytes();
    if global.json {
        output::json(&MigrateOutput {
            from: source.url().to_owned(),
            to: to.to_owned(),
            report,
            documents_per_sec: report.documents_per_sec(),
            mb_per_sec: report.mb_per_sec(),
            peak_rss_bytes: peak,
        })?;
        return failures(report);
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
    for failure in &report.failed {
        out!(
            "{}  {}: {}",
            output::paint("FAILED", output::Paint::Red, global.color),
            failure.run,
            failure.error
        )?;
    }
    let verb = if report.dry_run {
        "would copy"
    } else {
        "copied"
    };
    out!(
        "{verb} {} document(s), {} in {:.2} s ({:.0} documents/s, {:.2} MB/s); {}{}",
        report.documents,
        output::size(report.bytes),
        report.elapsed_secs,
        report.documents_per_sec(),
        report.mb_per_sec(),
        verified_how(report.verified, report.verified_by_md5),
        peak.map_or_else(String::new, |p| format!(
            "; peak memory {}",
            output::size(p)
        )),
    )?;
    failures(report)
}

/// How the documents were verified: by reading them back (or finding
/// them already there) and comparing SHA-256, or, for copies into S3,
/// by the MD5 the server computed of the bytes it stored.
fn verified_how(verified: u64, by_md5: u64) -> String {
    if by_md5 == 0 {
        format!("{verified} verified by SHA-256")
    } else {
        format!(
            "{verified} verified ({} by SHA-256, {by_md5} by the target's MD5)",
            verified.saturating_sub(by_md5)
        )
    }
}

/// Exit 5, naming the runs, when some failed under `--keep-going`.
fn failures(report: &MigrationReport) -> Result<ExitCode, CliError> {
    if report.failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let names: Vec<String> = report
        .failed
        .iter()
        .map(|f| format!("{} ({})", f.run, f.kind))
        .collect();
    Err(CliError::msg(format!(
        "{} run(s) failed: {}",
        report.failed.len(),
        names.join(", ")
    ))
    .with_code(EXIT_DIFFERENCES)
    .with_hint("the report says why; run the same command again after fixing them (copies resume)"))
}

pub(crate) async fn verify(global: &Global, args: VerifyArgs) -> Result<ExitCode, CliError> {
    let selection = selection(&args.runs, args.all)?;
    let from = source_url(global, "verify", &args.from, &args.to)?;
    let source = open_url(from, OpenMode::Existing).await?;
    let target = open_url(&args.to, OpenMode::Existing).await?;
    let bar = Bar::new(global.json);
    let outcome = migrate::verify(&**source.lock(), &**target.lock(), &selection, &bar).await;
    bar.finish();
    let report = outcome?;
    if global.json {
        output::json(&report)?;
    } else {
        for difference in &report.differences {
            out!("{difference}")?;
        }
        out!(
            "compared {} run(s), {} document(s), {}: {}",
            report.runs,
            report.documents,
            output::size(report.bytes),
            if report.identical() {
                "identical".to_owned()
            } else {
                format!("{} difference(s)", report.differences.len())
            }
        )?;
    }
    Ok(if report.identical() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERENCES)
    })
}
