//! `runstate`: the command line of runstate.

#![forbid(unsafe_code)]

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code of a failed command (the error is printed on one line).
const EXIT_FAILURE: u8 = 1;

/// Inspect and exercise runstate stores.
#[derive(Debug, Parser)]
#[command(name = "runstate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run several worker processes that update documents under leases on
    /// the embedded file backend, then print who updated what, the fences
    /// they held, and the final state.
    Demo(demo::DemoArgs),
    /// One demo worker (started by `runstate demo`).
    #[command(hide = true)]
    DemoWorker(demo::WorkerArgs),
}

/// Prints an error and its causes on one line, with a hint, and returns the
/// failure exit code.
fn fail(error: &(dyn std::error::Error + 'static), hint: Option<&str>) -> ExitCode {
    eprintln!("runstate: error: {}", runstate::display_chain(error));
    if let Some(hint) = hint {
        eprintln!("hint: {hint}");
    }
    ExitCode::from(EXIT_FAILURE)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&error, None),
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::DemoWorker(args) => demo::worker(args).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(error) => {
            let hint = error.hint();
            fail(&*error.0, hint.as_deref())
        }
    }
}

/// An error of a command, with an optional hint for the person at the
/// terminal.
pub(crate) struct CliError(
    Box<dyn std::error::Error + Send + Sync + 'static>,
    Option<String>,
);

impl CliError {
    fn hint(&self) -> Option<String> {
        self.1.clone()
    }

    pub(crate) fn msg(message: impl Into<String>) -> Self {
        CliError(message.into().into(), None)
    }

    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.1 = Some(hint.into());
        self
    }
}

impl From<runstate::Error> for CliError {
    fn from(error: runstate::Error) -> Self {
        CliError(Box::new(error), None)
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> Self {
        CliError(Box::new(error), None)
    }
}

/// Where the demo keeps its data unless told otherwise.
pub(crate) fn default_data_dir() -> PathBuf {
    PathBuf::from("runstate-data")
}
