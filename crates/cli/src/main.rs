//! `runstate`: the command line of runstate.

#![forbid(unsafe_code)]

#[macro_use]
mod output;
mod demo;
mod docs;
mod doctor;
mod locks;
mod migrate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use runstate::{AnyStore, ErrorKind, OpenMode};

/// The exit codes, as `runstate --help` shows them.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the backend or the system failed (I/O, network, timeout, a copy that reads back wrong)
  2  usage: bad arguments, URL, option, run id or document name, a document over a
     size limit, or a store that does not exist (commands that only read never create one)
  3  not found: no such run or document
  4  conflict: locked, already exists, changed since the given version, fenced
  5  differences: `verify` found differing runs, `doctor` a failed check
  70 internal error (a bug: please report it)

The store comes from --url or the RUNSTATE_URL environment variable, for example
file:///srv/runs?ext=nodb, sqlite://runs.db, postgres://user@host/db,
mysql://root@host/db, redis://host:6379/0, s3://bucket/prefix. `migrate` and `verify` also read
RUNSTATE_FROM_URL and RUNSTATE_TO_URL, which keep passwords off the command line.";

/// Exit code: the backend or the system failed.
const EXIT_FAILURE: u8 = 1;
/// Exit code: bad arguments, URL or ids.
const EXIT_USAGE: u8 = 2;
/// Exit code: no such run or document.
const EXIT_NOT_FOUND: u8 = 3;
/// Exit code: locked, already exists, precondition, fenced.
const EXIT_CONFLICT: u8 = 4;
/// Exit code: `verify` or `doctor` found a problem.
pub(crate) const EXIT_DIFFERENCES: u8 = 5;
/// Exit code: a bug.
const EXIT_INTERNAL: i32 = 70;

/// Inspect, repair and move the runs of a runstate store.
///
/// A run is a set of named documents (WEPPcloud's `ron`, `climate`,
/// `watershed`, …) kept in one of several backends, chosen by URL.
#[derive(Debug, Parser)]
#[command(name = "runstate", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// The store's URL (file:, sqlite:, postgres:, mysql:, redis:, s3:).
    #[arg(
        long,
        env = "RUNSTATE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    url: Option<String>,
    /// Print JSON instead of tables (listings and reports).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the runs, or the documents of one run (name, size, version).
    Ls(docs::LsArgs),
    /// Write a document's bytes to standard output.
    Cat(docs::CatArgs),
    /// Save a document from a file or standard input, under its lock.
    Put(docs::PutArgs),
    /// Delete a document, or a whole run, under its lock.
    Rm(docs::RmArgs),
    /// List held locks: holder host and pid, since, expires in, fence.
    Locks(locks::LocksArgs),
    /// Break a lock someone else holds (an operator's forced release).
    Unlock(locks::UnlockArgs),
    /// Copy runs to another store, byte-exact, verified, resumable.
    Migrate(migrate::MigrateArgs),
    /// Compare runs of two stores by hash; exit 5 on any difference.
    Verify(migrate::VerifyArgs),
    /// Probe a store's conditional writes and leases; print its capabilities.
    Doctor(doctor::DoctorArgs),
    /// Run worker processes updating documents under leases on the file
    /// backend, then print who updated what, the fences they held, and the
    /// final state.
    Demo(demo::DemoArgs),
    /// One demo worker (started by `runstate demo`).
    #[command(hide = true)]
    DemoWorker(demo::WorkerArgs),
}

/// What every command gets besides its own arguments.
pub(crate) struct Global {
    url: Option<String>,
    /// Print JSON.
    pub(crate) json: bool,
}

impl Global {
    /// Opens the store of `--url` / `RUNSTATE_URL`.
    pub(crate) async fn open(&self, mode: OpenMode) -> Result<AnyStore, CliError> {
        let url = self.url.as_deref().ok_or_else(|| {
            CliError::usage("no store given").with_hint(
                "pass --url URL or set RUNSTATE_URL (for example file:///srv/runs?ext=nodb)",
            )
        })?;
        open_url(url, mode).await
    }
}

/// Opens a store, with a hint naming the server when it cannot be reached.
/// Commands that only read open with [`OpenMode::Existing`], so a typo
/// in a URL never leaves an empty store behind.
pub(crate) async fn open_url(url: &str, mode: OpenMode) -> Result<AnyStore, CliError> {
    runstate::open_with(url, mode).await.map_err(|error| {
        let shown = runstate::redact_url(url);
        let hint = match error.kind() {
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
    let cli = Cli::parse();
    let global = Global {
        url: cli.url,
        json: cli.json,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(CliError::from(error)),
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Ls(args) => docs::ls(&global, args).await,
            Command::Cat(args) => docs::cat(&global, args).await,
            Command::Put(args) => docs::put(&global, args).await,
            Command::Rm(args) => docs::rm(&global, args).await,
            Command::Locks(args) => locks::locks(&global, args).await,
            Command::Unlock(args) => locks::unlock(&global, args).await,
            Command::Migrate(args) => migrate::migrate(&global, args).await,
            Command::Verify(args) => migrate::verify(&global, args).await,
            Command::Doctor(args) => doctor::doctor(&global, args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::DemoWorker(args) => demo::worker(args).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(error) => fail(error),
    }
}

/// Prints an error and its causes on one line, then its hint, and returns
/// its exit code.
fn fail(error: CliError) -> ExitCode {
    // A reader that went away (`runstate ls | head`) is not an error.
    if error
        .error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "runstate: error: {}",
        runstate::display_chain(&*error.error)
    );
    if let Some(hint) = error.hint.or_else(|| default_hint(&*error.error)) {
        eprintln!("hint: {hint}");
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
        ErrorKind::Precondition => {
            "the document changed since that version: `runstate ls RUN` shows the current one"
                .to_owned()
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
