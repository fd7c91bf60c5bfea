//! `runstate`: the command line of runstate.

#![forbid(unsafe_code)]

#[macro_use]
mod output;
mod demo;
mod docs;
mod doctor;
mod extras;
mod locks;
mod log;
mod migrate;
mod operate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use runstate::{AnyStore, ErrorKind, OpenMode, Operation};

/// The exit codes, as `runstate --help` shows them.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the backend or the system failed (I/O, network, timeout, a copy that reads back wrong);
     `health`: the store is failing; `watch --count N --timeout T`: T passed first
  2  usage: bad arguments, URL, option, run id or document name, a document over a
     size limit, a store that does not exist (only `init`, `put` and a migration's target
     create one), or a refused dangerous command (`rm RUN` without --all, `unlock`
     without --force)
  3  not found: no such run or document
  4  conflict: locked, already exists, changed since the given version, fenced
  5  differences: `verify` found differing runs, `doctor` a failed check, `health` a
     degraded store, `migrate --keep-going` a run that failed
  70 internal error (a bug: please report it)

One store is named by --url or the RUNSTATE_URL environment variable, for example
file:///srv/runs?ext=nodb, sqlite://runs.db, postgres://user@host/db,
mysql://root@host/db, redis://host:6379/0, s3://bucket/prefix, memory://.
`migrate` and `verify` name two, with --from and --to (or RUNSTATE_FROM_URL and
RUNSTATE_TO_URL, which keep passwords off the command line), and select runs with
--run ID (repeated) or --all.

Logs go to standard error: warnings by default, -v info, -vv debug, -vvv trace,
-q errors only, -qq nothing; RUST_LOG adds or overrides directives
(RUST_LOG=runstate_s3=debug); --log-format json writes one JSON object per line.
Colour is used on a terminal only, never when NO_COLOR is set (--color overrides).";

/// Exit code: the backend or the system failed.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Exit code: bad arguments, URL or ids.
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit code: no such run or document.
pub(crate) const EXIT_NOT_FOUND: u8 = 3;
/// Exit code: locked, already exists, precondition, fenced.
const EXIT_CONFLICT: u8 = 4;
/// Exit code: `verify`, `doctor` or `health` found a problem.
pub(crate) const EXIT_DIFFERENCES: u8 = 5;
/// Exit code: a bug.
const EXIT_INTERNAL: i32 = 70;

/// Inspect, repair, watch and move the runs of a runstate store.
///
/// A run is a set of named documents (WEPPcloud's `ron`, `climate`,
/// `watershed`, …) kept in one of several backends, chosen by URL.
#[derive(Debug, Parser)]
#[command(name = "runstate", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// The store's URL (file:, sqlite:, postgres:, mysql:, redis:, s3:, memory:).
    #[arg(
        long,
        env = "RUNSTATE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    url: Option<String>,
    /// Print JSON instead of text (`watch`: one object per line).
    #[arg(long, global = true)]
    json: bool,
    /// More log output on standard error: -v info, -vv debug, -vvv trace.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "quiet")]
    verbose: u8,
    /// Less output on standard error: -q errors only, -qq nothing but the error line.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    quiet: u8,
    /// How log lines are written.
    #[arg(long, value_enum, default_value_t = log::LogFormat::Text, global = true, value_name = "FORMAT")]
    log_format: log::LogFormat,
    /// When to use colour: auto (on a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, value_enum, default_value_t = ColorWhen::Auto, global = true, value_name = "WHEN")]
    color: ColorWhen,
    #[command(subcommand)]
    command: Command,
}

/// When to write colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ColorWhen {
    /// On a terminal, unless `NO_COLOR` is set or `TERM=dumb`.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

impl ColorWhen {
    /// Whether to colour a stream that is (or is not) a terminal.
    pub(crate) fn enabled(self, terminal: bool) -> bool {
        match self {
            ColorWhen::Always => true,
            ColorWhen::Never => false,
            ColorWhen::Auto => {
                terminal
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
            }
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the runs (-l: documents, size, last change), or the documents of one run.
    Ls(docs::LsArgs),
    /// Write a document's bytes to standard output (--pretty: indented JSON).
    Cat(docs::CatArgs),
    /// Show one document: version, size, modification time, lock holder.
    Stat(docs::StatArgs),
    /// Save a document from a file or standard input, under its lock.
    Put(docs::PutArgs),
    /// Delete a document, or a whole run with --all, under its lock.
    Rm(docs::RmArgs),
    /// List held locks: holder host and pid, since, expires in, fence.
    Locks(locks::LocksArgs),
    /// Break a lock someone else holds (an operator's forced release).
    Unlock(locks::UnlockArgs),
    /// Follow a run: document changes and status messages, until Ctrl-C.
    Watch(operate::WatchArgs),
    /// A run at a glance: milestones, attributes, held locks, last messages.
    Status(operate::StatusArgs),
    /// Publish a status message on a topic of a run.
    Publish(operate::PublishArgs),
    /// Record that a task of a run finished now (a milestone).
    Mark(operate::MarkArgs),
    /// Set an attribute of a run.
    Attr(operate::AttrArgs),
    /// Copy runs to another store, byte-exact, verified, resumable.
    Migrate(migrate::MigrateArgs),
    /// Compare runs of two stores by hash; exit 5 on any difference.
    Verify(migrate::VerifyArgs),
    /// Probe an existing store's conditional writes and leases; print its capabilities.
    Doctor(doctor::DoctorArgs),
    /// How the store is doing: ok, degraded or failing, latencies, last error.
    Health(operate::HealthArgs),
    /// Create the store a URL names (folder, database file, tables) if it is missing.
    Init(extras::InitArgs),
    /// Run worker processes updating documents under leases on the file
    /// backend, then print who updated what, the fences they held, and the
    /// final state.
    Demo(demo::DemoArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(extras::CompletionsArgs),
    /// Print the manual page (roff), of runstate or of one command.
    Man(extras::ManArgs),
    /// One demo worker (started by `runstate demo`).
    #[command(hide = true)]
    DemoWorker(demo::WorkerArgs),
}

impl Command {
    /// The command's name, as typed.
    fn name(&self) -> &'static str {
        match self {
            Command::Ls(_) => "ls",
            Command::Cat(_) => "cat",
            Command::Stat(_) => "stat",
            Command::Put(_) => "put",
            Command::Rm(_) => "rm",
            Command::Locks(_) => "locks",
            Command::Unlock(_) => "unlock",
            Command::Watch(_) => "watch",
            Command::Status(_) => "status",
            Command::Publish(_) => "publish",
            Command::Mark(_) => "mark",
            Command::Attr(_) => "attr",
            Command::Migrate(_) => "migrate",
            Command::Verify(_) => "verify",
            Command::Doctor(_) => "doctor",
            Command::Health(_) => "health",
            Command::Init(_) => "init",
            Command::Demo(_) => "demo",
            Command::Completions(_) => "completions",
            Command::Man(_) => "man",
            Command::DemoWorker(_) => "demo-worker",
        }
    }
}

/// The `clap` command of `runstate`, for completions and manual pages.
pub(crate) fn command() -> clap::Command {
    Cli::command()
}

/// What every command gets besides its own arguments.
pub(crate) struct Global {
    url: Option<String>,
    /// Whether `--url` was typed (rather than taken from `RUNSTATE_URL`).
    url_typed: bool,
    /// Print JSON.
    pub(crate) json: bool,
    /// Colour standard output.
    pub(crate) color: bool,
    /// `-q`: no notes on standard error.
    pub(crate) quiet: bool,
}

impl Global {
    /// The URL of `--url` / `RUNSTATE_URL`.
    pub(crate) fn url(&self) -> Result<&str, CliError> {
        self.url.as_deref().ok_or_else(|| {
            CliError::usage("no store given").with_hint(
                "pass --url URL or set RUNSTATE_URL (for example file:///srv/runs?ext=nodb)",
            )
        })
    }

    /// Opens the store of `--url` / `RUNSTATE_URL`.
    pub(crate) async fn open(&self, mode: OpenMode) -> Result<AnyStore, CliError> {
        open_url(self.url()?, mode).await
    }

    /// Refuses a typed `--url` for commands that name their stores
    /// otherwise (`RUNSTATE_URL` in the environment is simply not used by
    /// them).
    pub(crate) fn refuse_url(
        &self,
        command: &str,
        instead: impl Into<String>,
    ) -> Result<(), CliError> {
        if self.url_typed {
            return Err(
                CliError::usage(format!("`{command}` does not take --url")).with_hint(instead)
            );
        }
        Ok(())
    }

    /// Prints a note for people on standard error, unless `-q`.
    pub(crate) fn note(&self, text: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("runstate: {text}");
        }
    }
}

/// Opens a store, with a hint naming the server when it cannot be reached,
/// and one saying how to create a store that does not exist. Commands that
/// do not write open with [`OpenMode::Existing`], so a typo in a URL never
/// leaves an empty store behind.
pub(crate) async fn open_url(url: &str, mode: OpenMode) -> Result<AnyStore, CliError> {
    tracing::debug!(url = %runstate::redact_url(url), ?mode, "opening the store");
    runstate::open_with(url, mode).await.map_err(|error| {
        let shown = runstate::redact_url(url);
        let missing = runstate::is_missing_store(&error);
        let hint = match error.kind() {
            ErrorKind::Config if missing => format!(
                "check the URL for a typo; to create a new store there: runstate init --url '{shown}'"
            ),
            ErrorKind::Config => format!(
                "check the URL `{shown}` and its options (`runstate --help` shows the forms)"
            ),
            ErrorKind::Backend | ErrorKind::Timeout => {
                format!("is the server of `{shown}` running and reachable from here?")
            }
            _ => String::new(),
        };
        let error = CliError::from(error);
        if hint.is_empty() {
            error
        } else {
            error.with_hint(hint)
        }
    })
}

/// The `--color` choice typed on the command line, looked up before clap
/// parses (clap needs it to colour its own help and errors).
fn color_in_args() -> ColorWhen {
    let mut args = std::env::args_os().skip(1);
    let mut choice = ColorWhen::Auto;
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy().into_owned();
        if arg == "--" {
            break;
        }
        let value = if arg == "--color" {
            args.next().map(|v| v.to_string_lossy().into_owned())
        } else {
            arg.strip_prefix("--color=").map(str::to_owned)
        };
        if let Some(value) = value.and_then(|v| ColorWhen::from_str(&v, true).ok()) {
            choice = value;
        }
    }
    choice
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        eprintln!("runstate: internal error: {payload}{location}");
        eprintln!("hint: this is a bug; please report it with the command you ran");
        std::process::exit(EXIT_INTERNAL);
    }));
    let clap_color = match color_in_args() {
        ColorWhen::Auto => clap::ColorChoice::Auto,
        ColorWhen::Always => clap::ColorChoice::Always,
        ColorWhen::Never => clap::ColorChoice::Never,
    };
    use std::io::IsTerminal as _;
    let parsed = Cli::command()
        .color(clap_color)
        .try_get_matches()
        .and_then(|matches| Ok((Cli::from_arg_matches(&matches)?, matches)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            let color = color_in_args().enabled(std::io::stderr().is_terminal());
            return usage_error(error, color);
        }
    };
    let url_typed = matches.value_source("url") == Some(ValueSource::CommandLine);
    let stderr_color = cli.color.enabled(std::io::stderr().is_terminal());
    let global = Global {
        url: cli.url,
        url_typed,
        json: cli.json,
        color: cli.color.enabled(std::io::stdout().is_terminal()),
        quiet: cli.quiet > 0,
    };
    log::install(cli.verbose, cli.quiet, cli.log_format, stderr_color);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(CliError::from(error), stderr_color),
    };
    let name = cli.command.name();
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Ls(args) => docs::ls(&global, args).await,
            Command::Cat(args) => docs::cat(&global, args).await,
            Command::Stat(args) => docs::stat(&global, args).await,
            Command::Put(args) => docs::put(&global, args).await,
            Command::Rm(args) => docs::rm(&global, args).await,
            Command::Locks(args) => locks::locks(&global, args).await,
            Command::Unlock(args) => locks::unlock(&global, args).await,
            Command::Watch(args) => operate::watch(&global, args).await,
            Command::Status(args) => operate::status(&global, args).await,
            Command::Publish(args) => operate::publish(&global, args).await,
            Command::Mark(args) => operate::mark(&global, args).await,
            Command::Attr(args) => operate::attr(&global, args).await,
            Command::Migrate(args) => migrate::migrate(&global, args).await,
            Command::Verify(args) => migrate::verify(&global, args).await,
            Command::Doctor(args) => doctor::doctor(&global, args).await,
            Command::Health(args) => operate::health(&global, args).await,
            Command::Init(args) => extras::init(&global, args).await,
            Command::Demo(args) => demo::run(&global, args).await,
            Command::Completions(args) => extras::completions(&global, args),
            Command::Man(args) => extras::man(&global, args),
            Command::DemoWorker(args) => demo::worker(args).await,
        }
    });
    // Background tasks (watch listeners, lease keepers) must not hold the
    // exit up.
    runtime.shutdown_background();
    tracing::debug!(command = name, "done");
    match outcome {
        Ok(code) => code,
        Err(error) => fail(error, stderr_color),
    }
}

/// Reports a command line clap refused like every other error: one line,
/// then a hint (clap's tip, or the usage). Help and version requests are
/// printed as clap prints them.
fn usage_error(error: clap::Error, color: bool) -> ExitCode {
    use clap::error::ErrorKind as Kind;
    if matches!(
        error.kind(),
        Kind::DisplayHelp | Kind::DisplayVersion | Kind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        error.exit()
    }
    // Rendered without colour; the lines are recomposed below.
    let text = error.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("bad arguments")
        .trim_start_matches("error:")
        .trim()
        .to_owned();
    let rest: Vec<&str> = lines.collect();
    let tip = rest
        .iter()
        .find_map(|l| l.strip_prefix("tip:"))
        .map(|t| t.trim().to_owned());
    let values = rest
        .iter()
        .find(|l| l.starts_with("[possible values:"))
        .map(|l| l.trim_matches(['[', ']']).to_owned());
    let usage = rest
        .iter()
        .find_map(|l| l.strip_prefix("Usage:"))
        .map(|u| format!("usage: {}", u.trim()));
    let hint = match (values, tip) {
        (Some(values), Some(tip)) => Some(format!("{values}; {tip}")),
        (values, tip) => values.or(tip),
    }
    .or(usage)
    .unwrap_or_else(|| "`runstate --help` shows the commands and their arguments".to_owned());
    let mut cli_error = CliError::usage(first).with_hint(hint);
    cli_error.code = Some(u8::try_from(error.exit_code()).unwrap_or(EXIT_USAGE));
    fail(cli_error, color)
}

/// Prints an error and its causes on one line, then its hint, and returns
/// its exit code.
fn fail(error: CliError, color: bool) -> ExitCode {
    // A reader that went away (`runstate ls | head`) is not an error.
    if error
        .error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    {
        return ExitCode::SUCCESS;
    }
    let (error_label, hint_label) = if color {
        ("\x1b[1;31merror:\x1b[0m", "\x1b[1;36mhint:\x1b[0m")
    } else {
        ("error:", "hint:")
    };
    // One line, whatever the messages hold.
    let line = runstate::display_chain(&*error.error).replace(['\n', '\r'], " ");
    eprintln!("runstate: {error_label} {line}");
    if let Some(hint) = error.hint.or_else(|| default_hint(&*error.error)) {
        eprintln!("{hint_label} {}", hint.replace(['\n', '\r'], " "));
    }
    ExitCode::from(error.code.unwrap_or_else(|| exit_code(&*error.error)))
}

fn runstate_error<'a>(
    error: &'a (dyn std::error::Error + Send + Sync + 'static),
) -> Option<&'a runstate::Error> {
    error.downcast_ref::<runstate::Error>()
}

/// The exit code of an error, by its kind.
fn exit_code(error: &(dyn std::error::Error + Send + Sync + 'static)) -> u8 {
    let Some(error) = runstate_error(error) else {
        return EXIT_FAILURE;
    };
    match error.kind() {
        ErrorKind::InvalidKey
        | ErrorKind::InvalidArgument
        | ErrorKind::Config
        | ErrorKind::TooLarge
        | ErrorKind::Unsupported => EXIT_USAGE,
        ErrorKind::NotFound => EXIT_NOT_FOUND,
        ErrorKind::AlreadyExists
        | ErrorKind::Precondition
        | ErrorKind::Locked
        | ErrorKind::LeaseLost
        | ErrorKind::Fenced => EXIT_CONFLICT,
        _ => EXIT_FAILURE,
    }
}

/// What to try next, for the kinds where there is something to say.
fn default_hint(error: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<String> {
    let error = runstate_error(error)?;
    let hint = match error.kind() {
        ErrorKind::InvalidKey => {
            "run ids and document names are 1 to 128 bytes of A-Z a-z 0-9 . _ -, not starting with a dot"
                .to_owned()
        }
        ErrorKind::Locked => {
            let lock = error
                .lock()
                .map_or_else(|| "RUN [DOC]".to_owned(), |l| l.to_string().replace('/', " "));
            format!(
                "wait for the holder to finish, or if it is gone for good: runstate unlock {lock} --force"
            )
        }
        ErrorKind::NotFound => {
            "`runstate ls` lists the runs, `runstate ls RUN` the documents of one".to_owned()
        }
        // A migration's source that changed meanwhile: running the same
        // command again resumes the copy.
        ErrorKind::Precondition if error.operation() == Some(Operation::Migrate) => {
            "the source changed during the migration: run the same command again, it resumes"
                .to_owned()
        }
        ErrorKind::Precondition => {
            "the document changed since that version: `runstate stat RUN DOC` shows the current one"
                .to_owned()
        }
        ErrorKind::Unsupported => {
            "`runstate doctor` shows what this backend supports".to_owned()
        }
        ErrorKind::Timeout => "the server did not answer in time; is it overloaded or paused?".to_owned(),
        _ => return None,
    };
    Some(hint)
}

/// An error of a command: what went wrong, what to try, and the exit code
/// when the error's kind does not decide it.
pub(crate) struct CliError {
    error: Box<dyn std::error::Error + Send + Sync + 'static>,
    hint: Option<String>,
    code: Option<u8>,
}

impl CliError {
    /// A failure described by a message (exit code 1).
    pub(crate) fn msg(message: impl Into<String>) -> Self {
        CliError {
            error: message.into().into(),
            hint: None,
            code: None,
        }
    }

    /// A usage error (exit code 2).
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError::msg(message).with_code(EXIT_USAGE)
    }

    /// Sets the hint printed under the error.
    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Whether this says only that the store a URL names does not exist
    /// (see [`runstate::is_missing_store`]).
    pub(crate) fn is_missing_store(&self) -> bool {
        self.error
            .downcast_ref::<runstate::Error>()
            .is_some_and(runstate::is_missing_store)
    }

    /// The error's kind, when it is a runstate error.
    pub(crate) fn kind(&self) -> Option<ErrorKind> {
        self.error
            .downcast_ref::<runstate::Error>()
            .map(runstate::Error::kind)
    }

    /// The error's message and causes, on one line.
    pub(crate) fn message(&self) -> String {
        runstate::display_chain(&*self.error)
    }

    /// Sets the exit code.
    pub(crate) fn with_code(mut self, code: u8) -> Self {
        self.code = Some(code);
        self
    }
}

impl From<runstate::Error> for CliError {
    fn from(error: runstate::Error) -> Self {
        CliError {
            error: Box::new(error),
            hint: None,
            code: None,
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> Self {
        CliError {
            error: Box::new(error),
            hint: None,
            code: None,
        }
    }
}

/// Where the demo keeps its data unless told otherwise.
pub(crate) fn default_data_dir() -> PathBuf {
    PathBuf::from("runstate-data")
}
