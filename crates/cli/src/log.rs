//! The log subscriber: what the backends and the layers say, on standard
//! error, filtered by `-v`/`-q` and `RUST_LOG`.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Directive;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// For people: time, level, where, message and fields.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The directives `-v`/`-q` stand for.
///
/// By default: warnings of every crate, and the file backend's notices
/// (temporary files of dead writers swept, dead holders' leases taken over,
/// a case-insensitive root), which an operator wants to see. A failed call
/// is not logged by the tracing layer at the default level: the command
/// reports that failure itself as its error line, and printing it twice
/// would only confuse.
pub(crate) fn base_directives(verbose: u8, quiet: u8) -> &'static str {
    match (quiet, verbose) {
        (2.., _) => "off",
        (1, _) => "error",
        (0, 0) => "warn,runstate_file=info,runstate::layers=error",
        (0, 1) => "info",
        (0, 2) => "debug",
        (0, 3..) => "trace",
    }
}

/// Installs the subscriber. `RUST_LOG` directives are added after those of
/// `-v`/`-q`, so they override them for what they name (a bare level in
/// `RUST_LOG` replaces the default level). Unreadable directives are
/// reported and skipped, never fatal.
pub(crate) fn install(verbose: u8, quiet: u8, format: LogFormat, color: bool) {
    let mut filter = EnvFilter::default();
    for directive in base_directives(verbose, quiet).split(',') {
        if let Ok(directive) = Directive::from_str(directive) {
            filter = filter.add_directive(directive);
        }
    }
    if let Ok(extra) = std::env::var("RUST_LOG") {
        for piece in extra.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match Directive::from_str(piece) {
                Ok(directive) => filter = filter.add_directive(directive),
                Err(error) => {
                    if quiet < 2 {
                        eprintln!("runstate: ignoring the RUST_LOG directive `{piece}`: {error}");
                    }
                }
            }
        }
    }
    let registry = tracing_subscriber::registry().with(filter);
    // A second subscriber (none here) would be the only reason this fails;
    // logging is best effort either way.
    let _ = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(color),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_parses() {
        for quiet in 0..3 {
            for verbose in 0..4 {
                for directive in base_directives(verbose, quiet).split(',') {
                    assert!(Directive::from_str(directive).is_ok(), "{directive}");
                }
            }
        }
    }
}
