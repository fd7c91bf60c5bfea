//! File systems that ignore the case of names.
//!
//! On a casefolded ext4 folder, a CIFS/SMB share or vfat, `Ron` and `ron`
//! are one entry: the run `ron` would read and write the folder of the run
//! `Ron`, and the documents `Ron` and `ron` would overwrite each other
//! while runstate counts versions and leases for each. Such a store refuses
//! a name that differs only by case from an existing one (see
//! [`Engine`](crate::engine::Engine)); this module finds out whether the
//! root is such a folder, and holds the checks' shared pieces.
//!
//! **Detection** (when the configuration says [`CaseSensitivity::Detect`])
//! looks first at what is already in the root, without writing: an entry
//! whose name has a letter is looked up under that name with the case of
//! its letters swapped. If that name is found but is not listed by the
//! folder, the file system resolved it to the entry: it ignores case. If
//! it is not found, or both spellings are listed, the root tells them
//! apart. This needs no inode numbers (CIFS without `serverino` invents
//! them per name) and no write: a probe file would change the root's times
//! on every open, which would make every other store re-read a root of
//! 100,000 runs and keep its own listing from being remembered. Only a
//! root without such an entry (a new store) gets a probe: a hidden file
//! named like a temporary file, created, looked up case-swapped, and
//! removed (a probe left by a killed process is swept like any temporary
//! file of a dead writer). A root that has no entry with a letter and
//! cannot be written is taken to be case-sensitive, with a debug message.

use std::fmt;

use runstate_core::{Error, ErrorKind};

use crate::BACKEND;
use crate::config::CaseSensitivity;
use crate::folder::{Entry, Folder, Kind};
use crate::layout::temp_name;

/// What a store knows about the case of names in its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CaseRule {
    /// Names that differ only by case are refused.
    pub(crate) insensitive: bool,
    /// How that was decided, for messages.
    pub(crate) how: Decided,
}

/// How a [`CaseRule`] was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decided {
    /// Set in the configuration.
    Configured,
    /// Found out by looking up an existing entry or a probe.
    Detected,
    /// Could not be found out: taken to be case-sensitive.
    Assumed,
}

impl fmt::Display for Decided {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decided::Configured => "as configured",
            Decided::Detected => "as detected when the store was opened",
            Decided::Assumed => "as assumed",
        })
    }
}

impl CaseRule {
    /// The rule for a root, deciding by looking at it when configured to.
    pub(crate) fn decide(setting: CaseSensitivity, root: &Folder) -> CaseRule {
        match setting {
            CaseSensitivity::Insensitive => CaseRule {
                insensitive: true,
                how: Decided::Configured,
            },
            CaseSensitivity::Sensitive => CaseRule {
                insensitive: false,
                how: Decided::Configured,
            },
            CaseSensitivity::Detect => match detect(root) {
                Ok(insensitive) => {
                    if insensitive {
                        tracing::info!(
                            root = %root.path().display(),
                            "the store root ignores the case of names: run ids and document \
                             names that differ only by case from existing ones are refused"
                        );
                    } else {
                        tracing::debug!(root = %root.path().display(), "the store root is case-sensitive");
                    }
                    CaseRule {
                        insensitive,
                        how: Decided::Detected,
                    }
                }
                Err(why) => {
                    tracing::debug!(
                        root = %root.path().display(),
                        why,
                        "could not tell whether the store root ignores the case of names; \
                         taking it to be case-sensitive (set case_insensitive=true if it is not)"
                    );
                    CaseRule {
                        insensitive: false,
                        how: Decided::Assumed,
                    }
                }
            },
        }
    }
}

/// `name` with the case of its ASCII letters swapped.
pub(crate) fn swap_case(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_lowercase() {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// Whether the root ignores case: `Ok` when that could be told, `Err` with
/// the reason when not.
fn detect(root: &Folder) -> Result<bool, String> {
    let entries = root
        .entries()
        .map_err(|e| format!("listing the root failed: {e}"))?;
    // Any entry would do; folders (run folders) first, being what the
    // root is for. A candidate removed meanwhile gives way to the next.
    let mut candidates: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.name.bytes().any(|b| b.is_ascii_alphabetic()))
        .collect();
    candidates.sort_by_key(|e| e.kind != Kind::Folder);
    for entry in candidates.into_iter().take(8) {
        if let Some(verdict) = look_up_swapped(root, &entry.name, &entries)? {
            return Ok(verdict);
        }
    }
    probe(root)
}

/// Looks `name`, an entry of the root listed in `listed`, up with its case
/// swapped: `Some(true)` when that finds something not listed (the file
/// system ignores case), `Some(false)` when it finds nothing or both
/// spellings are listed, `None` when `name` is gone meanwhile.
fn look_up_swapped(root: &Folder, name: &str, listed: &[Entry]) -> Result<Option<bool>, String> {
    let swapped = swap_case(name);
    let found = root
        .kind_of(&swapped)
        .map_err(|e| format!("looking up {swapped:?} failed: {e}"))?;
    if found.is_some() {
        return Ok(Some(!listed.iter().any(|e| e.name == swapped)));
    }
    match root.kind_of(name) {
        Ok(Some(_)) => Ok(Some(false)),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("looking up {name:?} failed: {e}")),
    }
}

/// Creates a hidden probe file in the root, looks it up with its case
/// swapped, and removes it. Named like a temporary file of this process, so
/// that one left by a killed process is swept.
fn probe(root: &Folder) -> Result<bool, String> {
    let name = temp_name("runstate-case-probe", false);
    root.create_temp(&name, 0o644).map_err(|e| {
        format!(
            "the root has no entry whose name has a letter, and a probe file could not be \
             created in it: {e}"
        )
    })?;
    let swapped = swap_case(&name);
    let found = root.kind_of(&swapped);
    if let Err(error) = root.unlink(&name) {
        tracing::warn!(
            path = %root.child(&name).display(),
            %error,
            "could not remove the case probe file"
        );
    }
    // Nothing else has such a name: finding it means finding the probe.
    found
        .map(|kind| kind.is_some())
        .map_err(|e| format!("looking up the case-swapped probe failed: {e}"))
}

/// The name listed in `entries` that equals `name` but for the case of its
/// letters, when `name` itself is not listed.
pub(crate) fn twin<'a>(
    entries: impl IntoIterator<Item = &'a str> + Clone,
    name: &str,
) -> Option<&'a str> {
    if entries.clone().into_iter().any(|e| e == name) {
        return None;
    }
    entries.into_iter().find(|e| e.eq_ignore_ascii_case(name))
}

/// The refusal of `asked` (a `what`: "run id", "document"), which differs
/// only by case from `existing` (an `existing_what`) in `folder`.
pub(crate) fn conflict(
    rule: &CaseRule,
    what: &str,
    asked: &str,
    existing_what: &str,
    existing: &str,
    folder: &Folder,
) -> Error {
    Error::new(
        ErrorKind::InvalidKey,
        format!(
            "{what} `{asked}` differs only by case from the existing {existing_what} \
             `{existing}` in {}; this store's file system ignores the case of names ({}), \
             so both would name the same file: refused",
            folder.path().display(),
            rule.how
        ),
    )
    .with_backend(BACKEND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swapping_case_touches_only_ascii_letters() {
        assert_eq!(swap_case("Ron_2.nodb-x"), "rON_2.NODB-X");
        assert_eq!(swap_case(&swap_case("Mica_flume1")), "Mica_flume1");
    }

    #[test]
    fn a_twin_is_another_spelling_of_a_missing_name() {
        let listed = ["Ron.json", "wepp.json", "ron.json.tmp"];
        assert_eq!(twin(listed, "ron.json"), Some("Ron.json"));
        assert_eq!(twin(listed, "RON.JSON"), Some("Ron.json"));
        assert_eq!(twin(listed, "Ron.json"), None, "the exact name is itself");
        assert_eq!(twin(listed, "soils.json"), None, "a new name");
        // Both spellings listed (a case-sensitive file system forced to
        // refuse them): each keeps working under its own name.
        assert_eq!(twin(["Ron", "ron"], "ron"), None);
        assert_eq!(twin(["Ron", "ron"], "RON"), Some("Ron"));
    }

    fn temp_root(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "runstate-case-{tag}-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn the_configured_rule_is_taken_without_looking() {
        let dir = temp_root("configured");
        let root = Folder::open_path(&dir).expect("open");
        let forced = CaseRule::decide(CaseSensitivity::Insensitive, &root);
        assert!(forced.insensitive);
        assert_eq!(forced.how, Decided::Configured);
        let off = CaseRule::decide(CaseSensitivity::Sensitive, &root);
        assert!(!off.insensitive);
        assert!(
            std::fs::read_dir(&dir).expect("list").next().is_none(),
            "no probe was made"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// The temporary folder is on a case-sensitive file system here
    /// (tmpfs or ext4 without casefolding): both ways of detecting say so.
    #[test]
    fn a_case_sensitive_root_is_detected_as_such() {
        let dir = temp_root("sensitive");
        let root = Folder::open_path(&dir).expect("open");
        // Empty: a probe, removed afterwards.
        let rule = CaseRule::decide(CaseSensitivity::Detect, &root);
        assert_eq!((rule.insensitive, rule.how), (false, Decided::Detected));
        assert!(std::fs::read_dir(&dir).expect("list").next().is_none());
        // With an entry: looked up case-swapped, nothing written.
        std::fs::create_dir(dir.join("Mica_flume1")).expect("run folder");
        let rule = CaseRule::decide(CaseSensitivity::Detect, &root);
        assert_eq!((rule.insensitive, rule.how), (false, Decided::Detected));
        // Both spellings listed: case-sensitive.
        std::fs::create_dir(dir.join("mICA_FLUME1")).expect("twin folder");
        let rule = CaseRule::decide(CaseSensitivity::Detect, &root);
        assert!(!rule.insensitive);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "no probe left: {names:?}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// An empty root that cannot be written cannot be told: it is taken to
    /// be case-sensitive. (Root may write anywhere: then the probe works.)
    #[test]
    fn an_unwritable_empty_root_is_assumed_case_sensitive() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_root("unwritable");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        let writable = std::fs::File::create(dir.join("x")).is_ok();
        if writable {
            std::fs::remove_file(dir.join("x")).expect("remove");
        }
        let root = Folder::open_path(&dir).expect("open");
        let rule = CaseRule::decide(CaseSensitivity::Detect, &root);
        assert!(!rule.insensitive);
        if writable {
            eprintln!("(running as root: the probe could be created, so it was detected)");
            assert_eq!(rule.how, Decided::Detected);
        } else {
            assert_eq!(rule.how, Decided::Assumed);
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
