//! object_store errors mapped to runstate's kinds, in one place.

use runstate_core::{Error, ErrorKind};

use crate::BACKEND;

/// Maps an object_store error, keeping it as the source. Transient failures
/// were already retried by object_store's retry policy; what is left of
/// them is still worth retrying later.
pub(crate) fn map_error(error: object_store::Error) -> Error {
    use object_store::Error as E;
    let (kind, retryable, what) = match &error {
        E::NotFound { .. } => (ErrorKind::NotFound, false, "no such object"),
        E::AlreadyExists { .. } => (ErrorKind::AlreadyExists, false, "the object already exists"),
        E::Precondition { .. } | E::NotModified { .. } => (
            ErrorKind::Precondition,
            false,
            "the object's version differs",
        ),
        E::PermissionDenied { .. } => (ErrorKind::Denied, false, "the server denied access"),
        E::Unauthenticated { .. } => (
            ErrorKind::Config,
            false,
            "the server refused the credentials",
        ),
        E::NotSupported { .. } | E::NotImplemented { .. } => {
            (ErrorKind::Unsupported, false, "the server cannot do this")
        }
        E::InvalidPath { .. } => (ErrorKind::InvalidKey, false, "invalid object path"),
        E::UnknownConfigurationKey { .. } => (ErrorKind::Config, false, "invalid S3 settings"),
        _ => (ErrorKind::Backend, true, "the S3 request failed"),
    };
    Error::new(kind, what)
        .with_backend(BACKEND)
        .with_source(error)
        .set_retryable(retryable)
}

/// The error of a call that outlived its bound.
pub(crate) fn timed_out(bound: std::time::Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "no answer from S3 within {}",
            runstate_core::time::Short(bound)
        ),
    )
    .with_backend(BACKEND)
    .set_retryable(true)
}

/// Why this store refuses conditional operations.
pub(crate) fn unconditional_server() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "this S3 server ignores conditional writes (If-None-Match / If-Match), so runstate does not \
         offer create-only or update-if-version writes or leases on it; see S3Store::doctor",
    )
    .with_backend(BACKEND)
}
