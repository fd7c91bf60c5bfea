//! `ls`, `cat`, `put` and `rm`: documents and runs.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use futures_util::StreamExt as _;
use runstate::{
    AnyStore, Bytes, DocMeta, DocName, Error, ErrorKind, GetOptions, LIST_PAGE, LockExt, LockKey,
    OpenMode, Operation, PutMode, RunId, StoreExt, Version,
};
use serde::Serialize;

use crate::{CliError, Global, output};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  runstate ls                      the runs, one per line
  runstate ls -l 'Mica*'           runs matching a glob, with documents, size and last change
  runstate ls Mica_flume1          the documents of a run: name, size, version, modified
  runstate ls Mica_flume1 'c*'     its documents matching a glob

Run ids and document names never hold *, ? or [, so a word with one is a glob.")]
pub(crate) struct LsArgs {
    /// A run whose documents to list, or a glob of runs to list.
    #[arg(value_name = "RUN|GLOB")]
    run: Option<String>,
    /// With RUN: a glob of its documents to list.
    #[arg(value_name = "GLOB")]
    pattern: Option<String>,
    /// Runs: show each one's document count, total size and last change
    /// (one listing per run).
    #[arg(short, long)]
    long: bool,
    /// Show at most this many entries.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
With --json: an object with run, doc, version, size and the content as `json` (a JSON
document), `text` (other UTF-8) or `base64` (anything else).")]
pub(crate) struct CatArgs {
    /// The run.
    run: String,
    /// The document's name (without extension: `climate`, not `climate.nodb`).
    doc: String,
    /// Indent a JSON document for reading (fails with exit 2 on anything else).
    #[arg(long, conflicts_with = "json")]
    pretty: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct StatArgs {
    /// The run.
    run: String,
    /// The document's name.
    doc: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct PutArgs {
    /// The run.
    run: String,
    /// The document's name.
    doc: String,
    /// Where to read the bytes: a file, or `-` (the default) for standard input.
    #[arg(default_value = "-")]
    file: PathBuf,
    /// Only create: fail (exit 4) if the document exists.
    #[arg(long, conflicts_with = "if_version")]
    create: bool,
    /// Only replace this version (as `ls RUN` shows it): fail (exit 4) if the
    /// document changed since.
    #[arg(long, value_name = "VERSION")]
    if_version: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RmArgs {
    /// The run.
    run: String,
    /// The document to delete; without it, --all deletes every document of
    /// the run.
    doc: Option<String>,
    /// Delete the whole run: every one of its documents (`--yes` says the
    /// same).
    #[arg(long, visible_alias = "yes", conflicts_with_all = ["doc", "if_version"])]
    all: bool,
    /// Only delete this version of the document: fail (exit 4) if it changed.
    #[arg(long, value_name = "VERSION", requires = "doc")]
    if_version: Option<String>,
}

/// A run id from the command line.
pub(crate) fn run_id(run: &str) -> Result<RunId, CliError> {
    Ok(RunId::new(run)?)
}

/// A document name from the command line.
pub(crate) fn doc_name(doc: &str) -> Result<DocName, CliError> {
    Ok(DocName::new(doc)?)
}

/// When a listed document was last written, where the backend records it
/// ([`runstate::Capabilities::modified_times`]).
fn listed_modified(meta: &DocMeta) -> Option<SystemTime> {
    meta.modified
}

/// Documents whose `head` is asked at the same time.
const HEADS_IN_FLIGHT: usize = 8;

/// The modification time of each listed document: from the listing, where
/// the backend records them; a document the listing left without one is
/// asked for with `head` (a metadata call), a few at a time. A backend that
/// records none is not asked at all (its `head` would read each document
/// and still not know).
async fn modified_times(
    store: &AnyStore,
    run: &RunId,
    docs: &[DocMeta],
) -> Result<Vec<Option<SystemTime>>, CliError> {
    if !store.capabilities().modified_times {
        return Ok(vec![None; docs.len()]);
    }
    let heads = futures_util::stream::iter(docs.iter().map(|m| async move {
        match listed_modified(m) {
            Some(at) => Ok(Some(at)),
            None => Ok(store
                .head(run, &m.name)
                .await?
                .and_then(|stat| stat.modified)),
        }
    }))
    .buffered(HEADS_IN_FLIGHT)
    .collect::<Vec<Result<Option<SystemTime>, Error>>>()
    .await;
    heads.into_iter().map(|h| Ok(h?)).collect()
}

#[derive(Serialize)]
struct DocRow<'a> {
    name: &'a DocName,
    size: u64,
    version: &'a Version,
    modified: Option<String>,
    modified_unix_ms: Option<u64>,
}

#[derive(Serialize)]
struct RunRow<'a> {
    run: &'a RunId,
    documents: u64,
    bytes: u64,
    modified: Option<String>,
    modified_unix_ms: Option<u64>,
}

/// The runs matching `pattern` (all without one), at most `limit`, and
/// whether more matched beyond it. Pages through the listing and stops as
/// soon as the limit is passed.
async fn matching_runs(
    store: &AnyStore,
    pattern: Option<&str>,
    limit: Option<u64>,
) -> Result<(Vec<RunId>, bool), CliError> {
    let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    let mut found = Vec::new();
    let mut after: Option<RunId> = None;
    loop {
        let page = store.list_runs(after.as_ref(), LIST_PAGE).await?;
        after = page.items.last().cloned();
        for run in page.items {
            if pattern.is_none_or(|p| output::glob_match(p, run.as_str())) {
                if found.len() == limit {
                    return Ok((found, true));
                }
                found.push(run);
            }
        }
        if !page.more || after.is_none() {
            return Ok((found, false));
        }
    }
}

pub(crate) async fn ls(global: &Global, args: LsArgs) -> Result<ExitCode, CliError> {
    match args.run.as_deref() {
        Some(word) if !output::is_glob(word) => {
            let run = run_id(word)?;
            if args.long {
                return Err(CliError::usage("-l/--long is for listing runs").with_hint(
                    "`runstate ls RUN` always shows size, version and modification time",
                ));
            }
            let store = global.open(OpenMode::Existing).await?;
            ls_docs(global, &store, &run, args.pattern.as_deref(), args.limit).await
        }
        pattern => {
            if let Some(extra) = &args.pattern {
                return Err(
                    CliError::usage(format!("unexpected `{extra}` after a glob of runs"))
                        .with_hint("list a run's documents with: runstate ls RUN [GLOB]"),
                );
            }
            let store = global.open(OpenMode::Existing).await?;
            ls_runs(global, &store, pattern, args.long, args.limit).await
        }
    }
}

async fn ls_runs(
    global: &Global,
    store: &AnyStore,
    pattern: Option<&str>,
    long: bool,
    limit: Option<u64>,
) -> Result<ExitCode, CliError> {
    let (runs, more) = matching_runs(store, pattern, limit).await?;
    if more {
        global.note(format!(
            "showing the first {} run(s); more match (raise --limit)",
            runs.len()
        ));
    }
    if !long {
        if global.json {
            output::json(&runs)?;
        } else {
            let mut out = std::io::stdout().lock();
            for run in &runs {
                writeln!(out, "{run}")?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    // One listing per run, a few at a time, in order.
    let listings = futures_util::stream::iter(runs.iter().map(|run| store.list_all_docs(run)))
        .buffered(HEADS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let mut rows = Vec::with_capacity(runs.len());
    for (run, docs) in runs.iter().zip(listings) {
        let docs = docs?;
        let modified = docs.iter().filter_map(listed_modified).max();
        rows.push(RunRow {
            run,
            documents: docs.len() as u64,
            bytes: docs.iter().map(|m| m.size).sum(),
            modified: output::time_json(modified),
            modified_unix_ms: output::unix_ms(modified),
        });
    }
    if global.json {
        output::json(&rows)?;
    } else {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.run.to_string(),
                    r.documents.to_string(),
                    output::size(r.bytes),
                    r.modified.clone().unwrap_or_else(|| "-".to_owned()),
                ]
            })
            .collect();
        output::table(&["RUN", "DOCS", "SIZE", "MODIFIED"], &table)?;
        let documents: u64 = rows.iter().map(|r| r.documents).sum();
        let bytes: u64 = rows.iter().map(|r| r.bytes).sum();
        out!(
            "{} run(s), {documents} document(s), {}",
            rows.len(),
            output::size(bytes)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn ls_docs(
    global: &Global,
    store: &AnyStore,
    run: &RunId,
    pattern: Option<&str>,
    limit: Option<u64>,
) -> Result<ExitCode, CliError> {
    let all = store.list_all_docs(run).await?;
    if all.is_empty() {
        return Err(Error::new(ErrorKind::NotFound, "the run has no documents")
            .at_run(Operation::ListDocs, run)
            .into());
    }
    let mut docs: Vec<DocMeta> = all
        .into_iter()
        .filter(|m| pattern.is_none_or(|p| output::glob_match(p, m.name.as_str())))
        .collect();
    let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    if docs.len() > limit {
        global.note(format!(
            "showing the first {limit} of {} document(s) (raise --limit)",
            docs.len()
        ));
        docs.truncate(limit);
    }
    let modified = modified_times(store, run, &docs).await?;
    if global.json {
        let rows: Vec<DocRow<'_>> = docs
            .iter()
            .zip(&modified)
            .map(|(m, at)| DocRow {
                name: &m.name,
                size: m.size,
                version: &m.version,
                modified: output::time_json(*at),
                modified_unix_ms: output::unix_ms(*at),
            })
            .collect();
        output::json(&rows)?;
    } else {
        let rows: Vec<Vec<String>> = docs
            .iter()
            .zip(&modified)
            .map(|(m, at)| {
                vec![
                    m.name.to_string(),
                    output::size(m.size),
                    m.version.to_string(),
                    output::time(*at),
                ]
            })
            .collect();
        output::table(&["NAME", "SIZE", "VERSION", "MODIFIED"], &rows)?;
        out!(
            "{} document(s), {}",
            docs.len(),
            output::size(docs.iter().map(|m| m.size).sum())
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A document as `cat --json` prints it: its content as JSON when it is
/// JSON, else as text when it is UTF-8, else in base64.
#[derive(Serialize)]
struct CatOutput<'a> {
    run: &'a RunId,
    doc: &'a DocName,
    version: &'a Version,
    size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    json: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base64: Option<String>,
}

pub(crate) async fn cat(global: &Global, args: CatArgs) -> Result<ExitCode, CliError> {
    let (run, doc) = (run_id(&args.run)?, doc_name(&args.doc)?);
    let store = global.open(OpenMode::Existing).await?;
    let found = store.get(&run, &doc, GetOptions::new()).await?;
    let Some(found) = found else {
        return Err(not_found(&run, &doc, Operation::Get));
    };
    if global.json {
        let parsed = serde_json::from_slice::<serde_json::Value>(&found.bytes).ok();
        let text = match parsed {
            Some(_) => None,
            None => std::str::from_utf8(&found.bytes).ok(),
        };
        let base64 = (parsed.is_none() && text.is_none()).then(|| output::base64(&found.bytes));
        output::json(&CatOutput {
            run: &run,
            doc: &doc,
            version: &found.version,
            size: found.bytes.len(),
            json: parsed,
            text,
            base64,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    if args.pretty {
        // Checked first, so only valid JSON is re-indented.
        serde_json::from_slice::<serde::de::IgnoredAny>(&found.bytes).map_err(|e| {
            CliError::usage(format!("{run}/{doc} is not JSON ({e})"))
                .with_hint("--pretty is for JSON documents; drop it to get the bytes as they are")
        })?;
        out.write_all(&output::pretty_json(&found.bytes))?;
    } else {
        out.write_all(&found.bytes)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `stat RUN DOC` as `--json` prints it.
#[derive(Serialize)]
struct StatOutput<'a> {
    run: &'a RunId,
    doc: &'a DocName,
    version: &'a Version,
    size: u64,
    modified: Option<String>,
    modified_unix_ms: Option<u64>,
    /// Who holds the document's lock, if anyone.
    lock: Option<crate::locks::LockRow<'a>>,
    /// Who holds the run's lock, if anyone.
    run_lock: Option<crate::locks::LockRow<'a>>,
}

pub(crate) async fn stat(global: &Global, args: StatArgs) -> Result<ExitCode, CliError> {
    let (run, doc) = (run_id(&args.run)?, doc_name(&args.doc)?);
    let store = global.open(OpenMode::Existing).await?;
    let Some(found) = store.head(&run, &doc).await? else {
        return Err(not_found(&run, &doc, Operation::Head));
    };
    let (doc_lock, run_lock) = if store.capabilities().leases {
        (
            store
                .inspect(&LockKey::Doc(run.clone(), doc.clone()))
                .await?,
            store.inspect(&LockKey::Run(run.clone())).await?,
        )
    } else {
        (None, None)
    };
    if global.json {
        output::json(&StatOutput {
            run: &run,
            doc: &doc,
            version: &found.version,
            size: found.size,
            modified: output::time_json(found.modified),
            modified_unix_ms: output::unix_ms(found.modified),
            lock: doc_lock.as_ref().map(crate::locks::LockRow::new),
            run_lock: run_lock.as_ref().map(crate::locks::LockRow::new),
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let holder = |info: &Option<runstate::LockInfo>| {
        info.as_ref()
            .map_or_else(|| "free".to_owned(), |i| format!("held by {i}"))
    };
    let rows = vec![
        vec!["run".to_owned(), run.to_string()],
        vec!["document".to_owned(), doc.to_string()],
        vec!["version".to_owned(), found.version.to_string()],
        vec![
            "size".to_owned(),
            format!("{} ({} bytes)", output::size(found.size), found.size),
        ],
        vec![
            "modified".to_owned(),
            found.modified.map_or_else(
                || "unknown (this backend does not record it)".to_owned(),
                |t| runstate::time::Utc(t).to_string(),
            ),
        ],
        vec!["lock".to_owned(), holder(&doc_lock)],
        vec!["run lock".to_owned(), holder(&run_lock)],
    ];
    let mut out = std::io::stdout().lock();
    for row in rows {
        writeln!(out, "{:<9} {}", row[0], row[1])?;
    }
    Ok(ExitCode::SUCCESS)
}

fn not_found(run: &RunId, doc: &DocName, operation: Operation) -> CliError {
    let error = CliError::from(
        Error::new(ErrorKind::NotFound, "no such document").at_doc(operation, run, doc),
    );
    match doc.as_str().rsplit_once('.') {
        Some((name, _)) => error.with_hint(format!(
            "document names have no extension: the backend adds it (try `{name}`)"
        )),
        None => error,
    }
}

/// Reads at most `limit` bytes, failing with `TooLarge` beyond.
fn read_input(file: &PathBuf, limit: u64) -> Result<Bytes, CliError> {
    let reader: Box<dyn Read> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(file).map_err(|e| {
            CliError::from(e).with_hint(format!("could not open {}", file.display()))
        })?)
    };
    read_at_most(reader, limit)
        .map(Bytes::from)
        .map_err(|e| e.with_hint("raise it with the URL option max_doc_bytes"))
}

/// All of `reader`, refused (`TooLarge`) once more than `limit` bytes came:
/// endless input is not read to its end.
pub(crate) fn read_at_most(reader: impl Read, limit: u64) -> Result<Vec<u8>, CliError> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(CliError::from(Error::new(
            ErrorKind::TooLarge,
            format!("the input is over the {limit}-byte limit"),
        )));
    }
    Ok(bytes)
}

#[derive(Serialize)]
struct Saved<'a> {
    run: &'a RunId,
    doc: &'a DocName,
    size: usize,
    version: &'a Version,
}

pub(crate) async fn put(global: &Global, args: PutArgs) -> Result<ExitCode, CliError> {
    let (run, doc) = (run_id(&args.run)?, doc_name(&args.doc)?);
    let store = global.open(OpenMode::Create).await?;
    let config = store.client_config().clone();
    let bytes = read_input(&args.file, config.limit)?;
    let size = bytes.len();
    let mode = match (args.create, args.if_version) {
        (true, _) => PutMode::Create,
        (false, Some(version)) => PutMode::Update(Version::new(version)),
        (false, None) => PutMode::Overwrite,
    };
    // Under the document's lock, so a save never lands in the middle of a
    // worker's locked read-modify-write of that document; saved and
    // released in one call (one round trip where the backend can), which
    // succeeds once the save did, whatever the release then met.
    let key = LockKey::Doc(run.clone(), doc.clone());
    let lease = store
        .acquire(&key, &config.owner, config.ttl, &config.wait)
        .await?;
    let version = store.save_and_release(&lease, &doc, bytes, mode).await?;
    if global.json {
        output::json(&Saved {
            run: &run,
            doc: &doc,
            size,
            version: &version,
        })?;
    } else {
        out!(
            "saved {run}/{doc}: {}, version {version}",
            output::size(size as u64)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What `rm --json` prints.
#[derive(Serialize)]
struct Removed<'a> {
    run: &'a RunId,
    #[serde(skip_serializing_if = "Option::is_none")]
    doc: Option<&'a DocName>,
    /// Documents deleted.
    deleted: u64,
}

pub(crate) async fn rm(global: &Global, args: RmArgs) -> Result<ExitCode, CliError> {
    let run = run_id(&args.run)?;
    let doc = args.doc.as_deref().map(doc_name).transpose()?;
    let store = global.open(OpenMode::Existing).await?;
    match doc {
        Some(doc) => {
            rm_doc(
                global,
                &store,
                &run,
                &doc,
                args.if_version.map(Version::new),
            )
            .await
        }
        None => {
            let documents = store.list_all_docs(&run).await?.len();
            if documents == 0 {
                return Err(Error::new(ErrorKind::NotFound, "the run has no documents")
                    .at_run(Operation::DeleteRun, &run)
                    .into());
            }
            if !args.all {
                return Err(CliError::usage(format!(
                    "refusing to delete run {run} and its {documents} document(s) without --all"
                ))
                .with_hint(format!(
                    "runstate rm {run} --all deletes all {documents}; runstate rm {run} DOC deletes one"
                )));
            }
            rm_run(global, &store, &run).await
        }
    }
}

async fn rm_doc(
    global: &Global,
    store: &AnyStore,
    run: &RunId,
    doc: &DocName,
    if_version: Option<Version>,
) -> Result<ExitCode, CliError> {
    let config = store.client_config();
    let key = LockKey::Doc(run.clone(), doc.clone());
    let lease = store
        .acquire(&key, &config.owner, config.ttl, &config.wait)
        .await?;
    let deleted = store.delete(run, doc, if_version.as_ref()).await;
    let deleted = released_after(store, &lease, deleted).await?;
    if !deleted {
        return Err(not_found(run, doc, Operation::Delete));
    }
    if global.json {
        output::json(&Removed {
            run,
            doc: Some(doc),
            deleted: 1,
        })?;
    } else {
        out!("deleted {run}/{doc}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Releases `lease` after the step it guarded, and returns that step's
/// outcome: a step that was made is reported made (a release that then
/// fails only leaves the lease to expire by its TTL, logged as a warning),
/// so a script does not run again what already happened.
async fn released_after<T>(
    store: &AnyStore,
    lease: &runstate::Lease,
    outcome: runstate::Result<T>,
) -> runstate::Result<T> {
    let released = store.release(lease).await;
    let done = outcome?;
    if let Err(error) = released {
        tracing::warn!(
            lock = %lease.key(),
            %error,
            "the deletion was made; its lock is left to expire by its TTL"
        );
    }
    Ok(done)
}

async fn rm_run(global: &Global, store: &AnyStore, run: &RunId) -> Result<ExitCode, CliError> {
    let config = store.client_config();
    let key = LockKey::Run(run.clone());
    let lease = store
        .acquire(&key, &config.owner, config.ttl, &config.wait)
        .await?;
    // The run's lock does not cover locks taken on single documents: refuse
    // while someone holds one rather than delete under their feet.
    let busy = store
        .list_locks(Some(run))
        .await
        .map(|locks| locks.into_iter().find(|l| l.key != key));
    let outcome = match busy {
        Ok(Some(holder)) => Err(
            Error::new(ErrorKind::Locked, "a document of the run is locked")
                .with_operation(Operation::DeleteRun)
                .with_lock(&holder.key.clone())
                .with_holder(holder),
        ),
        Ok(None) => store.delete_run(run).await,
        Err(error) => Err(error),
    };
    let deleted = released_after(store, &lease, outcome).await?;
    if deleted == 0 {
        return Err(Error::new(ErrorKind::NotFound, "the run has no documents")
            .at_run(Operation::DeleteRun, run)
            .into());
    }
    if global.json {
        output::json(&Removed {
            run,
            doc: None,
            deleted,
        })?;
    } else {
        out!("deleted run {run}: {deleted} document(s)")?;
    }
    Ok(ExitCode::SUCCESS)
}
