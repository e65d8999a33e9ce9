//! index.json, read and rewritten one entry at a time.
//!
//! A layout can hold hundreds of thousands of tags: one of 400,001 tags is a 188 MB
//! index.json, and parsed whole into a `serde_json::Value` it took 1 GB of memory to read and
//! again to rewrite. Here the "manifests" array is streamed: each entry is parsed on its own,
//! handed to the caller and dropped. The other top-level fields (schemaVersion, mediaType,
//! annotations: a few) are kept. Memory no longer grows with the number of tags, unless the
//! caller keeps what it is handed.
//!
//! Rewriting (`write_with_tag`) reads the old file twice, first for the top-level fields,
//! then for the entries, so the output is what `image::canonical_json` would make of the
//! whole index: keys sorted, compact.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::{self, ANNOTATION_REF_NAME};

/// One entry of "manifests", the fields bakedb reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagEntry {
    pub tag: Option<String>,
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

impl TagEntry {
    /// The entry's tag, digest, size and media type; an entry without a sha256 digest is an
    /// error (no reader could follow it).
    pub fn from_value(entry: &Value, location: &str) -> Result<TagEntry> {
        let digest = entry
            .get("digest")
            .and_then(Value::as_str)
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| Error::Invalid {
                location: location.to_owned(),
                what: "index.json".into(),
                reason: format!("entry {entry} has no valid sha256 digest"),
            })?;
        Ok(TagEntry {
            tag: image::ref_name(entry).map(str::to_owned),
            digest,
            size: entry.get("size").and_then(Value::as_u64).unwrap_or(0),
            media_type: entry
                .get("mediaType")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        })
    }
}

/// The top-level fields of an index other than "manifests".
pub type IndexFields = BTreeMap<String, Value>;

/// Parse an index from `reader`, calling `each` with every entry of "manifests" in order;
/// returns the other top-level fields. An error from `each` stops the parse and is returned
/// as it is. `location` and `path` name the index in errors.
pub fn read<R: Read>(
    reader: R,
    location: &str,
    path: &Path,
    each: &mut dyn FnMut(Value) -> Result<()>,
) -> Result<IndexFields> {
    let mut stopped: Option<Error> = None;
    let mut de = serde_json::Deserializer::from_reader(BufReader::with_capacity(1 << 16, reader));
    let parsed = Top {
        each,
        stopped: &mut stopped,
    }
    .deserialize(&mut de)
    .and_then(|fields| de.end().map(|()| fields));
    if let Some(e) = stopped {
        return Err(e);
    }
    parsed.map_err(|e| {
        if e.is_io() {
            Error::Io {
                op: "reading",
                path: path.to_owned(),
                source: e.into(),
            }
        } else {
            Error::Invalid {
                location: location.to_owned(),
                what: "index.json".into(),
                reason: e.to_string(),
            }
        }
    })
}

/// Write the index that `old` (None: no index yet) becomes when `tag` points at the manifest
/// `digest`/`size`: the first entry with that tag is replaced in place, else the new entry is
/// appended; every other entry and field is kept. `reopen` gives the old index again for the
/// second pass.
pub fn write_with_tag(
    reopen: &mut dyn FnMut() -> Result<Option<Box<dyn Read>>>,
    location: &str,
    path: &Path,
    out: &mut dyn Write,
    tag: &str,
    digest: &Digest,
    size: u64,
) -> Result<()> {
    let mut new_entry = image::descriptor(image::MEDIA_TYPE_MANIFEST, digest, size);
    new_entry
        .as_object_mut()
        .expect("a descriptor is an object")
        .insert(
            "annotations".into(),
            serde_json::json!({ ANNOTATION_REF_NAME: tag }),
        );
    let fields = match reopen()? {
        Some(old) => read(old, location, path, &mut |_| Ok(()))?,
        None => match image::empty_index() {
            Value::Object(map) => map.into_iter().filter(|(k, _)| k != "manifests").collect(),
            _ => unreachable!("the empty index is an object"),
        },
    };
    let io_error = |e: io::Error| Error::Io {
        op: "writing",
        path: path.to_owned(),
        source: e,
    };
    let json_error = |e: serde_json::Error| io_error(e.into());
    out.write_all(b"{").map_err(io_error)?;
    let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    keys.push("manifests");
    keys.sort_unstable();
    for (i, key) in keys.into_iter().enumerate() {
        if i > 0 {
            out.write_all(b",").map_err(io_error)?;
        }
        serde_json::to_writer(&mut *out, key).map_err(json_error)?;
        out.write_all(b":").map_err(io_error)?;
        if key != "manifests" {
            serde_json::to_writer(&mut *out, &fields[key]).map_err(json_error)?;
            continue;
        }
        out.write_all(b"[").map_err(io_error)?;
        let mut first = true;
        let mut replaced = false;
        let mut put = |entry: &Value, out: &mut dyn Write| -> Result<()> {
            if !first {
                out.write_all(b",").map_err(io_error)?;
            }
            first = false;
            serde_json::to_writer(out, entry).map_err(json_error)
        };
        if let Some(old) = reopen()? {
            read(old, location, path, &mut |entry| {
                if !replaced && image::ref_name(&entry) == Some(tag) {
                    replaced = true;
                    put(&new_entry, out)
                } else {
                    put(&entry, out)
                }
            })?;
        }
        if !replaced {
            put(&new_entry, out)?;
        }
        out.write_all(b"]").map_err(io_error)?;
    }
    out.write_all(b"}").map_err(io_error)
}

/// The index object: "manifests" streamed through `each`, everything else collected.
struct Top<'a> {
    each: &'a mut dyn FnMut(Value) -> Result<()>,
    stopped: &'a mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = IndexFields;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<IndexFields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = IndexFields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an image index: a JSON object with a \"manifests\" array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IndexFields, A::Error> {
        let mut fields = IndexFields::new();
        let mut seen_manifests = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "manifests" {
                if seen_manifests {
                    return Err(de::Error::duplicate_field("manifests"));
                }
                seen_manifests = true;
                map.next_value_seed(Entries {
                    each: &mut *self.each,
                    stopped: &mut *self.stopped,
                })?;
            } else {
                let value = map.next_value::<Value>()?;
                if fields.insert(key.clone(), value).is_some() {
                    return Err(de::Error::custom(format_args!("duplicate field {key:?}")));
                }
            }
        }
        if !seen_manifests {
            return Err(de::Error::custom("has no \"manifests\" array"));
        }
        Ok(fields)
    }
}

struct Entries<'a> {
    each: &'a mut dyn FnMut(Value) -> Result<()>,
    stopped: &'a mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"manifests\" to be an array of descriptors")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<Value>()? {
            if let Err(e) = (self.each)(entry) {
                *self.stopped = Some(e);
                return Err(de::Error::custom("stopped by the caller"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(text: &str) -> Result<(IndexFields, Vec<Value>)> {
        let mut entries = Vec::new();
        let fields = read(
            text.as_bytes(),
            "oci:x",
            Path::new("index.json"),
            &mut |e| {
                entries.push(e);
                Ok(())
            },
        )?;
        Ok((fields, entries))
    }

    fn rewrite(old: Option<&str>, tag: &str, n: u8) -> String {
        let mut out = Vec::new();
        let old = old.map(str::to_owned);
        write_with_tag(
            &mut || {
                Ok(old
                    .clone()
                    .map(|t| Box::new(io::Cursor::new(t)) as Box<dyn Read>))
            },
            "oci:x",
            Path::new("index.json"),
            &mut out,
            tag,
            &Digest::of(&[n]),
            u64::from(n),
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The streamed rewrite gives the same bytes as editing the whole index as a Value.
    #[test]
    fn rewrite_matches_the_whole_value_edit() {
        let mut whole = image::empty_index();
        let mut text: Option<String> = None;
        for (tag, n) in [("a", 1), ("b", 2), ("a", 3), ("c", 4)] {
            image::set_tag(&mut whole, tag, &Digest::of(&[n]), u64::from(n));
            let next = rewrite(text.as_deref(), tag, n);
            assert_eq!(
                next.as_bytes(),
                image::canonical_json(&whole),
                "after {tag}"
            );
            text = Some(next);
        }
        // Fields bakedb does not know, before and after "manifests", are kept, sorted.
        let foreign = r#"{"schemaVersion":2,"manifests":[{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1,"platform":{"os":"linux"}}],"annotations":{"x":"y"},"zzz":[1]}"#;
        let mut value: Value = serde_json::from_str(foreign).unwrap();
        image::set_tag(&mut value, "t", &Digest::of(&[9]), 9);
        assert_eq!(
            rewrite(Some(foreign), "t", 9).as_bytes(),
            image::canonical_json(&value)
        );
    }

    #[test]
    fn entries_are_streamed_and_damage_is_named() {
        let (fields, entries) =
            read_all(r#"{"schemaVersion":2,"manifests":[{"a":1},{"b":2}],"mediaType":"m"}"#)
                .unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            fields.keys().collect::<Vec<_>>(),
            ["mediaType", "schemaVersion"]
        );
        for (text, reason) in [
            ("", "EOF while parsing"),
            ("[]", "expected an image index"),
            (r#"{"schemaVersion":2}"#, "has no \"manifests\" array"),
            (
                r#"{"manifests":{}}"#,
                "expected \"manifests\" to be an array",
            ),
            (
                r#"{"manifests":[],"manifests":[]}"#,
                "duplicate field `manifests`",
            ),
            (r#"{"manifests":[{"a":1},"#, "EOF while parsing"),
            (r#"{"manifests":[]} x"#, "trailing characters"),
        ] {
            let err = read_all(text).unwrap_err().to_string();
            assert!(
                err.starts_with("oci:x: index.json is not valid: ") && err.contains(reason),
                "{text:?}: {err}"
            );
        }
        // The caller's error comes back as it is.
        let err = read(
            "{\"manifests\":[1,2]}".as_bytes(),
            "oci:x",
            Path::new("i"),
            &mut |_| {
                Err(Error::BadReference {
                    reference: "r".into(),
                    reason: "stop".into(),
                })
            },
        )
        .unwrap_err();
        assert!(matches!(err, Error::BadReference { .. }), "{err}");
    }
}
