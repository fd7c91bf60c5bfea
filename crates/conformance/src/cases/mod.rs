//! The cases. Each takes a [`Ctx`](crate::Ctx) for a fresh namespace and
//! panics on any deviation from the exact expected outcome.

mod events;
mod fencing;
mod ids;
mod leases;
mod limits;
mod listing;
mod modes;
mod multiprocess;
mod races;
mod roundtrip;
mod stale;
mod typed;

pub use events::*;
pub use fencing::*;
pub use ids::*;
pub use leases::*;
pub use limits::*;
pub use listing::*;
pub use modes::*;
pub use multiprocess::*;
pub use races::*;
pub use roundtrip::*;
pub use stale::*;
pub use typed::*;

use runstate_core::{Error, ErrorKind};

/// Asserts that `result` failed with `kind`, and returns the error.
#[track_caller]
pub(crate) fn expect_kind<T: std::fmt::Debug>(result: Result<T, Error>, kind: ErrorKind) -> Error {
    match result {
        Ok(value) => panic!("expected a {kind} error, got Ok({value:?})"),
        Err(error) => {
            assert_eq!(
                error.kind(),
                kind,
                "wrong error: {}",
                runstate_core::display_chain(&error)
            );
            error
        }
    }
}

/// Deterministic pseudo-random bytes.
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes);
    bytes
}
