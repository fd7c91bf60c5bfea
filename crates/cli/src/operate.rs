//! The operator's commands of a running system: `health`, `watch`,
//! `status`, `publish`, `mark` and `attr`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use runstate::layers::{HealthReport, HealthStatus};
use runstate::time::Short;
use runstate::{
    AnyStore, DocName, Error, ErrorKind, GetOptions, LockKey, OpenMode, Operation, Replay, RunId,
    StatusEvent, StatusMessage, StoreExt, Subscription, Version, WatchEvent, WatchMode,
};
use serde::Serialize;

use crate::docs::{doc_name, run_id};
use crate::locks::LockRow;
use crate::output::{self, Paint};
use crate::{CliError, EXIT_DIFFERENCES, EXIT_FAILURE, Global, open_url};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Opens the store (it must exist), makes a few cheap read-only calls (a run listing, a read of
an absent document, a lock inspection) and reports what they showed: ok, degraded (some calls
failed) or failing (most did, or the store could not be opened), the last error, latency
percentiles per operation, calls in flight and failed lease renewals.

Exit status: 0 ok, 5 degraded, 1 failing or unreachable (with --json the report is printed
in these cases), 2 a bad URL or a store that does not exist (an error, no report).")]
pub(crate) struct HealthArgs {
    /// Rounds of probing calls.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    probes: u32,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Prints one line per event: a document changed (with its new version) or was deleted, a
status message was published, or `resync` where events may have been missed (then the run
is listed again and the differences are printed, so nothing is missed silently). With DOC,
only that document's changes and the messages of the topic of the same name (WEPPcloud
publishes a controller's progress on the topic of its name). --json prints one object per
line. It runs until Ctrl-C or SIGTERM (exit 0), --count events, or --timeout.

Example:
  runstate watch Mica_flume1 climate --json | jq -r .text")]
pub(crate) struct WatchArgs {
    /// The run.
    run: String,
    /// Only this document, and the status topic of the same name.
    doc: Option<String>,
    /// Stop after this many events (changes, deletions and messages); with
    /// --timeout, fail (exit 1) when the time runs out first.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Stop after this long (500ms, 5s, 2m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = output::parse_duration)]
    timeout: Option<Duration>,
    /// First replay the last N status messages of the run's history.
    #[arg(long, value_name = "N", default_value_t = 0)]
    history: usize,
}

#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// The run.
    run: String,
    /// How many of the last status messages to show.
    #[arg(long, value_name = "N", default_value_t = 10)]
    messages: usize,
}

#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// The run.
    run: String,
    /// The topic (WEPPcloud: the controller's name, such as `climate`).
    topic: String,
    /// The message; `-` reads it from standard input.
    message: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct MarkArgs {
    /// The run.
    run: String,
    /// The task that finished (`build_climate`, …).
    task: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct AttrArgs {
    /// The run.
    run: String,
    /// The attribute's name (`has_sbs`, …).
    name: String,
    /// Its value.
    value: String,
}

// ---------------------------------------------------------------- health

/// The run the probing reads touch (nothing is written to it).
const HEALTH_RUN: &str = "runstate-health";

/// `health` as printed: the store, then the facade's [`HealthReport`]
/// (whose serialized form is the `--json` output's other fields).
#[derive(Serialize)]
struct HealthOutput<'a> {
    url: &'a str,
    backend: &'a str,
    #[serde(flatten)]
    report: &'a HealthReport,
}

/// A latency for people: `850µs`, `12ms`, `1.2s`.
fn latency(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{}µs", d.as_micros())
    } else {
        Short(d).to_string()
    }
}

fn status_colour(status: HealthStatus) -> Paint {
    match status {
        HealthStatus::Ok => Paint::Green,
        HealthStatus::Degraded => Paint::Yellow,
        _ => Paint::Red,
    }
}

/// The last error's message on one line.
fn one_line(message: &str) -> String {
    message.replace(['\n', '\r'], " ")
}

fn print_health(global: &Global, out: &HealthOutput<'_>) -> Result<(), CliError> {
    if global.json {
        return output::json(out);
    }
    let report = out.report;
    let status = output::paint(
        report.status.as_str(),
        status_colour(report.status),
        global.color,
    );
    out!("store       {} ({})", out.url, out.backend)?;
    out!("status      {status}")?;
    out!(
        "calls       {} (in flight {}, failed lease renewals {})",
        report.calls,
        report.in_flight,
        report.failed_renewals
    )?;
    match &report.last_error {
        Some((at, message)) => out!(
            "last error  {} at {}",
            one_line(message),
            runstate::time::Utc(*at)
        )?,
        None => out!("last error  none")?,
    }
    if !report.latency.is_empty() {
        out!()?;
        let rows: Vec<Vec<String>> = report
            .latency
            .iter()
            .map(|l| {
                vec![
                    l.operation.to_owned(),
                    l.samples.to_string(),
                    latency(l.p50),
                    latency(l.p99),
                ]
            })
            .collect();
        output::table(&["OPERATION", "CALLS", "P50", "P99"], &rows)?;
    }
    Ok(())
}

pub(crate) async fn health(global: &Global, args: HealthArgs) -> Result<ExitCode, CliError> {
    let url = global.url()?;
    let store = match open_url(url, OpenMode::Existing).await {
        Ok(store) => store,
        // Unreachable is the worst health there is: say so in the report's
        // form too, for monitors that read it.
        Err(error) if matches!(error.kind(), Some(ErrorKind::Backend | ErrorKind::Timeout)) => {
            let shown = runstate::redact_url(url);
            let backend = runstate::Scheme::of_url(url).map_or("unknown", |s| s.name());
            print_health(
                global,
                &HealthOutput {
                    url: &shown,
                    backend,
                    report: &HealthReport::unreachable(error.message()),
                },
            )?;
            return Err(error);
        }
        Err(error) => return Err(error),
    };
    let run = run_id(HEALTH_RUN)?;
    let doc = doc_name("probe")?;
    let leases = store.capabilities().leases;
    // Failures are what the report is about: every call is made and
    // counted whatever the previous one did.
    for _ in 0..args.probes {
        let _ = store.list_runs(None, 1).await;
        let _ = store.get(&run, &doc, GetOptions::new()).await;
        if leases {
            let _ = store.inspect(&LockKey::Run(run.clone())).await;
        }
    }
    let report: HealthReport = store.health();
    print_health(
        global,
        &HealthOutput {
            url: store.url(),
            backend: store.scheme().name(),
            report: &report,
        },
    )?;
    let last = report
        .last_error
        .as_ref()
        .map_or_else(String::new, |(_, message)| {
            format!(": last error {}", one_line(message))
        });
    match report.status {
        HealthStatus::Ok => Ok(ExitCode::SUCCESS),
        HealthStatus::Degraded => Err(CliError::msg(format!("the store is degraded{last}"))
            .with_code(EXIT_DIFFERENCES)
            .with_hint("some calls failed; `runstate doctor` probes what the store honours")),
        _ => Err(CliError::msg(format!("the store is failing{last}"))
            .with_code(EXIT_FAILURE)
            .with_hint("most calls failed: is the server running, reachable and not full?")),
    }
}

// ---------------------------------------------------------------- watch

/// One line of `watch`.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event<'a> {
    Changed {
        run: &'a RunId,
        doc: &'a DocName,
        version: &'a Version,
        at: String,
    },
    Deleted {
        run: &'a RunId,
        doc: &'a DocName,
        at: String,
    },
    Message {
        run: &'a RunId,
        topic: &'a str,
        text: &'a str,
        id: &'a str,
        at: String,
    },
    Resync {
        run: &'a RunId,
        /// `changes` or `status`.
        stream: &'static str,
        at: String,
    },
}

fn now() -> String {
    runstate::time::Utc(SystemTime::now()).to_string()
}

fn emit(global: &Global, event: &Event<'_>) -> Result<(), CliError> {
    if global.json {
        return output::json_line(event);
    }
    let dim = |t: &str| output::paint(t, Paint::Dim, global.color);
    match event {
        Event::Changed {
            doc, version, at, ..
        } => out!("{}  changed  {doc}  {version}", dim(at)),
        Event::Deleted { doc, at, .. } => out!("{}  deleted  {doc}", dim(at)),
        Event::Message {
            topic, text, at, ..
        } => out!(
            "{}  message  {topic}  {}",
            dim(at),
            text.replace(['\n', '\r'], " ")
        ),
        Event::Resync { stream, at, .. } => out!(
            "{}  {}  {stream}: events may have been missed",
            dim(at),
            output::paint("resync", Paint::Yellow, global.color)
        ),
    }
}

/// What a watch follows and what it has seen.
struct Follower<'a> {
    global: &'a Global,
    store: &'a AnyStore,
    run: RunId,
    doc: Option<DocName>,
    known: BTreeMap<DocName, Version>,
    /// Changes, deletions and messages printed.
    printed: u64,
}

impl Follower<'_> {
    fn shows(&self, doc: &DocName) -> bool {
        self.doc.as_ref().is_none_or(|d| d == doc)
    }

    fn changed(&mut self, doc: DocName, version: Version) -> Result<(), CliError> {
        // An event for a version the snapshot already has is not news.
        if self.known.get(&doc) == Some(&version) {
            return Ok(());
        }
        if self.shows(&doc) {
            emit(
                self.global,
                &Event::Changed {
                    run: &self.run,
                    doc: &doc,
                    version: &version,
                    at: now(),
                },
            )?;
            self.printed += 1;
        }
        self.known.insert(doc, version);
        Ok(())
    }

    fn deleted(&mut self, doc: DocName) -> Result<(), CliError> {
        // A deletion the snapshot already reflects is not news either.
        if self.known.remove(&doc).is_some() && self.shows(&doc) {
            emit(
                self.global,
                &Event::Deleted {
                    run: &self.run,
                    doc: &doc,
                    at: now(),
                },
            )?;
            self.printed += 1;
        }
        Ok(())
    }

    fn message(&mut self, message: &StatusMessage) -> Result<(), CliError> {
        if self
            .doc
            .as_ref()
            .is_some_and(|d| d.as_str() != message.topic)
        {
            return Ok(());
        }
        emit(
            self.global,
            &Event::Message {
                run: &self.run,
                topic: &message.topic,
                text: &message.text,
                id: &message.id,
                at: runstate::time::Utc(message.at).to_string(),
            },
        )?;
        self.printed += 1;
        Ok(())
    }

    fn resync_marker(&self, stream: &'static str) -> Result<(), CliError> {
        emit(
            self.global,
            &Event::Resync {
                run: &self.run,
                stream,
                at: now(),
            },
        )
    }

    /// After a `Resync`: lists the run again and prints what differs from
    /// what was known (the protocol of `runstate::events`).
    async fn relist(&mut self) -> Result<(), CliError> {
        let listed = listing(self.store, &self.run).await?;
        let gone: Vec<DocName> = self
            .known
            .keys()
            .filter(|d| !listed.contains_key(*d))
            .cloned()
            .collect();
        for (doc, version) in listed {
            self.changed(doc, version)?;
        }
        for doc in gone {
            self.deleted(doc)?;
        }
        Ok(())
    }
}

async fn listing(store: &AnyStore, run: &RunId) -> Result<BTreeMap<DocName, Version>, CliError> {
    Ok(store
        .list_all_docs(run)
        .await?
        .into_iter()
        .map(|m| (m.name, m.version))
        .collect())
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called, before the watch says it is ready, so a signal sent after that
/// always ends it cleanly.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, CliError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

async fn next_status(status: &mut Option<Subscription>) -> Option<runstate::Result<StatusEvent>> {
    match status {
        Some(feed) => feed.next().await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn watch(global: &Global, args: WatchArgs) -> Result<ExitCode, CliError> {
    let run = run_id(&args.run)?;
    let doc = args.doc.as_deref().map(doc_name).transpose()?;
    let store = global.open(OpenMode::Existing).await?;
    let capabilities = store.capabilities().clone();
    // Subscribe first, then snapshot: a write landing in between shows in
    // the snapshot, as an event, or both; never in neither.
    let mut changes = store.watch(&run).await?;
    let mut status = if capabilities.status {
        let replay = match args.history {
            0 => Replay::None,
            n => Replay::Last(n),
        };
        Some(store.subscribe(&run, replay).await?)
    } else {
        None
    };
    let known = listing(&store, &run).await?;
    let stop = stop_signal()?;
    tokio::pin!(stop);
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let how = match capabilities.watch {
        WatchMode::Polling(every) => format!("by polling every {}", Short(every)),
        WatchMode::Native { .. } => "as they happen".to_owned(),
        _ => "somehow".to_owned(),
    };
    let what = doc
        .as_ref()
        .map_or_else(|| run.to_string(), |d| format!("{run}/{d}"));
    global.note(format!(
        "watching {what}: changes {how}, {}; Ctrl-C to stop",
        if status.is_some() {
            "status messages live"
        } else {
            "no status messages (not supported by this backend)"
        }
    ));
    let mut follower = Follower {
        global,
        store: &store,
        run: run.clone(),
        doc,
        known,
        printed: 0,
    };
    let wanted = args.count.unwrap_or(u64::MAX);
    while follower.printed < wanted {
        tokio::select! {
            () = &mut stop => return Ok(ExitCode::SUCCESS),
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                return match args.count {
                    Some(count) => Err(CliError::from(
                        Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "the watch timed out after {} with {} of {count} event(s)",
                                Short(args.timeout.unwrap_or_default()),
                                follower.printed
                            ),
                        )
                        .at_run(Operation::Watch, &run),
                    )
                    .with_hint("raise --timeout, or drop --count to watch for a while")),
                    None => Ok(ExitCode::SUCCESS),
                };
            }
            event = changes.next() => match event {
                Some(Ok(WatchEvent::Changed { doc, version })) => follower.changed(doc, version)?,
                Some(Ok(WatchEvent::Deleted { doc })) => follower.deleted(doc)?,
                Some(Ok(_)) => {
                    follower.resync_marker("changes")?;
                    follower.relist().await?;
                }
                Some(Err(error)) => return Err(error.into()),
                None => {
                    return Err(CliError::msg("the store stopped the watch")
                        .with_hint("run the command again; `runstate health` shows how the store is doing"));
                }
            },
            event = next_status(&mut status) => match event {
                Some(Ok(StatusEvent::Message(message))) => follower.message(&message)?,
                Some(Ok(_)) => follower.resync_marker("status")?,
                Some(Err(error)) => return Err(error.into()),
                None => {
                    tracing::warn!(run = %run, "the status subscription ended; following changes only");
                    status = None;
                }
            },
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------- status

#[derive(Serialize)]
struct MessageRow<'a> {
    id: &'a str,
    topic: &'a str,
    text: &'a str,
    at: String,
}

#[derive(Serialize)]
struct StatusOutput<'a> {
    run: &'a RunId,
    documents: u64,
    bytes: u64,
    /// Task → when it was marked done; `null` when the backend keeps none.
    milestones: Option<BTreeMap<&'a str, String>>,
    /// `null` when the backend keeps none.
    attributes: Option<&'a BTreeMap<String, String>>,
    locks: Vec<LockRow<'a>>,
    /// The last messages, oldest first; `null` when the backend keeps none.
    messages: Option<Vec<MessageRow<'a>>>,
}

/// The last `n` messages of a run's history: subscribe with a replay and
/// take what arrives until the feed goes quiet.
async fn last_messages(
    store: &AnyStore,
    run: &RunId,
    n: usize,
) -> Result<Vec<StatusMessage>, CliError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut feed = store.subscribe(run, Replay::Last(n)).await?;
    let mut messages = Vec::new();
    // The history comes first, at once; live messages trickle. Wait a
    // little longer for the first event (a polling backend reads the
    // history on its first round).
    let started = tokio::time::Instant::now();
    let mut quiet = Duration::from_millis(1000);
    while started.elapsed() < Duration::from_secs(3) {
        match tokio::time::timeout(quiet, feed.next()).await {
            Ok(Some(Ok(StatusEvent::Message(message)))) => messages.push(message),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => return Err(error.into()),
            Ok(None) | Err(_) => break,
        }
        quiet = Duration::from_millis(250);
    }
    let skip = messages.len().saturating_sub(n);
    Ok(messages.split_off(skip))
}

pub(crate) async fn status(global: &Global, args: StatusArgs) -> Result<ExitCode, CliError> {
    let run = run_id(&args.run)?;
    let store = global.open(OpenMode::Existing).await?;
    let capabilities = store.capabilities().clone();
    let docs = store.list_all_docs(&run).await?;
    let milestones = if capabilities.milestones {
        Some(store.milestones(&run).await?)
    } else {
        None
    };
    let mut locks = if capabilities.leases {
        store.list_locks(Some(&run)).await?
    } else {
        Vec::new()
    };
    locks.sort_by_key(|l| l.key.to_string());
    let messages = if capabilities.status {
        Some(last_messages(&store, &run, args.messages).await?)
    } else {
        None
    };
    let nothing = docs.is_empty()
        && locks.is_empty()
        && milestones
            .as_ref()
            .is_none_or(|m| m.timestamps.is_empty() && m.attrs.is_empty())
        && messages.as_ref().is_none_or(Vec::is_empty);
    if nothing {
        return Err(Error::new(
            ErrorKind::NotFound,
            "the run has no documents, milestones, attributes, locks or messages",
        )
        .at_run(Operation::Milestones, &run)
        .into());
    }
    let output = StatusOutput {
        run: &run,
        documents: docs.len() as u64,
        bytes: docs.iter().map(|m| m.size).sum(),
        milestones: milestones.as_ref().map(|m| {
            m.timestamps
                .iter()
                .map(|(task, at)| (task.as_str(), runstate::time::Utc(*at).to_string()))
                .collect()
        }),
        attributes: milestones.as_ref().map(|m| &m.attrs),
        locks: locks.iter().map(LockRow::new).collect(),
        messages: messages.as_ref().map(|list| {
            list.iter()
                .map(|m| MessageRow {
                    id: &m.id,
                    topic: &m.topic,
                    text: &m.text,
                    at: runstate::time::Utc(m.at).to_string(),
                })
                .collect()
        }),
    };
    if global.json {
        output::json(&output)?;
        return Ok(ExitCode::SUCCESS);
    }
    let unsupported = |what: &str| {
        output::paint(
            &format!("  ({what} not supported by this backend)"),
            Paint::Dim,
            global.color,
        )
    };
    out!("run         {run}")?;
    out!(
        "documents   {}, {}",
        output.documents,
        output::size(output.bytes)
    )?;
    out!("milestones")?;
    match &output.milestones {
        Some(m) if m.is_empty() => out!("  none")?,
        Some(m) => {
            let width = m.keys().map(|k| k.len()).max().unwrap_or(0);
            for (task, at) in m {
                out!("  {task:<width$}  {at}")?;
            }
        }
        None => out!("{}", unsupported("milestones"))?,
    }
    out!("attributes")?;
    match output.attributes {
        Some(a) if a.is_empty() => out!("  none")?,
        Some(a) => {
            let width = a.keys().map(String::len).max().unwrap_or(0);
            for (name, value) in a {
                out!("  {name:<width$}  {value}")?;
            }
        }
        None => out!("{}", unsupported("attributes"))?,
    }
    out!("locks")?;
    if locks.is_empty() {
        out!("  none held")?;
    }
    for info in &locks {
        out!("  {}  held by {info}", info.key)?;
    }
    match &messages {
        Some(list) => {
            out!("messages (last {})", args.messages)?;
            if list.is_empty() {
                out!("  none")?;
            }
            for m in list {
                out!(
                    "  {}  {}  {}",
                    output::paint(
                        &runstate::time::Utc(m.at).to_string(),
                        Paint::Dim,
                        global.color
                    ),
                    m.topic,
                    m.text.replace(['\n', '\r'], " ")
                )?;
            }
        }
        None => {
            out!("messages")?;
            out!("{}", unsupported("status messages"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------- writes

#[derive(Serialize)]
struct Published<'a> {
    run: &'a RunId,
    topic: &'a str,
    bytes: usize,
}

pub(crate) async fn publish(global: &Global, args: PublishArgs) -> Result<ExitCode, CliError> {
    let run = run_id(&args.run)?;
    let text = if args.message == "-" {
        // What a message may hold, and its line ends.
        let most = runstate::events::MAX_MESSAGE_LEN + 2;
        let bytes = crate::docs::read_at_most(
            std::io::stdin().lock(),
            u64::try_from(most).unwrap_or(u64::MAX),
        )?;
        let text = String::from_utf8(bytes).map_err(|_| {
            CliError::from(Error::new(
                ErrorKind::InvalidArgument,
                "the message is not UTF-8",
            ))
        })?;
        text.trim_end_matches(['\n', '\r']).to_owned()
    } else {
        args.message
    };
    runstate::events::check_label("topic", &args.topic)?;
    runstate::events::check_text("message", &text)?;
    let store = global.open(OpenMode::Existing).await?;
    store.publish(&run, &args.topic, &text).await?;
    if global.json {
        output::json(&Published {
            run: &run,
            topic: &args.topic,
            bytes: text.len(),
        })?;
    } else {
        out!(
            "published on {run} topic {}: {} bytes",
            args.topic,
            text.len()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct Marked<'a> {
    run: &'a RunId,
    task: &'a str,
    at: String,
}

pub(crate) async fn mark(global: &Global, args: MarkArgs) -> Result<ExitCode, CliError> {
    let run = run_id(&args.run)?;
    runstate::events::check_label("task", &args.task)?;
    let store = global.open(OpenMode::Existing).await?;
    let at = SystemTime::now();
    store.mark(&run, &args.task, at).await?;
    let at = runstate::time::Utc(at).to_string();
    if global.json {
        output::json(&Marked {
            run: &run,
            task: &args.task,
            at,
        })?;
    } else {
        out!("marked {run} {} at {at}", args.task)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct AttrSet<'a> {
    run: &'a RunId,
    name: &'a str,
    value: &'a str,
}

pub(crate) async fn attr(global: &Global, args: AttrArgs) -> Result<ExitCode, CliError> {
    let run = run_id(&args.run)?;
    runstate::events::check_label("attribute", &args.name)?;
    runstate::events::check_text("attribute value", &args.value)?;
    let store = global.open(OpenMode::Existing).await?;
    store.set_attr(&run, &args.name, &args.value).await?;
    if global.json {
        output::json(&AttrSet {
            run: &run,
            name: &args.name,
            value: &args.value,
        })?;
    } else {
        out!("set {run} {} = {}", args.name, args.value)?;
    }
    Ok(ExitCode::SUCCESS)
}
