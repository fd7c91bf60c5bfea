//! `doctor`: what a backend declares and what it actually does.

use std::process::ExitCode;

use runstate::OpenMode;
use runstate::doctor::{DoctorReport, SCRATCH_RUN};
use serde::Serialize;

use crate::{CliError, EXIT_DIFFERENCES, Global, output};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
The store comes from --url or RUNSTATE_URL, like every command's, and must exist: doctor
never creates one (create a new store with `runstate init`). The probe writes only into the
scratch run `runstate-doctor`, claimed with a create-only write (an existing run of that
name is refused, never touched), and deletes its documents afterwards; the lease
bookkeeping of that run (its fence counter) stays, so that fences never go back. It exits
5 when a check fails: that backend must not be trusted with concurrent writers.")]
pub(crate) struct DoctorArgs {
    /// Not accepted: the store comes from --url (kept hidden to say so).
    #[arg(value_name = "URL", hide = true)]
    target: Option<String>,
}

#[derive(Serialize)]
struct DoctorOutput<'a> {
    url: &'a str,
    healthy: bool,
    #[serde(flatten)]
    report: &'a DoctorReport,
}

pub(crate) async fn doctor(global: &Global, args: DoctorArgs) -> Result<ExitCode, CliError> {
    if let Some(target) = args.target {
        let shown = runstate::redact_url(&target);
        return Err(
            CliError::usage("doctor takes its store from --url, like every command").with_hint(
                format!("runstate doctor --url '{shown}' (or set RUNSTATE_URL)"),
            ),
        );
    }
    // Only an existing store: a typo in a URL must not create one (and the
    // probe must not write into it).
    let store = global.open(OpenMode::Existing).await?;
    let report = store.doctor().await?;
    if global.json {
        output::json(&DoctorOutput {
            url: store.url(),
            healthy: report.healthy(),
            report: &report,
        })?;
    } else {
        out!("{} ({})", store.url(), store.scheme())?;
        out!()?;
        let rows: Vec<Vec<String>> = report
            .capabilities
            .iter()
            .map(|(name, value)| vec![name.clone(), value.clone()])
            .collect();
        output::table(&["CAPABILITY", "DECLARED"], &rows)?;
        out!()?;
        let rows: Vec<Vec<String>> = report
            .checks
            .iter()
            .map(|check| {
                vec![
                    if check.passed {
                        output::paint("ok", output::Paint::Green, global.color)
                    } else {
                        output::paint("FAILED", output::Paint::Red, global.color)
                    },
                    check.name.clone(),
                    check.detail.clone(),
                ]
            })
            .collect();
        output::table(&["RESULT", "CHECK", "DETAIL"], &rows)?;
        out!()?;
        out!(
            "round trips (median): get {} µs, put {} µs, lease acquire+release {} µs (scratch run {SCRATCH_RUN})",
            report.get_micros,
            report.put_micros,
            report.lease_micros
        )?;
    }
    if report.healthy() {
        Ok(ExitCode::SUCCESS)
    } else {
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect();
        Err(CliError::msg(format!(
            "{} check(s) failed: {}",
            failed.len(),
            failed.join("; ")
        ))
        .with_code(EXIT_DIFFERENCES)
        .with_hint("do not share this store between concurrent writers until the server is fixed"))
    }
}
