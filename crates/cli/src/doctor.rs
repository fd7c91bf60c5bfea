//! `doctor`: what a backend declares and what it actually does.

use std::process::ExitCode;

use runstate::OpenMode;
use runstate::doctor::{DoctorReport, SCRATCH_RUN};
use serde::Serialize;

use crate::{CliError, EXIT_DIFFERENCES, Global, open_url, output};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
The probe writes to the scratch run `runstate-doctor` and deletes it afterwards. It exits 5
when a check fails: that backend must not be trusted with concurrent writers.")]
pub(crate) struct DoctorArgs {
    /// The store to probe (default: --url / RUNSTATE_URL).
    #[arg(value_name = "URL")]
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
    let url = args
        .target
        .as_deref()
        .or(global.url.as_deref())
        .ok_or_else(|| {
            CliError::usage("no store given").with_hint("runstate doctor URL (or set RUNSTATE_URL)")
        })?;
    // The probe writes anyway; a new store is created for it.
    let store = open_url(url, OpenMode::Create).await?;
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
                    if check.passed { "ok" } else { "FAILED" }.to_owned(),
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
