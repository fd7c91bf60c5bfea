//! `runstate demo`, driven through the real binary.

use std::process::Command;

#[test]
fn demo_final_count_equals_acknowledged_updates() {
    let root = std::env::temp_dir().join(format!(
        "runstate-demo-test-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let output = Command::new(env!("CARGO_BIN_EXE_runstate"))
        .args([
            "demo",
            "--workers",
            "3",
            "--updates",
            "20",
            "--run",
            "demo-test",
            "--root",
        ])
        .arg(&root)
        .output()
        .expect("run the binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("acknowledged updates: 60"), "{stdout}");
    assert!(stdout.contains("final count:          60"), "{stdout}");
    assert!(
        stdout.contains("consistent: every acknowledged update"),
        "{stdout}"
    );
    for doc in ["climate", "watershed", "wepp"] {
        assert!(
            root.join("demo-test").join(format!("{doc}.json")).is_file(),
            "{doc}.json written"
        );
    }
    // Running it again starts the run afresh.
    let again = Command::new(env!("CARGO_BIN_EXE_runstate"))
        .args([
            "demo",
            "--workers",
            "2",
            "--updates",
            "5",
            "--run",
            "demo-test",
            "--root",
        ])
        .arg(&root)
        .output()
        .expect("run the binary");
    assert!(String::from_utf8_lossy(&again.stdout).contains("final count:          10"));
    std::fs::remove_dir_all(&root).expect("cleanup");
}

#[test]
fn bad_run_id_is_one_clear_line_with_a_hint() {
    let output = Command::new(env!("CARGO_BIN_EXE_runstate"))
        .args(["demo", "--run", "../escape", "--root"])
        .arg(std::env::temp_dir().join("runstate-demo-never-created"))
        .output()
        .expect("run the binary");
    assert_eq!(output.status.code(), Some(2), "usage errors exit 2");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("runstate: error: invalid key: invalid run id \"../escape\""),
        "{stderr}"
    );
    assert!(stderr.contains("hint: run ids are"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !std::env::temp_dir()
            .join("runstate-demo-never-created")
            .exists(),
        "nothing created"
    );
}

/// `demo --json` prints the report as one JSON object: every worker's
/// acknowledged updates and fences, every document's final state.
#[test]
fn demo_speaks_json() {
    let root = std::env::temp_dir().join(format!(
        "runstate-demo-json-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let output = Command::new(env!("CARGO_BIN_EXE_runstate"))
        .args([
            "demo",
            "--workers",
            "2",
            "--updates",
            "10",
            "--run",
            "demo-json",
            "--json",
            "--root",
        ])
        .arg(&root)
        .env_remove("RUNSTATE_URL")
        .output()
        .expect("run the binary");
    let _ = std::fs::remove_dir_all(&root);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(report["consistent"], true);
    assert_eq!(report["acknowledged"], 20);
    assert_eq!(report["final_count"], 20);
    assert_eq!(report["workers"].as_array().map(Vec::len), Some(2));
    assert_eq!(report["workers"][0]["total"], 10);
    let documents = report["documents"].as_array().expect("documents");
    let names: Vec<&str> = documents
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["climate", "watershed", "wepp"]);
    let updates: u64 = documents
        .iter()
        .map(|d| d["updates"].as_u64().expect("updates"))
        .sum();
    assert_eq!(updates, 20);
}
