//! A walk over a value that fails at the first float JSON cannot hold.
//!
//! serde_json writes a float that is NaN or infinite as `null`, which no
//! float reads back: a document holding one would be saved and then fail
//! every later load as `Corrupt`. Its serializer offers no hook to refuse
//! one, so [`check`] walks the value once before it is encoded, writing
//! nothing.

use std::fmt;

use serde::ser::{self, Serialize};

/// Whether `value` holds a NaN or infinite float anywhere (a map's keys
/// included): `Err(NonFinite)` at the first one. An error the value's own
/// `Serialize` raises is `Other`, left for the encoder to report.
pub(crate) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), Walk> {
    value.serialize(Finite)
}

/// Why the walk stopped.
#[derive(Debug)]
pub(crate) enum Walk {
    /// A float JSON cannot hold.
    NonFinite,
    /// The value's own `Serialize` failed; the encoder reports it.
    Other,
}

impl fmt::Display for Walk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Walk::NonFinite => f.write_str("a float is NaN or infinite"),
            Walk::Other => f.write_str("the value could not be serialized"),
        }
    }
}

impl std::error::Error for Walk {}

impl ser::Error for Walk {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Walk::Other
    }
}

#[derive(Clone, Copy)]
struct Finite;

fn float(value: f64) -> Result<(), Walk> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Walk::NonFinite)
    }
}

/// Values that hold no float: nothing to look at.
macro_rules! scalars {
    ($($method:ident: $ty:ty),* $(,)?) => {$(
        fn $method(self, _: $ty) -> Result<(), Walk> {
            Ok(())
        }
    )*};
}

impl ser::Serializer for Finite {
    type Ok = ();
    type Error = Walk;
    type SerializeSeq = Finite;
    type SerializeTuple = Finite;
    type SerializeTupleStruct = Finite;
    type SerializeTupleVariant = Finite;
    type SerializeMap = Finite;
    type SerializeStruct = Finite;
    type SerializeStructVariant = Finite;

    scalars!(
        serialize_bool: bool,
        serialize_i8: i8,
        serialize_i16: i16,
        serialize_i32: i32,
        serialize_i64: i64,
        serialize_i128: i128,
        serialize_u8: u8,
        serialize_u16: u16,
        serialize_u32: u32,
        serialize_u64: u64,
        serialize_u128: u128,
        serialize_char: char,
        serialize_str: &str,
        serialize_bytes: &[u8],
    );
    fn serialize_f32(self, value: f32) -> Result<(), Walk> {
        float(f64::from(value))
    }
    fn serialize_f64(self, value: f64) -> Result<(), Walk> {
        float(value)
    }
    fn serialize_none(self) -> Result<(), Walk> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Walk> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Walk> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Walk> {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Walk> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Walk> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), Walk> {
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Finite, Walk> {
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Finite, Walk> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Finite, Walk> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Finite, Walk> {
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Finite, Walk> {
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Finite, Walk> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Finite, Walk> {
        Ok(self)
    }
}

/// The compound parts of a value: each element (or field) walked in turn.
macro_rules! compound {
    ($($part:ident :: $method:ident),* $(,)?) => {$(
        impl ser::$part for Finite {
            type Ok = ();
            type Error = Walk;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Walk> {
                value.serialize(Finite)
            }
            fn end(self) -> Result<(), Walk> {
                Ok(())
            }
        }
    )*};
}

compound!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

/// The named fields of a struct or struct variant.
macro_rules! fields {
    ($($part:ident),* $(,)?) => {$(
        impl ser::$part for Finite {
            type Ok = ();
            type Error = Walk;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                _: &'static str,
                value: &T,
            ) -> Result<(), Walk> {
                value.serialize(Finite)
            }
            fn end(self) -> Result<(), Walk> {
                Ok(())
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

impl ser::SerializeMap for Finite {
    type Ok = ();
    type Error = Walk;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Walk> {
        key.serialize(Finite)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Walk> {
        value.serialize(Finite)
    }
    fn end(self) -> Result<(), Walk> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn only_non_finite_floats_stop_the_walk() {
        assert!(check(&(1.5_f64, Some(2.0_f32), "x", vec![1u8, 2], None::<f64>)).is_ok());
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(check(&bad), Err(Walk::NonFinite)));
            assert!(matches!(check(&vec![1.0, bad]), Err(Walk::NonFinite)));
            assert!(matches!(check(&Some(bad)), Err(Walk::NonFinite)));
            let mut map = BTreeMap::new();
            map.insert("k", bad);
            assert!(matches!(check(&map), Err(Walk::NonFinite)));
        }
        assert!(matches!(check(&f32::NAN), Err(Walk::NonFinite)));
        assert!(check(&serde_json::json!({"a": [1.0, null, {"b": 2.5}]})).is_ok());
    }
}
