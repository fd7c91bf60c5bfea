//! Typed documents used by the cases.

use runstate_core::{Codec, Document};
use serde::{Deserialize, Serialize};

/// A counter: the document of every increment race.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// The count.
    pub n: u64,
    /// Free text, to make documents larger or distinct.
    #[serde(default)]
    pub note: String,
}

impl Document for Counter {
    const NAME: &'static str = "counter";
}

/// The same document read with the bincode codec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BincodeCounter {
    /// The count.
    pub n: u64,
    /// Free text.
    pub note: String,
}

impl Document for BincodeCounter {
    const NAME: &'static str = "counter";
    const CODEC: Codec = Codec::Bincode;
}

/// A document whose name is not a valid document name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Escaping {
    /// Anything.
    pub x: u8,
}

impl Document for Escaping {
    const NAME: &'static str = "../escape";
}
