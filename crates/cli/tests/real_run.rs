//! A real WEPPcloud run folder travels file → sqlite → postgres → mysql →
//! redis → s3 → file through `runstate migrate`, `runstate verify` agrees
//! at every hop, and every document ends byte-identical to the SHA-256 list
//! kept beside the fixture.

#[path = "../../runstate/tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use runstate::migrate::sha256_hex;
use support::{ALL, Backend, Place, Places};

const RUN: &str = "Mica_flume1";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/nodb")
}

/// `<sha256>  <file>` lines → file name → digest.
fn expected_sums() -> BTreeMap<String, String> {
    let list = std::fs::read_to_string(fixtures().join(format!("{RUN}.sha256")))
        .expect("the SHA-256 list beside the fixture");
    list.lines()
        .filter_map(|line| line.split_once("  "))
        .map(|(sum, file)| (file.trim().to_owned(), sum.trim().to_owned()))
        .collect()
}

/// The digest of every document file in a run folder.
fn sums_of(folder: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(folder)
        .expect("read the run folder")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name")
                .to_owned();
            (
                name,
                sha256_hex(&std::fs::read(&path).expect("read a document")),
            )
        })
        .collect()
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the fixture") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
        }
    }
}

fn runstate(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_runstate"))
        .args(args)
        .env_remove("RUNSTATE_URL")
        .output()
        .expect("run the binary");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn mica_flume1_round_trips_through_every_backend() {
    let expected = expected_sums();
    assert_eq!(expected.len(), 8, "eight controllers in the list");

    // The first and last hops are file stores opened in place, as
    // WEPPcloud lays them out (`<run>/<name>.nodb`).
    let mut places: Vec<Place> = Vec::new();
    for backend in ALL {
        let options = match backend {
            Backend::File | Backend::S3 => "ext=nodb",
            _ => "",
        };
        match backend.place_with("mica_flume1_round_trip", options) {
            Some(place) => places.push(place),
            None => continue,
        }
    }
    if let Some(last) = Backend::File.place_with("mica_flume1_round_trip", "ext=nodb") {
        places.push(last);
    }
    let first_root = places[0]
        .file_root()
        .expect("the first hop is a file store");
    copy_folder(&fixtures().join(RUN), &first_root.join(RUN));
    assert_eq!(
        sums_of(&first_root.join(RUN)),
        expected,
        "the copy matches the list"
    );

    let outcome = std::panic::catch_unwind(|| {
        for hop in places.windows(2) {
            let (from, to) = (&hop[0], &hop[1]);
            let what = format!("{} → {}", from.backend.name(), to.backend.name());
            let (code, out, err) = runstate(&[
                "migrate", "--from", &from.url, "--to", &to.url, "--run", RUN, "--json",
            ]);
            assert_eq!(code, 0, "{what}: {err}");
            let report: serde_json::Value = serde_json::from_str(&out).expect("a JSON report");
            assert_eq!(report["documents"], 8, "{what}: {report:#}");
            assert_eq!(report["verified"], 8, "{what}");
            let (code, out, err) =
                runstate(&["verify", "--from", &from.url, "--to", &to.url, "--run", RUN]);
            assert_eq!(code, 0, "{what}: verify disagrees:\n{out}{err}");
            assert!(
                out.contains("8 document(s)") && out.contains("identical"),
                "{what}: {out}"
            );
            eprintln!("{what}: 8 documents copied and verified");
        }
        let last = places.last().expect("a last hop");
        let last_root = last.file_root().expect("the last hop is a file store");
        // A WEPPcloud neighbour store (ext=nodb) marks the run folders it
        // creates with WEPPcloud's `nodb.version`, as WEPPcloud does; it is
        // not a document.
        let mut last_sums = sums_of(&last_root.join(RUN));
        last_sums.remove("nodb.version");
        assert_eq!(
            last_sums, expected,
            "every document ends byte-identical after the round trip"
        );
        // And the source folder was only read.
        assert_eq!(sums_of(&first_root.join(RUN)), expected);
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for place in &places {
        rt.block_on(place.cleanup());
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
