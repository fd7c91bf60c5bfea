//! The store's requests: each under the store's bound, the paths of
//! documents, milestones and leases, document reads and conditional
//! writes (a write reported failed is recognised as applied by its
//! nonce), deletions, and the listings that serve later pages.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions as OsGetOptions, ObjectStore, ObjectStoreExt,
    PutMode as OsPutMode, PutOptions as OsPutOptions, PutPayload, UpdateVersion,
};
use runstate_core::{
    Bytes, DocMeta, DocName, Error, ErrorKind, GetOptions, LockKey, PutMode, Result, RunId,
    StoredDoc, Version,
};

use crate::errors::{map_error, timed_out, unconditional_server};
use crate::{BACKEND, Inner, LISTING_FRESH, leases};

/// Every run, sorted, as listed at `taken`.
pub(crate) struct RunListing {
    pub(crate) runs: Arc<[RunId]>,
    pub(crate) taken: Instant,
}

/// Every document of one run, sorted by name, as listed at `taken`.
pub(crate) struct DocListing {
    pub(crate) run: RunId,
    pub(crate) docs: Arc<[DocMeta]>,
    pub(crate) taken: Instant,
}

/// A document's metadata as read back: its version and the nonce of the
/// write that made it (absent when it was not written by runstate).
pub(crate) struct DocHead {
    pub(crate) version: Version,
    pub(crate) nonce: Option<String>,
}

/// How a document write failed.
pub(crate) enum WriteError {
    /// The server refused the write's condition, and the document read
    /// back is not this write's: `now` is what is there (`None`: nothing).
    Refused { error: Error, now: Option<DocHead> },
    /// Any other failure, including an ambiguous one.
    Failed(Error),
}

/// A refused write's error in the contract's terms for `mode`: a refused
/// `Update` is `Precondition` whatever the server said (object_store
/// reports a `409` on `If-Match` as `AlreadyExists` once its retries are
/// spent, and an absent object as `NotFound`), a refused `Create` is
/// `AlreadyExists`.
pub(crate) fn refusal(mode: &PutMode, error: Error) -> Error {
    let (kind, what) = match (mode, error.kind()) {
        (PutMode::Update(_), ErrorKind::NotFound) => {
            (ErrorKind::Precondition, "the document does not exist")
        }
        (PutMode::Update(_), ErrorKind::AlreadyExists) => {
            (ErrorKind::Precondition, "the document's version differs")
        }
        (PutMode::Create, ErrorKind::Precondition) => {
            (ErrorKind::AlreadyExists, "the document exists")
        }
        _ => return error,
    };
    Error::new(kind, what)
        .with_backend(BACKEND)
        .with_source(error)
}

/// A document's version: its ETag, always quoted. Azure quotes ETags in
/// the headers of reads and writes but not in listings; the version of one
/// object must read the same wherever it was seen.
pub(crate) fn version_of(e_tag: Option<String>) -> Result<Version> {
    let e_tag = e_tag.ok_or_else(|| {
        Error::new(ErrorKind::Backend, "the server returned no ETag").with_backend(BACKEND)
    })?;
    if e_tag.starts_with('"') || e_tag.starts_with("W/") {
        Ok(Version::new(e_tag))
    } else {
        Ok(Version::new(format!("\"{e_tag}\"")))
    }
}

impl Inner {
    pub(crate) fn if_match(etag: &str) -> OsPutMode {
        OsPutMode::Update(UpdateVersion {
            e_tag: Some(etag.to_owned()),
            version: None,
        })
    }

    /// The condition of an `Update(version)` of a document: `If-Match`
    /// with the version, which must be one this store can have returned
    /// (a plain ETag). Anything else (empty, blank, `*`, a weak tag, a
    /// list, a header injection) is refused with `Precondition` before
    /// anything is sent: no document of this store is at that version, and
    /// servers ignore or widen such headers (moto ignores an empty
    /// `If-Match`, `*` matches any version), which would turn the update
    /// into an unconditional write.
    pub(crate) fn if_version(version: &Version) -> Result<OsPutMode> {
        if is_plain_etag(version.as_str()) {
            Ok(Self::if_match(version.as_str()))
        } else {
            Err(not_a_version())
        }
    }

    pub(crate) async fn bounded<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, object_store::Error>>,
    ) -> Result<T> {
        self.bounded_raw(request).await?.map_err(map_error)
    }

    /// [`bounded`](Self::bounded), with object_store's error unmapped, for
    /// callers that tell its kinds apart (a `304` is not a failure).
    pub(crate) async fn bounded_raw<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, object_store::Error>>,
    ) -> Result<std::result::Result<T, object_store::Error>> {
        tokio::time::timeout(self.bound, request)
            .await
            .map_err(|_| timed_out(self.bound))
    }

    /// [`bounded`](Self::bounded), with an absent object as `None`.
    pub(crate) async fn found<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, object_store::Error>>,
    ) -> Result<Option<T>> {
        match self.bounded(request).await {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn doc_path(&self, run: &RunId, doc: &DocName) -> Path {
        Path::from(format!("{}{run}/{doc}.{}", self.root, self.config.ext))
    }

    pub(crate) fn run_path(&self, run: &RunId) -> Path {
        Path::from(format!("{}{run}", self.root))
    }

    pub(crate) fn milestones_path(&self, run: &RunId) -> Path {
        Path::from(format!("{}.runstate/milestones/{run}.json", self.root))
    }

    pub(crate) fn locks_path(&self, run: Option<&RunId>) -> Path {
        match run {
            Some(run) => Path::from(format!("{}.runstate/locks/{run}", self.root)),
            None => Path::from(format!("{}.runstate/locks", self.root)),
        }
    }

    pub(crate) fn lease_path(&self, key: &LockKey) -> Path {
        let file = match key.doc() {
            None => "run.lease".to_owned(),
            Some(doc) => format!("doc.{doc}.lease"),
        };
        self.locks_path(Some(key.run())).join(file)
    }

    pub(crate) fn lock_of(&self, path: &Path) -> Option<LockKey> {
        let mut parts: Vec<String> = path.parts().map(|p| p.as_ref().to_owned()).collect();
        let file = parts.pop()?;
        let run = RunId::new(parts.pop()?).ok()?;
        if file == "run.lease" {
            return Some(LockKey::Run(run));
        }
        let doc = DocName::new(file.strip_prefix("doc.")?.strip_suffix(".lease")?).ok()?;
        Some(LockKey::Doc(run, doc))
    }

    /// The document an object is, when its file name is a valid document
    /// name with this store's extension.
    pub(crate) fn doc_of(&self, path: &Path) -> Option<DocName> {
        let file = path.filename()?;
        DocName::new(file.strip_suffix(&format!(".{}", self.config.ext))?).ok()
    }

    pub(crate) fn require_conditional(&self) -> Result<()> {
        if self.capabilities.conditional_put {
            Ok(())
        } else {
            Err(unconditional_server())
        }
    }

    pub(crate) async fn put_object(
        &self,
        path: &Path,
        bytes: Bytes,
        mode: OsPutMode,
    ) -> Result<Option<String>> {
        let result = self
            .bounded(
                self.store
                    .put_opts(path, PutPayload::from(bytes), OsPutOptions::from(mode)),
            )
            .await?;
        Ok(result.e_tag)
    }

    /// Reads the document at `path`: its bytes and ETag, `None` when
    /// absent, `TooLarge` (before the body is read) over `options.limit`.
    pub(crate) async fn get_doc(
        &self,
        path: &Path,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let Some(got) = self.found(self.store.get(path)).await? else {
            return Ok(None);
        };
        check_limit(got.meta.size, options.limit)?;
        let version = version_of(got.meta.e_tag.clone())?;
        let bytes = self.bounded(got.bytes()).await?;
        Ok(Some(StoredDoc::new(bytes, version)))
    }

    /// A permit for one request of a batch (see [`BATCH_REQUESTS`](crate::BATCH_REQUESTS)).
    pub(crate) async fn batch_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.batch_requests.acquire().await.map_err(|e| {
            Error::new(ErrorKind::Backend, "the store's batch permits are closed")
                .with_backend(BACKEND)
                .with_source(e)
        })
    }

    /// The version and write nonce of a document, without its bytes.
    pub(crate) async fn doc_head(&self, path: &Path) -> Result<Option<DocHead>> {
        let options = OsGetOptions::new().with_head(true);
        let Some(got) = self.found(self.store.get_opts(path, options)).await? else {
            return Ok(None);
        };
        let nonce = got
            .attributes
            .get(&Attribute::Metadata(Cow::Borrowed(self.nonce_key)))
            .map(|value| value.as_ref().to_owned());
        Ok(Some(DocHead {
            version: version_of(got.meta.e_tag)?,
            nonce,
        }))
    }

    /// Writes a document, recognising its own write when the reply says
    /// otherwise.
    ///
    /// Every write carries a fresh random nonce in the object's user
    /// metadata. When the server refuses the write's condition
    /// (`Precondition`, `AlreadyExists`) or the outcome is unknown (a
    /// transport error, a timeout), the document's metadata is read back:
    /// if it carries this write's nonce, the write was applied (an earlier
    /// try whose reply was lost, a 5xx that object_store retried into a
    /// 412) and its version is returned. The same bytes written by someone
    /// else carry another nonce and are not taken for this write.
    pub(crate) async fn write_doc(
        &self,
        path: &Path,
        bytes: Bytes,
        mode: OsPutMode,
    ) -> std::result::Result<Version, WriteError> {
        // Refused before anything is sent: S3 takes no larger single PUT,
        // and its refusal (`EntityTooLarge`) would read as a failure whose
        // outcome is unknown.
        check_limit(bytes.len() as u64, Some(crate::MAX_OBJECT)).map_err(WriteError::Failed)?;
        let nonce = leases::write_nonce();
        let mut attributes = Attributes::new();
        attributes.insert(
            Attribute::Metadata(Cow::Borrowed(self.nonce_key)),
            AttributeValue::from(nonce.clone()),
        );
        let mut options = OsPutOptions::from(mode);
        options.attributes = attributes;
        let error = match self
            .bounded(self.store.put_opts(path, PutPayload::from(bytes), options))
            .await
        {
            Ok(result) => return version_of(result.e_tag).map_err(WriteError::Failed),
            Err(error) => error,
        };
        let refused = matches!(
            error.kind(),
            ErrorKind::Precondition | ErrorKind::AlreadyExists | ErrorKind::NotFound
        );
        let ambiguous = matches!(error.kind(), ErrorKind::Backend | ErrorKind::Timeout);
        if !refused && !ambiguous {
            return Err(WriteError::Failed(error));
        }
        match self.doc_head(path).await {
            Ok(Some(head)) if head.nonce.as_deref() == Some(nonce.as_str()) => {
                tracing::debug!(%path, %error, "a document write reported as failed was applied");
                Ok(head.version)
            }
            Ok(now) if refused => Err(WriteError::Refused { error, now }),
            Ok(_) => Err(WriteError::Failed(error)),
            // A refusal may follow an applied try of the same write: without
            // the read back, the outcome is unknown, not refused.
            Err(reread) if refused => Err(WriteError::Failed(
                Error::new(
                    ErrorKind::Backend,
                    "a write was refused, and whether an earlier try of it was applied could not \
                     be read back",
                )
                .with_backend(BACKEND)
                .with_source(reread)
                .set_retryable(true),
            )),
            Err(reread) => {
                tracing::debug!(%path, %reread, "reading back a failed write");
                Err(WriteError::Failed(error))
            }
        }
    }

    pub(crate) async fn delete_under(&self, prefix: Option<&Path>) -> Result<u64> {
        let paths: Vec<Path> = self
            .bounded(
                self.store
                    .list(prefix)
                    .map_ok(|meta| meta.location)
                    .try_collect(),
            )
            .await?;
        self.delete_paths(paths).await
    }

    pub(crate) async fn delete_paths(&self, paths: Vec<Path>) -> Result<u64> {
        let count = paths.len() as u64;
        if count == 0 {
            return Ok(0);
        }
        let stream = futures_util::stream::iter(paths.into_iter().map(Ok)).boxed();
        // Deleting an absent object succeeds on S3 but is `404` on Azure:
        // gone either way.
        let deleting = async {
            Ok::<_, object_store::Error>(self.store.delete_stream(stream).collect::<Vec<_>>().await)
        };
        let outcomes = self.bounded(deleting).await?;
        for outcome in outcomes {
            match outcome {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(map_error(e)),
            }
        }
        Ok(count)
    }

    /// Every run under the prefix, sorted: the last listing while it is
    /// fresh and `reuse` is set, else a new one.
    pub(crate) async fn run_listing(&self, reuse: bool) -> Result<Arc<[RunId]>> {
        if reuse
            && let Some(listing) = self
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|l| l.taken.elapsed() < LISTING_FRESH)
        {
            return Ok(Arc::clone(&listing.runs));
        }
        let taken = Instant::now();
        let root = (!self.root.is_empty()).then(|| Path::from(self.config.prefix.as_str()));
        let listing = self
            .bounded(self.store.list_with_delimiter(root.as_ref()))
            .await?;
        let mut runs: Vec<RunId> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(|n| RunId::new(n).ok()))
            .collect();
        runs.sort();
        runs.dedup();
        let runs: Arc<[RunId]> = runs.into();
        let mut kept = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        // A listing that started earlier and arrived later never replaces
        // a newer one another pass is paging through.
        if kept.as_ref().is_none_or(|l| l.taken <= taken) {
            *kept = Some(RunListing {
                runs: Arc::clone(&runs),
                taken,
            });
        }
        Ok(runs)
    }

    /// Every document of `run`, sorted by name: the kept listing of that
    /// run while it is fresh and `reuse` is set, else a new one (kept when
    /// it holds more than `page` documents, so that the later pages of
    /// the pass need no listing of their own; a run that fits in one page
    /// has no later page, and nothing is kept for it).
    pub(crate) async fn doc_listing(
        &self,
        run: &RunId,
        reuse: bool,
        page: usize,
    ) -> Result<Arc<[DocMeta]>> {
        if reuse
            && let Some(listing) = self
                .docs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|l| l.run == *run && l.taken.elapsed() < LISTING_FRESH)
        {
            return Ok(Arc::clone(&listing.docs));
        }
        let taken = Instant::now();
        let listing = self
            .bounded(self.store.list_with_delimiter(Some(&self.run_path(run))))
            .await?;
        let mut all: Vec<DocMeta> = Vec::with_capacity(listing.objects.len());
        for meta in listing.objects {
            if let Some(name) = self.doc_of(&meta.location) {
                all.push(DocMeta::new(
                    name,
                    version_of(meta.e_tag)?,
                    meta.size,
                    Some(meta.last_modified.into()),
                ));
            }
        }
        // Object keys sort with their extension; documents sort by name.
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let all: Arc<[DocMeta]> = all.into();
        let mut kept = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        // A listing that started earlier and arrived later never replaces
        // (or drops) a newer one of the run another pass is paging through.
        if kept
            .as_ref()
            .is_some_and(|l| l.run == *run && l.taken > taken)
        {
            return Ok(all);
        }
        if all.len() > page {
            *kept = Some(DocListing {
                run: run.clone(),
                docs: Arc::clone(&all),
                taken,
            });
        } else if kept.as_ref().is_some_and(|l| l.run == *run) {
            // A pass of this run that fits in a page: an older, larger
            // listing of it must not serve a later page.
            *kept = None;
        }
        Ok(all)
    }
}

/// The refusal of an `Update` with a version that is no ETag of this store.
fn not_a_version() -> Error {
    Error::new(
        ErrorKind::Precondition,
        "the document is not at that version: it is no version of this store (a quoted ETag); \
         nothing was sent",
    )
    .with_backend(BACKEND)
}

/// Whether `version` is a plain strong ETag (`"…"` of visible ASCII, no
/// quote or comma inside): what an `If-None-Match` header may carry as one
/// tag. Anything else could be read by the server as a list of tags or a
/// wildcard, or be no valid header at all.
pub(crate) fn is_plain_etag(version: &str) -> bool {
    version.len() >= 2
        && version.starts_with('"')
        && version.ends_with('"')
        && version[1..version.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b',')
}

/// `TooLarge` when an object of `size` bytes is over the caller's `limit`:
/// the size is known from the response's headers, so an object over the
/// limit is refused before its body is read.
pub(crate) fn check_limit(size: u64, limit: Option<u64>) -> Result<()> {
    match limit {
        Some(limit) if size > limit => Err(Error::new(
            ErrorKind::TooLarge,
            format!("document is {size} bytes, over the limit of {limit}"),
        )
        .with_backend(BACKEND)),
        _ => Ok(()),
    }
}
