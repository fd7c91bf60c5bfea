//! Configuration of the file backend.

use std::fmt;
use std::path::{Path, PathBuf};

use runstate_core::{Error, ErrorKind};

/// Longest accepted document extension.
pub const MAX_EXT_LEN: usize = 16;

/// One filesystem step of a save, as seen by a fault hook.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SaveStep {
    /// Writing the bytes to the temporary file.
    Write,
    /// `fsync` of the temporary file.
    Fsync,
    /// Renaming the temporary file over the document.
    Rename,
    /// `fsync` of the run folder after the rename.
    DirFsync,
}

/// Called before each step of a save; an `Err` makes that step fail as if
/// the filesystem had returned it.
#[cfg(feature = "fault-injection")]
pub type FaultHook =
    std::sync::Arc<dyn Fn(SaveStep, &Path) -> std::io::Result<()> + Send + Sync + 'static>;

/// Settings of a [`FileStore`](crate::FileStore).
///
/// ```
/// use runstate_file::FileConfig;
/// // Open an existing WEPPcloud run folder in place: documents are `*.nodb`.
/// let config = FileConfig::new("/geodata/weppcloud_runs").with_ext("nodb")?;
/// assert_eq!(config.ext(), "nodb");
/// # Ok::<(), runstate_core::Error>(())
/// ```
#[derive(Clone)]
pub struct FileConfig {
    pub(crate) root: PathBuf,
    pub(crate) ext: String,
    pub(crate) sweep_on_open: bool,
    pub(crate) create_root: bool,
    #[cfg(feature = "fault-injection")]
    pub(crate) fault_hook: Option<FaultHook>,
}

impl FileConfig {
    /// A store rooted at `root`: documents are `<root>/<run>/<name>.json`.
    /// The root is created on open if missing, and temporary files left by
    /// killed writers are swept on open.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileConfig {
            root: root.into(),
            ext: "json".to_owned(),
            sweep_on_open: true,
            create_root: true,
            #[cfg(feature = "fault-injection")]
            fault_hook: None,
        }
    }

    /// Sets the document file extension (without the dot), for example
    /// `nodb` to open WEPPcloud run folders in place.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] unless it is 1 to 16 ASCII letters and digits.
    pub fn with_ext(mut self, ext: impl Into<String>) -> Result<Self, Error> {
        let ext = ext.into();
        if ext.is_empty()
            || ext.len() > MAX_EXT_LEN
            || !ext.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "file extension {ext:?} must be 1 to {MAX_EXT_LEN} ASCII letters or digits"
                ),
            )
            .with_backend(crate::BACKEND));
        }
        self.ext = ext;
        Ok(self)
    }

    /// Whether to sweep temporary files of dead writers when opening
    /// (default true). Sweeping reads every run folder once, which a store
    /// with very many runs may prefer to skip.
    pub fn with_sweep_on_open(mut self, sweep: bool) -> Self {
        self.sweep_on_open = sweep;
        self
    }

    /// Whether to create the root folder when it is missing (default true).
    pub fn with_create_root(mut self, create: bool) -> Self {
        self.create_root = create;
        self
    }

    /// Installs a hook that can fail each filesystem step of a save.
    #[cfg(feature = "fault-injection")]
    pub fn with_fault_hook(mut self, hook: FaultHook) -> Self {
        self.fault_hook = Some(hook);
        self
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The document extension.
    pub fn ext(&self) -> &str {
        &self.ext
    }
}

impl fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("FileConfig");
        d.field("root", &self.root)
            .field("ext", &self.ext)
            .field("sweep_on_open", &self.sweep_on_open)
            .field("create_root", &self.create_root);
        #[cfg(feature = "fault-injection")]
        d.field("fault_hook", &self.fault_hook.as_ref().map(|_| "installed"));
        d.finish()
    }
}
