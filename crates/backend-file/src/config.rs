//! Configuration of the file backend, from a URL or by hand.
//!
//! | URL | root folder |
//! |---|---|
//! | `file:///abs/path` (or `file://localhost/abs/path`) | `/abs/path` |
//! | `file:relative/path`, `file:./relative/path` | relative to the working directory |
//!
//! | query option | default | meaning |
//! |---|---|---|
//! | `ext` | `json` | document file extension; `nodb` opens WEPPcloud run folders in place |
//! | `create` | `true` | create the root folder when it is missing |
//! | `sweep` | `true` | remove temporary files of dead writers on open |
//!
//! The path is percent-decoded (`%20` for a space).

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

    /// Parses a `file:` URL (see the module documentation for the forms and
    /// options).
    ///
    /// ```
    /// use runstate_file::FileConfig;
    /// let config = FileConfig::from_url("file:///geodata/weppcloud_runs?ext=nodb&create=false")?;
    /// assert_eq!(config.root(), std::path::Path::new("/geodata/weppcloud_runs"));
    /// assert_eq!(config.ext(), "nodb");
    /// # Ok::<(), runstate_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for another scheme, a remote host, an empty
    /// path, an unknown option or a bad value.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let rest = url
            .strip_prefix("file:")
            .ok_or_else(|| config_error(format!("{url:?} is not a file: URL")))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = match path.strip_prefix("//") {
            // `file:///abs` and `file://localhost/abs`; any other authority
            // names another machine, which a local folder cannot reach.
            Some(after) if after.starts_with('/') => after,
            Some(after) => match after.strip_prefix("localhost") {
                Some(abs) if abs.starts_with('/') => abs,
                _ => {
                    return Err(config_error(format!(
                        "file URL {url:?} names a host; use file:///absolute/path or file:relative/path"
                    )));
                }
            },
            None => path,
        };
        let path = percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .map_err(|e| {
                config_error(format!("file URL path {path:?} is not UTF-8 once decoded"))
                    .with_source(e)
            })?;
        if path.is_empty() {
            return Err(config_error(format!("file URL {url:?} has no path")));
        }
        let mut config = FileConfig::new(path.as_ref());
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "ext" => config = config.with_ext(value.into_owned())?,
                "create" => config.create_root = parse_bool(&name, &value)?,
                "sweep" => config.sweep_on_open = parse_bool(&name, &value)?,
                other => {
                    return Err(config_error(format!(
                        "unknown file URL option {other:?} (known: ext, create, sweep)"
                    )));
                }
            }
        }
        Ok(config)
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

fn config_error(message: String) -> Error {
    Error::new(ErrorKind::Config, message).with_backend(crate::BACKEND)
}

fn parse_bool(name: &str, value: &str) -> Result<bool, Error> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(config_error(format!(
            "file URL option {name}={value:?} must be true or false"
        ))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let abs = FileConfig::from_url("file:///srv/runs%20x?ext=nodb&create=false&sweep=0")
            .expect("valid");
        assert_eq!(abs.root(), Path::new("/srv/runs x"));
        assert_eq!(abs.ext(), "nodb");
        assert!(!abs.create_root && !abs.sweep_on_open);
        let local = FileConfig::from_url("file://localhost/srv/runs").expect("valid");
        assert_eq!(local.root(), Path::new("/srv/runs"));
        let relative = FileConfig::from_url("file:./data").expect("valid");
        assert_eq!(relative.root(), Path::new("./data"));
        assert_eq!(relative.ext(), "json");
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for url in [
            "file://otherhost/srv",
            "file:",
            "file:///srv?ext=no.dots",
            "file:///srv?colour=red",
            "file:///srv?create=maybe",
            "redis://x",
        ] {
            let error = FileConfig::from_url(url).expect_err(url);
            assert_eq!(error.kind(), ErrorKind::Config, "{url}: {error}");
        }
    }
}
