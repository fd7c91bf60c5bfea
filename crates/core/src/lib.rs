//! # runstate-core
//!
//! The contract every runstate backend keeps, with nothing backend-specific
//! in it:
//!
//! - [`RunId`] and [`DocName`]: identifiers validated when built;
//! - [`Store`]: documents at the byte level, with conditional writes
//!   ([`PutMode::Create`], [`PutMode::Update`]) and opaque [`Version`]s;
//! - [`Lock`]: leases on runs and documents with [`Fence`] tokens, and the
//!   combined [`Lock::acquire_and_load`] / [`Lock::save_and_release`] a
//!   locked update is made of;
//! - [`LockExt::acquire`] and [`WaitPolicy`]: waiting for busy locks, once
//!   for every backend;
//! - [`Error`] with an [`ErrorKind`], context and the source kept;
//! - typed documents: [`Document`], [`Codec`], [`Client`], [`Run`],
//!   [`Guard`].
//!
//! ## The promises
//!
//! 1. **All or nothing**: a reader sees the old or the new document.
//! 2. **Conditional writes** on every backend, atomic with their check.
//! 3. **No lost update**: a save under a lease is checked by the backend
//!    (fence and version), so a holder whose lease ran out is refused with
//!    [`ErrorKind::Fenced`].
//! 4. **Honest leases**: expiry judged by the backend's clock, only the
//!    owner renews or releases, the holder is visible, and a holder known
//!    dead on this host is broken at once.
//! 5. **Bad input changes nothing**: invalid ids cannot even be built.
//! 6. **Secrets stay secret** in every backend's configuration.
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use runstate_core::{Client, Document, Lock, RunId};
//!
//! #[derive(Serialize, Deserialize, Default)]
//! struct Watershed {
//!     subcatchments: u32,
//! }
//!
//! impl Document for Watershed {
//!     const NAME: &'static str = "watershed";
//! }
//!
//! async fn delineate(backend: Arc<dyn Lock>) -> runstate_core::Result<()> {
//!     let run = Client::new(backend).run(RunId::new("Test_Watershed_15")?);
//!     run.update_or_default(|w: &mut Watershed| w.subcatchments = 42).await?;
//!     let w: Watershed = run.load().await?;
//!     assert_eq!(w.subcatchments, 42);
//!     Ok(())
//! }
//! ```

#![forbid(unsafe_code)]

pub mod batch;
pub mod cache;
mod codec;
mod error;
pub mod events;
mod finite;
mod id;
mod keeper;
mod lease;
mod lock;
pub mod memory;
pub mod options;
pub mod process;
pub mod secrets;
mod signals;
mod store;
pub mod time;
mod typed;
mod version;
mod wait;

pub use cache::{Cache, Cached};
pub use codec::Codec;
pub use error::{BoxError, Error, ErrorKind, Operation, Result, display_chain};
pub use events::{
    Feed, FeedSender, Milestones, Replay, StatusEvent, StatusMessage, Subscription, WatchEvent,
    Watcher,
};
pub use id::{DocName, IdKind, IdProblem, InvalidId, MAX_ID_LEN, RunId};
pub use keeper::LeaseKeeper;
pub use lease::{
    Fence, Lease, LockInfo, LockKey, MAX_HOST_LEN, MAX_OWNER_ID_LEN, MAX_TTL, Owner, check_ttl,
};
pub use lock::Lock;
pub use process::ProcessStamp;
pub use signals::{ReleaseSignals, Releasing};
pub use store::{
    Capabilities, DocMeta, DocStat, Fencing, Fetched, GetOptions, LIST_PAGE, ListPage, PutMode,
    PutOptions, PutRequest, Store, StoreExt, StoredDoc, WatchMode,
};
pub use typed::{
    Client, ClientConfig, DEFAULT_LIMIT, DEFAULT_TTL, Data, Doc, Document, Guard, LockScope, Run,
};
pub use version::Version;
pub use wait::{Backoff, LockExt, WaitPolicy, retry_while_locked};

/// Re-exported so backends name the same `async_trait` and `Bytes`.
pub use async_trait::async_trait;
pub use bytes::Bytes;
