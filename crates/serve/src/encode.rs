//! SQLite values as JSON, written straight into the answer's buffer under a byte cap.
//!
//! JSON has no infinities and no bytes, and SQLite TEXT need not be UTF-8; every value comes
//! back faithfully all the same. A SQLite value is never a JSON object, so an object always
//! stands for one of these special values:
//!
//! - a BLOB: `{"$base64": true, "encoded": "..."}` (datasette's form);
//! - TEXT that is not valid UTF-8: its bytes in the same form plus `"type": "text"` (datasette
//!   replaces such bytes with U+FFFD; a copy of the data should not be altered in transit);
//! - ±Infinity: `{"$float": "Infinity"}` or `{"$float": "-Infinity"}` (datasette answers
//!   null, which loses the value, or the literal Infinity, which is not JSON). SQLite never
//!   stores NaN (it becomes NULL), so `{"$float": "NaN"}` only comes from functions.
//!
//! JSON and NDJSON answers use the same writer, so the two forms cannot disagree.

use std::io::Write;

use rusqlite::types::ValueRef;
use serde_json::{Value, json};

/// The answer would grow beyond its cap.
#[derive(Debug)]
pub struct Overflow;

/// A buffer that refuses to grow beyond `cap` bytes, in length or in capacity: the cap bounds
/// the memory an answer holds, not only what it sends.
pub struct Capped<'a> {
    out: &'a mut Vec<u8>,
    cap: usize,
}

impl<'a> Capped<'a> {
    pub fn new(out: &'a mut Vec<u8>, cap: usize) -> Capped<'a> {
        Capped { out, cap }
    }

    pub fn put(&mut self, bytes: &[u8]) -> Result<(), Overflow> {
        let wanted = self.out.len() + bytes.len();
        if wanted > self.cap {
            return Err(Overflow);
        }
        if wanted > self.out.capacity() {
            // Doubling as Vec does, but never past the cap.
            let grown = (self.out.capacity() * 2).clamp(wanted, self.cap);
            self.out.reserve_exact(grown - self.out.len());
        }
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Lowers (or restores) the cap, e.g. to keep room for an answer's closing part.
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    pub fn truncate(&mut self, len: usize) {
        self.out.truncate(len);
    }
}

impl Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.put(buf)
            .map(|()| buf.len())
            .map_err(|Overflow| std::io::Error::other("the answer is too large"))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes `text` as a JSON string (serde_json's escaping, written piece by piece, so an
/// oversized string stops at the cap rather than after being escaped in full).
fn put_str(out: &mut Capped<'_>, text: &str) -> Result<(), Overflow> {
    serde_json::to_writer(&mut *out, text).map_err(|_| Overflow)
}

fn put_base64(out: &mut Capped<'_>, bytes: &[u8], text: bool) -> Result<(), Overflow> {
    out.put(br#"{"$base64":true,"encoded":""#)?;
    // 3 KiB of input per piece: a 16 MiB blob never needs a second 21 MiB buffer.
    for piece in bytes.chunks(3 * 1024) {
        out.put(base64(piece).as_bytes())?;
    }
    if text {
        out.put(br#"","type":"text"}"#)
    } else {
        out.put(br#""}"#)
    }
}

fn special_float(f: f64) -> &'static str {
    if f.is_nan() {
        "NaN"
    } else if f > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// One value, as JSON text.
pub fn put_value(out: &mut Capped<'_>, value: ValueRef<'_>) -> Result<(), Overflow> {
    match value {
        ValueRef::Null => out.put(b"null"),
        ValueRef::Integer(i) => out.put(i.to_string().as_bytes()),
        ValueRef::Real(f) if f.is_finite() => {
            serde_json::to_writer(&mut *out, &f).map_err(|_| Overflow)
        }
        ValueRef::Real(f) => {
            out.put(br#"{"$float":""#)?;
            out.put(special_float(f).as_bytes())?;
            out.put(br#""}"#)
        }
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(text) => put_str(out, text),
            Err(_) => put_base64(out, t, true),
        },
        ValueRef::Blob(b) => put_base64(out, b, false),
    }
}

/// One row as a JSON array. On overflow the buffer is left as it was before the row.
pub fn put_row(out: &mut Capped<'_>, row: &rusqlite::Row<'_>, n: usize) -> Result<(), Overflow> {
    let start = out.len();
    let result = (|| {
        out.put(b"[")?;
        for i in 0..n {
            if i > 0 {
                out.put(b",")?;
            }
            put_value(out, row.get_ref(i).unwrap_or(ValueRef::Null))?;
        }
        out.put(b"]")
    })();
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// One value as a serde_json Value, for the small answers built in memory (the schema); the
/// same forms as `put_value`.
pub fn to_json(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => json!(i),
        ValueRef::Real(f) => serde_json::Number::from_f64(f)
            .map_or_else(|| json!({"$float": special_float(f)}), Value::Number),
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => json!({"$base64": true, "encoded": base64(t), "type": "text"}),
        },
        ValueRef::Blob(b) => json!({"$base64": true, "encoded": base64(b)}),
    }
}

pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (b"\xff\x00\xfe", "/wD+"),
        ] {
            assert_eq!(base64(input), want);
        }
        // Pieces of 3 KiB join up to the encoding of the whole.
        let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut out = Vec::new();
        put_base64(&mut Capped::new(&mut out, usize::MAX), &big, false).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["encoded"], base64(&big));
    }

    #[test]
    fn written_values_parse_back_to_the_in_memory_form() {
        let long = "é\"\\\u{0}".repeat(100);
        let values = [
            ValueRef::Null,
            ValueRef::Integer(i64::MIN),
            ValueRef::Real(0.1),
            ValueRef::Real(-2.5e300),
            ValueRef::Real(f64::INFINITY),
            ValueRef::Real(f64::NEG_INFINITY),
            ValueRef::Real(f64::NAN),
            ValueRef::Text(b"plain"),
            ValueRef::Text(long.as_bytes()),
            ValueRef::Text(b"\xffa"),
            ValueRef::Blob(b"\x00\x01"),
        ];
        for value in values {
            let mut out = Vec::new();
            put_value(&mut Capped::new(&mut out, usize::MAX), value).unwrap();
            let parsed: Value = serde_json::from_slice(&out)
                .unwrap_or_else(|e| panic!("{value:?}: {e}: {}", String::from_utf8_lossy(&out)));
            assert_eq!(parsed, to_json(value), "{value:?}");
        }
        assert_eq!(
            to_json(ValueRef::Real(f64::NEG_INFINITY)),
            json!({"$float": "-Infinity"})
        );
        assert_eq!(
            to_json(ValueRef::Text(b"\xffa")),
            json!({"$base64": true, "encoded": "/2E=", "type": "text"})
        );
    }

    #[test]
    fn the_cap_bounds_length_and_capacity_and_stops_escaping_early() {
        let mut out = Vec::new();
        let mut capped = Capped::new(&mut out, 1000);
        // 600 NULs escape to 3600 bytes: refused without writing them all.
        let nuls = "\u{0}".repeat(600);
        assert!(put_value(&mut capped, ValueRef::Text(nuls.as_bytes())).is_err());
        assert!(capped.len() <= 1000);
        capped.truncate(0);
        for _ in 0..99 {
            capped.put(b"0123456789").unwrap();
        }
        assert!(capped.put(b"0123456789A").is_err());
        capped.put(b"0123456789").unwrap();
        assert_eq!(out.len(), 1000);
        assert!(out.capacity() <= 1000, "capacity {}", out.capacity());
    }
}
