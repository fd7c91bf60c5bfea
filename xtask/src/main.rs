//! `cargo xtask`: the project's automation, with nothing but std.
//!
//! ```text
//! cargo xtask test [--backend NAME]        every test of every backend (or one backend), services included
//! cargo xtask services up|down|status      the servers the backends' tests need
//! cargo xtask ci                           fmt --check, clippy -D warnings, doc -D warnings, then `cargo xtask test`
//! cargo xtask bench [--backend NAME] [--quick]   W1–W4 and migrations against raw baselines → target/bench/*.json
//! ```

#![forbid(unsafe_code)]

mod services;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use services::Service;

/// A backend of the workspace: the package holding its tests, the filter
/// selecting them when the package serves several backends, and the
/// services they need.
struct Backend {
    name: &'static str,
    package: &'static str,
    filter: Option<&'static str>,
    services: &'static [&'static Service],
    /// Whether its tests need the S3 server xtask runs itself (moto).
    moto: bool,
}

/// Every backend that exists. Later backends add a line here.
const BACKENDS: &[Backend] = &[
    Backend {
        name: "file",
        package: "runstate-file",
        filter: None,
        services: &[],
        moto: false,
    },
    Backend {
        name: "redis",
        package: "runstate-redis",
        filter: None,
        services: &[&services::REDIS],
        moto: false,
    },
    Backend {
        name: "postgres",
        package: "runstate-sql",
        filter: Some("postgres"),
        services: &[&services::POSTGRES],
        moto: false,
    },
    Backend {
        name: "mysql",
        package: "runstate-sql",
        filter: Some("mysql"),
        services: &[&services::MARIADB],
        moto: false,
    },
    Backend {
        name: "sqlite",
        package: "runstate-sql",
        filter: Some("sqlite"),
        services: &[],
        moto: false,
    },
    Backend {
        name: "s3",
        package: "runstate-s3",
        filter: None,
        services: &[],
        moto: true,
    },
    // The in-memory store: no server, no files.
    Backend {
        name: "memory",
        package: "runstate",
        filter: Some("memory"),
        services: &[],
        moto: false,
    },
];

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test [--backend NAME]             run every test of every backend (or of one backend),
                                    starting the services they need; fails on any skip
  services up|down|status           start, stop or show the services the tests need
  ci                                cargo fmt --check, clippy -D warnings, doc -D warnings,
                                    then `cargo xtask test`
  bench [--backend NAME] [--quick]  run workloads W1-W4 and the migrations between backends
                                    against raw baselines, listing 1,000 and 100,000 runs, cached
                                    loads and optimistic updates; prints tables and writes
                                    target/bench/{report,migration,listing,cache}.json
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("test") => backend_option(&args[1..]).and_then(|backend| test(backend.as_deref())),
        Some("services") => services::command(args.get(1).map(String::as_str), &all_services()),
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("unknown or missing command\n\n{USAGE}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate's folder).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

/// Runs a command, echoing it, and fails if it fails.
fn run(mut command: Command, what: &str) -> Result<(), String> {
    eprintln!("\n==> {what}");
    let started = Instant::now();
    let status = command
        .status()
        .map_err(|e| format!("could not start `{what}`: {e}"))?;
    eprintln!(
        "<== {what}: {} in {:.1} s",
        if status.success() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{what}` failed ({status})"))
    }
}

fn backend_option(args: &[String]) -> Result<Option<String>, String> {
    match args {
        [] => Ok(None),
        [flag, name] if flag == "--backend" => {
            if BACKENDS.iter().any(|b| b.name == name) {
                Ok(Some(name.clone()))
            } else {
                Err(format!(
                    "unknown backend `{name}` (known: {})",
                    backend_names()
                ))
            }
        }
        _ => Err(format!("expected [--backend NAME], got {args:?}")),
    }
}

fn backend_names() -> String {
    BACKENDS
        .iter()
        .map(|b| b.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn all_services() -> Vec<&'static Service> {
    let mut all: Vec<&'static Service> = Vec::new();
    for backend in BACKENDS {
        for service in backend.services {
            if !all.iter().any(|s| s.name == service.name) {
                all.push(service);
            }
        }
    }
    all
}

/// The environment the tests need, and the S3 server started for this run.
type Prepared = (Vec<(String, String)>, Option<services::Moto>);

/// Starts (or finds) the services of the selected backends and returns the
/// environment the tests need to reach them, and the servers xtask started
/// for this run only (stopped by PID when it ends).
fn prepare(selected: &[&Backend]) -> Result<Prepared, String> {
    let mut env = Vec::new();
    for backend in selected {
        for service in backend.services {
            env.extend(service.ensure()?);
        }
    }
    let moto = if selected.iter().any(|b| b.moto) && std::env::var_os("RUNSTATE_S3_URL").is_none() {
        let moto = services::Moto::start()?;
        env.extend(moto.env());
        Some(moto)
    } else {
        None
    };
    Ok((env, moto))
}

fn test(backend: Option<&str>) -> Result<(), String> {
    let selected: Vec<&Backend> = BACKENDS
        .iter()
        .filter(|b| backend.is_none_or(|name| b.name == name))
        .collect();
    let (env, _moto) = prepare(&selected)?;
    let mut command = cargo();
    command.arg("test");
    match backend {
        None => {
            command.args(["--workspace", "--all-features"]);
        }
        Some(_) => {
            for b in &selected {
                command.args(["--package", b.package]);
            }
            command.arg("--all-features");
            if let Some(filter) = selected.iter().find_map(|b| b.filter) {
                command.args(["--", filter]);
            }
        }
    }
    let required = backend.map_or_else(|| "all".to_owned(), str::to_owned);
    command.env("RUNSTATE_REQUIRE_BACKENDS", &required);
    // The case-insensitive file system test stages a real FUSE mount; a
    // machine that cannot must fail the run, not skip it.
    command.env("RUNSTATE_REQUIRE_FUSE", "1");
    command.envs(env);
    eprintln!(
        "backends: {} (RUNSTATE_REQUIRE_BACKENDS={required}: a backend whose server is missing fails, never skips)",
        selected
            .iter()
            .map(|b| b.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    run(command, "cargo test")
}

fn ci() -> Result<(), String> {
    let started = Instant::now();
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt, "cargo fmt --check")?;

    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy, "cargo clippy -D warnings")?;

    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps", "--all-features"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    run(doc, "cargo doc -D warnings")?;

    // The README's test command, exactly as a newcomer types it.
    let mut test = cargo();
    test.args(["xtask", "test"]);
    run(test, "cargo xtask test")?;
    eprintln!(
        "\nci: everything passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut backend = None;
    let mut quick = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--backend" => {
                let name = rest.next().ok_or("--backend needs a NAME")?;
                backend = backend_option(&["--backend".to_owned(), name.clone()])?;
            }
            other => return Err(format!("unknown bench option `{other}`")),
        }
    }
    let selected: Vec<&Backend> = BACKENDS
        .iter()
        .filter(|b| backend.as_deref().is_none_or(|name| b.name == name))
        .collect();
    let (env, _moto) = prepare(&selected)?;
    // The migration benchmark drives the real command line, as users run it.
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "--package",
        "runstate-cli",
        "--all-features",
    ]);
    run(build, "cargo build --release (the runstate binary)")?;
    let out = target_dir().join("bench").join("report.json");
    let mut command = cargo();
    command.args([
        "bench",
        "--package",
        "runstate",
        "--bench",
        "workloads",
        "--bench",
        "migration",
        "--bench",
        "listing",
        "--bench",
        "cache",
        "--all-features",
        "--",
    ]);
    for b in &selected {
        command.args(["--backend", b.name]);
    }
    if quick {
        command.arg("--quick");
    }
    command.arg("--out").arg(&out);
    command.env(
        "RUNSTATE_BIN",
        target_dir().join("release").join("runstate"),
    );
    command.envs(env);
    run(command, "cargo bench (release build)")
}
