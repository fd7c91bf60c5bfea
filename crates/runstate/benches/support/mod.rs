//! What both benchmarks share: places on every backend (the tests' own
//! helper) and the raw baselines.

#![allow(dead_code)] // each benchmark uses its own part

pub mod cpu;
#[path = "../../tests/support/mod.rs"]
pub mod places;
pub mod raw;

use std::path::{Path, PathBuf};

/// The command line of a benchmark: `--backend NAME` (repeatable),
/// `--quick`, `--out PATH`.
#[derive(Debug, Clone)]
pub struct Args {
    pub backends: Vec<String>,
    pub quick: bool,
    pub out: PathBuf,
}

impl Args {
    /// Parses the arguments; the report goes to `target/bench/<report>`
    /// unless `--out` says otherwise.
    pub fn parse(report: &str) -> Args {
        let mut backends = Vec::new();
        let mut quick = false;
        let mut out = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--backend" => backends.push(args.next().expect("--backend NAME")),
                "--quick" => quick = true,
                "--out" => out = Some(PathBuf::from(args.next().expect("--out PATH"))),
                // cargo bench passes --bench; ignore what is not ours.
                _ => {}
            }
        }
        for b in &backends {
            // `redis-cluster`: the Redis backend on the cluster of
            // RUNSTATE_REDIS_CLUSTER_URL (workloads only). `memory` has
            // no server and no raw baseline to compare with: nothing to
            // measure, but `cargo xtask bench` names every backend.
            assert!(
                places::ALL.iter().any(|k| k.name() == b) || b == "redis-cluster" || b == "memory",
                "unknown backend `{b}`"
            );
        }
        let out = out.map_or_else(
            || {
                std::env::var_os("CARGO_TARGET_DIR")
                    .map_or_else(
                        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
                        PathBuf::from,
                    )
                    .join("bench")
                    .join(report)
            },
            // One --out names the workloads report; the migration report
            // goes beside it.
            |path: PathBuf| path.with_file_name(report),
        );
        Args {
            backends,
            quick,
            out,
        }
    }

    /// Writes the JSON report to `--out` and says where.
    pub fn write_report(&self, report: &serde_json::Value) {
        if let Some(dir) = self.out.parent() {
            std::fs::create_dir_all(dir).expect("report folder");
        }
        std::fs::write(&self.out, serde_json::to_vec_pretty(report).expect("json"))
            .expect("write report");
        println!("\nreport: {}", self.out.display());
    }

    /// Whether `backend` was asked for (all are when none is named).
    pub fn wants(&self, backend: &str) -> bool {
        self.backends.is_empty() || self.backends.iter().any(|b| b == backend)
    }
}
