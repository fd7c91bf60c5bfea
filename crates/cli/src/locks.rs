//! `locks` and `unlock`: who holds what, and the operator's forced release.

use std::process::ExitCode;

use runstate::time::{Short, Utc, unix_millis};
use runstate::{Error, ErrorKind, LockInfo, LockKey, OpenMode, Operation, Owner};
use serde::Serialize;

use crate::docs::{doc_name, run_id};
use crate::{CliError, Global, output};

#[derive(Debug, clap::Args)]
pub(crate) struct LocksArgs {
    /// Only the locks of this run.
    run: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct UnlockArgs {
    /// The run.
    run: String,
    /// The document whose lock to break; without it, the run's own lock.
    doc: Option<String>,
    /// Required: breaking a live holder's lock lets a second writer in
    /// (its later saves are fenced out, but its work is lost).
    #[arg(long)]
    force: bool,
}

/// A lock as `--json` prints it.
#[derive(Serialize)]
pub(crate) struct LockRow<'a> {
    lock: String,
    run: &'a str,
    doc: Option<&'a str>,
    host: &'a str,
    pid: u32,
    owner_id: &'a str,
    since: String,
    since_unix_ms: u64,
    expires_in_ms: u64,
    fence: u64,
}

impl<'a> LockRow<'a> {
    pub(crate) fn new(info: &'a LockInfo) -> Self {
        LockRow {
            lock: info.key.to_string(),
            run: info.key.run().as_str(),
            doc: info.key.doc().map(|d| d.as_str()),
            host: info.owner.host(),
            pid: info.owner.pid(),
            owner_id: info.owner.id(),
            since: Utc(info.since).to_string(),
            since_unix_ms: unix_millis(info.since),
            expires_in_ms: u64::try_from(info.expires_in.as_millis()).unwrap_or(u64::MAX),
            fence: info.fence.get(),
        }
    }
}

pub(crate) async fn locks(global: &Global, args: LocksArgs) -> Result<ExitCode, CliError> {
    let run = args.run.as_deref().map(run_id).transpose()?;
    let store = global.open(OpenMode::Existing).await?;
    let mut held = store.list_locks(run.as_ref()).await?;
    held.sort_by_key(|info| info.key.to_string());
    if global.json {
        let rows: Vec<LockRow<'_>> = held.iter().map(LockRow::new).collect();
        output::json(&rows)?;
    } else {
        let rows: Vec<Vec<String>> = held
            .iter()
            .map(|info| {
                vec![
                    info.key.to_string(),
                    info.owner.host().to_owned(),
                    info.owner.pid().to_string(),
                    Utc(info.since).to_string(),
                    Short(info.expires_in).to_string(),
                    info.fence.to_string(),
                ]
            })
            .collect();
        output::table(
            &["LOCK", "HOST", "PID", "SINCE", "EXPIRES IN", "FENCE"],
            &rows,
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn unlock(global: &Global, args: UnlockArgs) -> Result<ExitCode, CliError> {
    let run = run_id(&args.run)?;
    let key = match args.doc.as_deref().map(doc_name).transpose()? {
        Some(doc) => LockKey::Doc(run, doc),
        None => LockKey::Run(run),
    };
    let store = global.open(OpenMode::Existing).await?;
    if !args.force {
        let holder = store.inspect(&key).await?;
        let shown = holder.map_or_else(|| "nobody holds it".to_owned(), |h| format!("held by {h}"));
        return Err(CliError::usage(format!(
            "refusing to break the lock on {key} without --force ({shown})"
        ))
        .with_hint(
            "break a lock only when its holder is gone for good; a live holder's later saves are fenced out",
        ));
    }
    let broken = store.break_lock(&key, None).await?;
    let Some(info) = broken else {
        return Err(CliError::from(
            Error::new(ErrorKind::NotFound, "nobody holds this lock")
                .with_operation(Operation::BreakLock)
                .with_lock(&key),
        )
        .with_hint("`runstate locks` shows the locks that are held"));
    };
    // The log line an operator's audit trail needs: what was broken, whose
    // it was, and who broke it when.
    let by = Owner::for_this_process();
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    eprintln!(
        "runstate: broke the lock on {key} at {} by {user}@{} pid {}: it was held by {info}",
        Utc(std::time::SystemTime::now()),
        by.host(),
        by.pid(),
    );
    if global.json {
        output::json(&LockRow::new(&info))?;
    }
    Ok(ExitCode::SUCCESS)
}
