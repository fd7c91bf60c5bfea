//! `init`, `completions` and `man`: setting a store up, and the command
//! line describing itself.

use std::io::Write;
use std::process::ExitCode;

use runstate::OpenMode;
use serde::Serialize;

use crate::{CliError, Global, open_url, output};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Creates what the URL names when it is missing: the file backend's root folder, the SQLite
database file, the tables of a server database. A store that exists is left as it is.
Commands that only read, and `doctor`, never create a store: a typo in a URL must not
leave an empty one behind.")]
pub(crate) struct InitArgs {}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  runstate completions bash > /etc/bash_completion.d/runstate
  runstate completions zsh > \"${fpath[1]}/_runstate\"
  runstate completions fish > ~/.config/fish/completions/runstate.fish")]
pub(crate) struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Example:
  runstate man > /usr/local/share/man/man1/runstate.1
  runstate man watch | man -l -")]
pub(crate) struct ManArgs {
    /// A command whose page to print (runstate-COMMAND(1)); without it,
    /// runstate(1).
    command: Option<String>,
}

#[derive(Serialize)]
struct Initialised<'a> {
    url: &'a str,
    backend: &'a str,
    created: bool,
}

pub(crate) async fn init(global: &Global, _args: InitArgs) -> Result<ExitCode, CliError> {
    let url = global.url()?;
    let (store, created) = match open_url(url, OpenMode::Existing).await {
        Ok(store) => (store, false),
        Err(error) if error.is_missing_store() => (open_url(url, OpenMode::Create).await?, true),
        Err(error) => return Err(error),
    };
    if global.json {
        output::json(&Initialised {
            url: store.url(),
            backend: store.scheme().name(),
            created,
        })?;
    } else {
        let verb = if created { "created" } else { "exists:" };
        out!("{verb} {} ({})", store.url(), store.scheme())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses `--json` for commands whose output is a script or a page.
fn no_json(global: &Global, command: &str) -> Result<(), CliError> {
    if global.json {
        return Err(CliError::usage(format!(
            "`{command}` prints a file for another program; it has no JSON form"
        ))
        .with_hint(format!("drop --json: runstate {command} …")));
    }
    Ok(())
}

pub(crate) fn completions(global: &Global, args: CompletionsArgs) -> Result<ExitCode, CliError> {
    no_json(global, "completions")?;
    let mut command = crate::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "runstate", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn man(global: &Global, args: ManArgs) -> Result<ExitCode, CliError> {
    no_json(global, "man")?;
    let root = crate::command();
    let page = match args.command.as_deref() {
        None => root,
        Some(name) => {
            let sub = root
                .get_subcommands()
                .find(|c| c.get_name() == name && !c.is_hide_set())
                .cloned()
                .ok_or_else(|| {
                    CliError::usage(format!("no command `{name}`"))
                        .with_hint("`runstate --help` lists the commands")
                })?;
            let version = root.get_version().unwrap_or_default().to_owned();
            sub.name(format!("runstate-{name}")).version(version)
        }
    };
    let mut roff = Vec::new();
    clap_mangen::Man::new(page).render(&mut roff)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&roff)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
