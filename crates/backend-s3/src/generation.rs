//! `If-Match` by ETag on a store whose conditional writes take a
//! generation number instead (Google Cloud Storage).
//!
//! object_store's GCS client makes `PutMode::Update` conditional on the
//! object's *generation* (`x-goog-if-generation-match`) and refuses an
//! update that names only an ETag. This backend's versions are ETags
//! everywhere (reads, listings, writes, lease tokens), and GCS listings
//! carry no generation, so the versions stay ETags and an update by ETag
//! is made here as a compare-and-swap on the generation: a `HEAD` reads the
//! object's ETag and generation; when the ETag is not the expected one the
//! update is refused (`Precondition`) without a write, otherwise the `PUT`
//! is conditional on that generation. The server applies it only while the
//! object is still at that generation, which has that ETag: exactly an
//! `If-Match` on the ETag, one `HEAD` dearer. (GCS ETags of single-part
//! objects are the MD5 of their bytes, as on S3, so two generations with
//! the same bytes share an ETag, as two S3 versions do.)

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result, UpdateVersion,
};
use runstate_core::{Bytes, async_trait};

/// Wraps a store whose updates are conditional on generations (see the
/// module documentation); every other call is forwarded unchanged.
pub(crate) struct GenerationMatch {
    inner: Arc<dyn ObjectStore>,
}

impl GenerationMatch {
    pub(crate) fn wrap(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        Arc::new(GenerationMatch { inner })
    }
}

impl fmt::Display for GenerationMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GenerationMatch({})", self.inner)
    }
}

impl fmt::Debug for GenerationMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GenerationMatch({:?})", self.inner)
    }
}

fn refused(location: &Path, why: &str) -> object_store::Error {
    object_store::Error::Precondition {
        path: location.to_string(),
        source: why.to_owned().into(),
    }
}

#[async_trait]
impl ObjectStore for GenerationMatch {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> Result<PutResult> {
        if let PutMode::Update(UpdateVersion {
            e_tag: Some(expected),
            version: None,
        }) = &opts.mode
        {
            let meta = match self.inner.head(location).await {
                Ok(meta) => meta,
                // Updating an absent object is refused, as `If-Match` is.
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(refused(location, "no such object"));
                }
                Err(e) => return Err(e),
            };
            if meta.e_tag.as_deref() != Some(expected.as_str()) {
                return Err(refused(location, "the object's ETag differs"));
            }
            let Some(generation) = meta.version else {
                return Err(object_store::Error::NotSupported {
                    source: "the store reported no generation to make an update conditional on"
                        .into(),
                });
            };
            opts.mode = PutMode::Update(UpdateVersion {
                e_tag: Some(expected.clone()),
                version: Some(generation),
            });
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}
