//! # runstate-conformance
//!
//! The one suite every runstate backend passes: generic async test cases
//! over [`Lock`](runstate_core::Lock) (and so [`Store`](runstate_core::Store)), each asserting
//! an exact outcome, and the [`suite!`] macro that expands them into one
//! `#[test]` per case in a backend's test crate, so a failure names its case.
//!
//! A backend provides a [`Harness`]: how to open a store in a fresh
//! namespace (a temporary folder, a key prefix, a table prefix…) and how to
//! clean it up. Every case runs in its own random namespace and removes it
//! afterwards, so runs never collide.
//!
//! ```ignore
//! // crates/backend-foo/tests/conformance.rs
//! struct Foo;
//! #[runstate_core::async_trait]
//! impl runstate_conformance::Harness for Foo { /* … */ }
//! runstate_conformance::suite!(Foo);
//! ```
//!
//! ## Servers and skipping
//!
//! A harness that needs a server names the environment variable holding its
//! URL ([`Harness::URL_VAR`]) and returns `Ok(None)` from
//! [`Harness::open`] when it is unset. The case then prints a loud
//! `SKIPPED` line, unless `RUNSTATE_REQUIRE_BACKENDS` names the backend (or
//! is `all`), in which case it fails: a skipped backend in CI is a failing
//! CI.
//!
//! ## Multi-process cases
//!
//! The macro also emits an ignored test, `__runstate_conformance_child`,
//! which the multi-process case runs as separate OS processes by
//! re-executing the test binary.

#![forbid(unsafe_code)]

pub mod cases;
mod child;
mod counting;
pub mod docs;
pub mod faults;
mod harness;
pub mod proxy;

pub use child::{CHILD_VAR, child_main};
pub use counting::{CountingLock, Counts, check_a_local_waiter_asks_once};
pub use harness::{Ctx, Harness, REQUIRE_VAR, is_required, run_case, server_url};

#[doc(hidden)]
pub mod __private {
    pub use std::boxed::Box;
}

/// Expands every conformance case into a `#[test]` for `$harness`, plus the
/// child entry point used by the multi-process case.
#[macro_export]
macro_rules! suite {
    ($harness:ty) => {
        $crate::__case_list!($crate::__case_tests, $harness);

        #[test]
        #[ignore = "entry point of the child processes of the multi-process case"]
        fn __runstate_conformance_child() {
            $crate::child_main::<$harness>();
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_tests {
    ($harness:ty, $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::run_case::<$harness>(
                    stringify!($name),
                    concat!(module_path!(), "::__runstate_conformance_child"),
                    |ctx| $crate::__private::Box::pin($crate::cases::$name(ctx)),
                );
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_names {
    (($($ignored:tt)*), $($name:ident),* $(,)?) => {
        &[$(stringify!($name)),*]
    };
}

/// Calls `$callback!($arg, case, case, …)` with every case: the one list of
/// cases.
#[doc(hidden)]
#[macro_export]
macro_rules! __case_list {
    ($($callback:ident)::+, $arg:tt) => {
        $($callback)::+! {$arg,
            // 1. round trips
            roundtrip_empty, roundtrip_one_byte, roundtrip_4kib, roundtrip_8mib,
            roundtrip_binary, roundtrip_utf8, get_absent_is_none,
            // 2. put modes
            overwrite_replaces, create_absent_succeeds, create_existing_already_exists,
            update_current_version_succeeds, update_stale_version_precondition,
            update_absent_precondition, versions_track_contents, batches_are_per_document,
            // 3. delete and list
            delete_absent_is_ok, delete_removes_document, delete_if_version_stale_refused,
            delete_if_version_current, list_docs_1000, list_runs_1000, list_pages_resume_after,
            list_docs_absent_run_empty, delete_run_removes_documents, head_and_listing_agree,
            // 4. identifiers
            invalid_run_ids_rejected, invalid_doc_names_rejected,
            invalid_key_names_byte_and_position, real_ids_round_trip,
            // 5. limits and corruption
            save_over_limit_too_large, load_over_limit_too_large, corrupt_document_is_corrupt,
            wrong_codec_is_corrupt,
            // 6. races
            race_create_exactly_one_wins, race_cas_increments_exact, race_locked_increments_exact,
            race_one_client_shared_by_tasks, race_updates_before_the_document_exists,
            // 7. leases
            lease_held_is_locked_with_holder, lease_reacquire_by_owner_returns_its_grant,
            lease_absurd_ttl_refused, save_and_release_releases_on_failure, lease_renew_extends,
            lease_release_by_non_owner_refused, lease_takeover_after_ttl_not_before,
            lease_fences_strictly_increase, lease_release_after_loss_reports_lost,
            lease_renew_after_expiry_is_lost, lease_inspect_shows_holder,
            lease_break_frees_and_fences_out, lease_run_and_doc_locks_are_distinct,
            lease_fenced_put_after_release_is_fenced, lease_list_locks_shows_held,
            lease_dead_holder_is_broken, acquire_times_out_while_held, acquire_waits_for_release,
            acquire_sees_a_break_made_elsewhere,
            // 8. stale holder
            stale_holder_is_fenced, stale_run_lock_holder_is_fenced,
            fenced_save_is_conditional_on_the_loaded_version,
            // 9. multi-process
            multi_process_locked_increments, stopped_holder_process_is_fenced,
            // 10. typed documents
            typed_update_noop_does_not_write, typed_guard_commit_saves,
            typed_guard_drop_releases_without_saving, typed_update_absent_not_found,
            typed_load_save_round_trip, typed_guard_commit_after_takeover_is_fenced,
            combined_operations_hold_and_release, typed_guard_outlives_its_ttl,
            typed_update_outlives_its_ttl, typed_guard_sees_a_lost_lease,
            typed_named_documents_and_refusing_updates,
            // 11. watch, status, milestones
            watch_sees_every_acknowledged_write, watch_overflow_gives_resync,
            status_replay_then_follow, status_slow_subscriber_gets_resync,
            milestones_field_by_field,
            // 12. split-store fencing, conditional reads
            foreign_fences_are_checked_by_the_store, conditional_get_validates_a_version,
            writes_behind_the_back_are_never_lost
        }
    };
}

/// The names of every case, in suite order.
pub const CASES: &[&str] = __case_list!(__case_names, ());
