//! A stand-in for Google Cloud Storage's conditional writes, on any store
//! (no GCS is reachable here): as object_store's GCS client does, an update
//! must name the object's generation (`UpdateVersion::version`, sent as
//! `x-goog-if-generation-match`) and is refused without one; reads and
//! `HEAD`s report the generation; listings (GCS's XML listing) do not.
//! The inner store's ETag serves as the generation: it changes with every
//! write, as a generation does.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use runstate_core::async_trait;
use runstate_s3::object_store::path::Path;
use runstate_s3::object_store::{
    self, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UpdateVersion,
};

/// The stand-in.
pub struct GcsLike {
    inner: Arc<dyn ObjectStore>,
    /// A careless server: an update's generation is ignored (the write is
    /// made unconditionally).
    blind: bool,
}

impl GcsLike {
    pub fn wrap(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        Arc::new(GcsLike {
            inner,
            blind: false,
        })
    }

    /// A stand-in whose updates ignore the generation they name (creates
    /// are still create-only): the server the probe exists to catch.
    #[allow(dead_code)] // used by one test crate
    pub fn wrap_blind(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        Arc::new(GcsLike { inner, blind: true })
    }
}

impl fmt::Display for GcsLike {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GcsLike({})", self.inner)
    }
}

impl fmt::Debug for GcsLike {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GcsLike({:?})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for GcsLike {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if let PutMode::Update(update) = &opts.mode {
            // object_store's GCS client: `Error::MissingVersion`.
            let Some(generation) = update.version.clone() else {
                return Err(object_store::Error::Generic {
                    store: "GCS",
                    source: "Missing version".into(),
                });
            };
            opts.mode = if self.blind {
                PutMode::Overwrite
            } else {
                PutMode::Update(UpdateVersion {
                    e_tag: Some(generation),
                    version: None,
                })
            };
        }
        let mut result = self.inner.put_opts(location, payload, opts).await?;
        result.version = result.e_tag.clone();
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let mut got = self.inner.get_opts(location, options).await?;
        got.meta.version = got.meta.e_tag.clone();
        Ok(got)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<runstate_core::Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner
            .list(prefix)
            .map(|meta| {
                meta.map(|mut meta| {
                    meta.version = None;
                    meta
                })
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let mut listing = self.inner.list_with_delimiter(prefix).await?;
        for meta in &mut listing.objects {
            meta.version = None;
        }
        Ok(listing)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}
