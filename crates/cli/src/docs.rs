//! `ls`, `cat`, `put` and `rm`: documents and runs.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use runstate::{
    AnyStore, Bytes, DocName, Error, ErrorKind, GetOptions, LockExt, LockKey, OpenMode, Operation,
    PutMode, PutOptions, RunId, StoreExt, Version,
};
use serde::Serialize;

use crate::{CliError, Global, output};

#[derive(Debug, clap::Args)]
pub(crate) struct LsArgs {
    /// A run whose documents to list; without it, list the runs.
    run: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CatArgs {
    /// The run.
    run: String,
    /// The document's name (without extension: `climate`, not `climate.nodb`).
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
    /// The document to delete; without it, every document of the run.
    doc: Option<String>,
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

#[derive(Serialize)]
struct DocRow<'a> {
    name: &'a DocName,
    size: u64,
    version: &'a Version,
}

pub(crate) async fn ls(global: &Global, args: LsArgs) -> Result<ExitCode, CliError> {
    let store = global.open(OpenMode::Existing).await?;
    let Some(run) = args.run else {
        let runs = store.list_all_runs().await?;
        if global.json {
            output::json(&runs)?;
        } else {
            let mut out = std::io::stdout().lock();
            for run in &runs {
                writeln!(out, "{run}")?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    let run = run_id(&run)?;
    let docs = store.list_all_docs(&run).await?;
    if docs.is_empty() {
        return Err(Error::new(ErrorKind::NotFound, "the run has no documents")
            .with_operation(Operation::ListDocs)
            .with_run(&run)
            .into());
    }
    if global.json {
        let rows: Vec<DocRow<'_>> = docs
            .iter()
            .map(|m| DocRow {
                name: &m.name,
                size: m.size,
                version: &m.version,
            })
            .collect();
        output::json(&rows)?;
    } else {
        let rows: Vec<Vec<String>> = docs
            .iter()
            .map(|m| {
                vec![
                    m.name.to_string(),
                    output::size(m.size),
                    m.version.to_string(),
                ]
            })
            .collect();
        output::table(&["NAME", "SIZE", "VERSION"], &rows)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn cat(global: &Global, args: CatArgs) -> Result<ExitCode, CliError> {
    let (run, doc) = (run_id(&args.run)?, doc_name(&args.doc)?);
    let store = global.open(OpenMode::Existing).await?;
    let found = store.get(&run, &doc, GetOptions::new()).await?;
    let Some(found) = found else {
        return Err(not_found(&run, &doc, Operation::Get));
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&found.bytes)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn not_found(run: &RunId, doc: &DocName, operation: Operation) -> CliError {
    let error = CliError::from(
        Error::new(ErrorKind::NotFound, "no such document")
            .with_operation(operation)
            .with_run(run)
            .with_doc(doc),
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
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(CliError::from(Error::new(
            ErrorKind::TooLarge,
            format!("the input is over the {limit}-byte limit"),
        ))
        .with_hint("raise it with the URL option max_doc_bytes"));
    }
    Ok(Bytes::from(bytes))
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
    // worker's locked read-modify-write.
    let key = LockKey::Doc(run.clone(), doc.clone());
    let lease = store
        .acquire(&key, &config.owner, config.ttl, &config.wait)
        .await?;
    let saved = store
        .put(&run, &doc, bytes, PutOptions::mode(mode).with_lease(&lease))
        .await;
    let released = store.release(&lease).await;
    let version = saved?;
    released?;
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

pub(crate) async fn rm(global: &Global, args: RmArgs) -> Result<ExitCode, CliError> {
    let run = run_id(&args.run)?;
    let doc = args.doc.as_deref().map(doc_name).transpose()?;
    let store = global.open(OpenMode::Existing).await?;
    match doc {
        Some(doc) => rm_doc(&store, &run, &doc, args.if_version.map(Version::new)).await,
        None => rm_run(&store, &run).await,
    }
}

async fn rm_doc(
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
    let released = store.release(&lease).await;
    let deleted = deleted?;
    released?;
    if deleted {
        out!("deleted {run}/{doc}")?;
        Ok(ExitCode::SUCCESS)
    } else {
        Err(not_found(run, doc, Operation::Delete))
    }
}

async fn rm_run(store: &AnyStore, run: &RunId) -> Result<ExitCode, CliError> {
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
    let released = store.release(&lease).await;
    let deleted = outcome?;
    released?;
    if deleted == 0 {
        return Err(Error::new(ErrorKind::NotFound, "the run has no documents")
            .with_operation(Operation::DeleteRun)
            .with_run(run)
            .into());
    }
    out!("deleted run {run}: {deleted} document(s)")?;
    Ok(ExitCode::SUCCESS)
}
