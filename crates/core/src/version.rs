//! Opaque document versions.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An opaque token naming one stored state of a document.
///
/// Returned by every read and write; pass it back in
/// [`PutMode::Update`](crate::PutMode::Update) or a conditional delete to
/// make the write depend on nothing having changed since. Two different
/// contents of a document never share a version. Whether rewriting the same
/// bytes yields a new version is up to the backend (content-addressed
/// backends such as the file backend keep it), so compare versions only for
/// equality and never order them.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Version(Arc<str>);

impl Version {
    /// Wraps a backend's version token (a counter, a hash, an ETag, …).
    pub fn new(token: impl AsRef<str>) -> Self {
        Version(Arc::from(token.as_ref()))
    }

    /// A version from a numeric counter, as used by backends that count
    /// writes.
    pub fn from_u64(counter: u64) -> Self {
        Version::new(counter.to_string())
    }

    /// The token as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({:?})", &*self.0)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Version::new(String::deserialize(deserializer)?))
    }
}
