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
    /// Whether its tests run Python workers speaking WEPPcloud's protocol
    /// (the `redis` package in a virtual environment under target/).
    weppcloud_python: bool,
}

/// Every backend that exists. Later backends add a line here.
const BACKENDS: &[Backend] = &[
    Backend {
        name: "file",
        package: "runstate-file",
        filter: None,
        services: &[],
        moto: false,
        weppcloud_python: false,
    },
    Backend {
        name: "redis",
        package: "runstate-redis",
        filter: None,
        services: &[&services::REDIS],
        moto: false,
        weppcloud_python: true,
    },
    Backend {
        name: "postgres",
        package: "runstate-sql",
        filter: Some("postgres"),
        services: &[&services::POSTGRES],
        moto: false,
        weppcloud_python: false,
    },
    Backend {
        name: "mysql",
        package: "runstate-sql",
        filter: Some("mysql"),
        services: &[&services::MARIADB],
        moto: false,
        weppcloud_python: false,
    },
    Backend {
        name: "sqlite",
        package: "runstate-sql",
        filter: Some("sqlite"),
        services: &[],
        moto: false,
        weppcloud_python: false,
    },
    Backend {
        name: "s3",
        package: "runstate-s3",
        filter: None,
        services: &[],
        moto: true,
        weppcloud_python: false,
    },
    // The Redis backend on a Redis Cluster (3 primaries, 3 replicas started
    // by xtask, see services::RedisCluster): the tests of
    // crates/backend-redis/tests/cluster.rs and cluster_faults.rs, all
    // named `cluster::…`.
    Backend {
        name: "redis-cluster",
        package: "runstate-redis",
        filter: Some("cluster::"),
        services: &[],
        moto: false,
        weppcloud_python: false,
    },
    // The in-memory store: no server, no files.
    Backend {
        name: "memory",
        package: "runstate",
        filter: Some("memory"),
        services: &[],
        moto: false,
        weppcloud_python: false,
    },
];

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test [--backend NAME]             run every test of every backend (or of one backend),
                                    starting the services they need; fails on any skip
  services up|down|status           start, stop or show the services the tests need
  ci                                cargo fmt --check, clippy -D warnings (its incompatible_msrv
                                    lint checks the declared rust-version), doc -D warnings,
                                    cargo deny, a check with the declared MSRV, then
                                    `cargo xtask test` and every example
  bench [--backend NAME] [--quick]  run workloads W1-W4 and the migrations between backends
                                    against raw baselines, listing 1,000 and 100,000 runs, cached
                                    loads and optimistic updates; prints tables and writes
                                    target/bench/{report,migration,listing,cache}.json
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("test") => backend_option(&args[1..]).and_then(|backend| test(backend.as_deref())),
        Some("services") => services::command(args.get(1).map(String::as_str), &all_services())
            .and_then(|()| cluster_services(args.get(1).map(String::as_str))),
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
///
/// (The WEPPcloud worker tests live in the `runstate` and `runstate-redis`
/// packages and are required with the redis backend; their Python is
/// prepared here too.)
type Prepared = (
    Vec<(String, String)>,
    Option<services::Moto>,
    Option<services::RedisCluster>,
);

/// `services up|down|status` for the Redis Cluster, which (unlike the shared
/// servers) xtask starts itself: `up` leaves it running, `down` stops it by
/// its PIDs.
fn cluster_services(action: Option<&str>) -> Result<(), String> {
    match action {
        Some("status") | None => {
            let state = services::RedisCluster::running()
                .map_or_else(|| "down".to_owned(), |c| format!("up {}", c.url()));
            println!("{:<10} {state}", "redis-cluster");
        }
        Some("up") => {
            let cluster = match services::RedisCluster::running() {
                Some(cluster) => cluster,
                None => services::RedisCluster::start(false)?,
            };
            println!(
                "{:<10} up: export {}={}",
                "redis-cluster",
                services::REDIS_CLUSTER_VAR,
                cluster.url()
            );
        }
        Some("down") => {
            let stopped = services::RedisCluster::stop_recorded();
            println!(
                "{:<10} {}",
                "redis-cluster",
                if stopped { "stopped" } else { "not running" }
            );
        }
        Some(_) => {}
    }
    Ok(())
}

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
    if selected.iter().any(|b| b.weppcloud_python)
        && std::env::var_os(services::WEPPCLOUD_PYTHON_VAR).is_none()
    {
        // A failure is reported by the tests that need it (they fail when
        // their backend is required), so every other test still runs.
        match services::weppcloud_python() {
            Ok(python) => env.push((
                services::WEPPCLOUD_PYTHON_VAR.to_owned(),
                python.display().to_string(),
            )),
            Err(message) => eprintln!("xtask: warning: {message}"),
        }
    }
    if selected.iter().any(|b| b.moto) {
        // As for the Python workers: the test that needs Azurite reports a
        // failed installation (it fails when its backend is required).
        if let Err(message) = services::azurite() {
            eprintln!("xtask: warning: {message}");
        }
    }
    let moto = if selected.iter().any(|b| b.moto) && std::env::var_os("RUNSTATE_S3_URL").is_none() {
        let moto = services::Moto::start()?;
        env.extend(moto.env());
        Some(moto)
    } else {
        None
    };
    // The cluster: the caller's, the one `services up` left running, or one
    // started for this run and stopped by PID when it ends.
    let cluster = if selected.iter().any(|b| b.name == "redis-cluster")
        && std::env::var_os(services::REDIS_CLUSTER_VAR).is_none()
    {
        let cluster = match services::RedisCluster::running() {
            Some(cluster) => cluster,
            None => services::RedisCluster::start(true)?,
        };
        env.extend(cluster.env());
        Some(cluster)
    } else {
        None
    };
    Ok((env, moto, cluster))
}

fn test(backend: Option<&str>) -> Result<(), String> {
    let selected: Vec<&Backend> = BACKENDS
        .iter()
        .filter(|b| backend.is_none_or(|name| b.name == name))
        .collect();
    let (env, _moto, _cluster) = prepare(&selected)?;
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
    // The tests wait on servers, lease expiries and child processes far
    // more than they compute, so each binary runs at least four at a time
    // (libtest's default is one per core): on two cores the split suites
    // took 84 s with two and 52 s with four, at the same CPU time. A
    // caller's RUST_TEST_THREADS is kept.
    if std::env::var_os("RUST_TEST_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        command.env("RUST_TEST_THREADS", cores.max(4).to_string());
    }
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

/// A cargo command of `ci`, which always builds a clean clone from
/// nothing: incremental compilation only adds its bookkeeping there (the
/// test build took 150 s without it and 173 s with it on two cores), and
/// every later build of the same clone (`cargo xtask test` below) inherits
/// the setting.
fn ci_cargo() -> Command {
    let mut command = cargo();
    command.env("CARGO_INCREMENTAL", "0");
    command
}

fn ci() -> Result<(), String> {
    let started = Instant::now();
    let mut fmt = ci_cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt, "cargo fmt --check")?;

    let mut clippy = ci_cargo();
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

    let mut doc = ci_cargo();
    doc.args(["doc", "--workspace", "--no-deps", "--all-features"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    run(doc, "cargo doc -D warnings")?;

    // Licenses, advisories, duplicate versions and sources (deny.toml),
    // with cargo-deny installed under target/tools on first use.
    // The advisory database is refreshed when the network allows; without
    // it the check runs offline against the copy already on disk. Offline,
    // cargo-deny's `cargo metadata` cannot download the crates of other
    // platforms, so they are fetched first (crates.io, not GitHub). A
    // machine that reaches no RustSec database and has none on disk checks
    // licenses, bans and sources, and says loudly that advisories were not
    // checked.
    let deny = cargo_deny()?;
    let mut fetch = std::process::Command::new(&deny);
    fetch.current_dir(root()).args(["fetch", "db"]);
    let offline = !fetch.status().is_ok_and(|status| status.success());
    let mut check = std::process::Command::new(&deny);
    check
        .current_dir(root())
        .args(["--all-features", "--config", "deny.toml"]);
    if offline {
        let mut crates = ci_cargo();
        crates.args(["fetch", "--locked"]);
        run(
            crates,
            "cargo fetch (every platform's crates, for an offline cargo deny)",
        )?;
        check.arg("--offline");
    }
    check.arg("check");
    if offline && !advisory_db_on_disk() {
        eprintln!(
            "\n*** ci: ADVISORIES NOT CHECKED: the RustSec advisory database could not be \
             fetched (is github.com reachable?) and there is no copy on disk; checking \
             licenses, bans and sources only ***\n"
        );
        check.args(["licenses", "bans", "sources"]);
    } else if offline {
        eprintln!(
            "ci: could not refresh the RustSec advisory database; checking against the copy \
             on disk"
        );
    }
    run(check, "cargo deny check")?;

    // Everything builds with the oldest Rust the manifests declare.
    msrv_check()?;

    // The README's test command, exactly as a newcomer types it.
    let mut test = ci_cargo();
    test.args(["xtask", "test"]);
    run(test, "cargo xtask test")?;

    // Every example builds and runs (they need no server).
    for example in ["worker", "migrate", "split"] {
        let mut run_example = ci_cargo();
        run_example.args([
            "run",
            "--quiet",
            "--package",
            "runstate",
            "--example",
            example,
        ]);
        run(run_example, &format!("example {example}"))?;
    }
    eprintln!(
        "\nci: everything passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo check` of every crate, target and feature with the toolchain of
/// the workspace's `rust-version` (installed by rustup, minimal profile,
/// when missing), in its own target directory so the main build is kept.
fn msrv_check() -> Result<(), String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml"))
        .map_err(|e| format!("could not read Cargo.toml: {e}"))?;
    let version = manifest
        .lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("rust-version")?.trim_start();
            Some(value.strip_prefix('=')?.trim().trim_matches('"').to_owned())
        })
        .ok_or("Cargo.toml declares no rust-version")?;
    // rustup names a release x.y.z; a declared x.y means x.y.0.
    let toolchain = if version.matches('.').count() == 1 {
        format!("{version}.0")
    } else {
        version.clone()
    };
    let installed = Command::new("rustup")
        .args(["run", &toolchain, "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !installed {
        let mut install = Command::new("rustup");
        install.args(["toolchain", "install", &toolchain, "--profile", "minimal"]);
        run(
            install,
            &format!("rustup toolchain install {toolchain} (the MSRV)"),
        )?;
    }
    let mut check = Command::new("rustup");
    check.env("CARGO_INCREMENTAL", "0");
    check.current_dir(root()).args([
        "run",
        &toolchain,
        "cargo",
        "check",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--locked",
        "--quiet",
    ]);
    check.arg("--target-dir").arg(target_dir().join("msrv"));
    // The toolchain's own cargo and rustc, not the ones this xtask runs under.
    check
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    run(
        check,
        &format!("cargo check with Rust {version} (the declared MSRV)"),
    )
}

/// The cargo-deny binary: on the PATH, or installed (pinned, `--locked`)
/// under target/tools on first use.
/// Whether a RustSec advisory database cargo-deny fetched earlier is on
/// disk (`$CARGO_HOME/advisory-dbs/advisory-db-*` with its `crates/`).
fn advisory_db_on_disk() -> bool {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    let Some(dbs) = cargo_home.map(|home| home.join("advisory-dbs")) else {
        return false;
    };
    std::fs::read_dir(dbs).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("advisory-db-")
                && entry.path().join("crates").is_dir()
        })
    })
}

fn cargo_deny() -> Result<PathBuf, String> {
    const VERSION: &str = "0.20.2";
    let tools = target_dir().join("tools");
    let installed = tools.join("bin").join("cargo-deny");
    if installed.exists() {
        return Ok(installed);
    }
    let on_path = std::process::Command::new("cargo-deny")
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(VERSION));
    if on_path {
        return Ok(PathBuf::from("cargo-deny"));
    }
    let mut install = cargo();
    install
        .args([
            "install",
            "--locked",
            "--quiet",
            "cargo-deny",
            "--version",
            VERSION,
            "--root",
        ])
        .arg(&tools);
    // cargo-deny's own release profile links with fat LTO in one codegen
    // unit, for the smallest, fastest binary; a check reads a few hundred
    // manifests and takes under a second either way, so a lighter build
    // (98 s instead of 152 s on CI's two cores) is the better trade.
    install
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1");
    run(
        install,
        &format!("cargo install cargo-deny {VERSION} (once, into target/tools)"),
    )?;
    Ok(installed)
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
    let (env, _moto, _cluster) = prepare(&selected)?;
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
