//! What `/etc/bakedb/image.json` promises, read into plain structs.
//!
//! The schema is written by `bakedb build` (crates/cli) from crates/engines; this is the
//! reading side, kept free of serde (see json.rs). Every path is checked to stay inside the
//! data directory before anything is opened.

use crate::json::{self, Value};
use crate::profile::{Profile, ProfileFile};

#[derive(Debug)]
pub struct FileEntry {
    /// Relative to the data directory, '/'-separated, no `.` or `..` components.
    pub path: String,
    pub size: u64,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// Whole-file digest, for a file of at most one chunk.
    pub sha256: Option<[u8; 32]>,
    /// One digest per chunk_size piece, for a larger file.
    pub chunks: Vec<[u8; 32]>,
}

#[derive(Debug)]
pub struct Description {
    pub engine: String,
    /// Absolute path inside the container, e.g. /var/lib/bakedb.
    pub data_dir: String,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub chunk_size: u64,
    pub files: Vec<FileEntry>,
    /// Directories that may exist although no listed file is inside them.
    pub dirs: Vec<String>,
    pub profile: Profile,
}

pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A relative path that cannot leave the directory it is joined to.
fn check_rel_path(path: &str) -> Result<(), String> {
    if path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "path {path:?} is not a plain relative path inside the data directory"
        ));
    }
    Ok(())
}

fn field<'a>(obj: &'a Value, key: &str, ctx: &str) -> Result<&'a Value, String> {
    obj.get(key).ok_or_else(|| format!("{ctx}: no {key:?}"))
}

fn str_field<'a>(obj: &'a Value, key: &str, ctx: &str) -> Result<&'a str, String> {
    field(obj, key, ctx)?
        .as_str()
        .ok_or_else(|| format!("{ctx}: {key:?} is not a string"))
}

fn u64_field(obj: &Value, key: &str, ctx: &str) -> Result<u64, String> {
    field(obj, key, ctx)?
        .as_u64()
        .ok_or_else(|| format!("{ctx}: {key:?} is not a non-negative integer"))
}

fn u32_field(obj: &Value, key: &str, ctx: &str) -> Result<u32, String> {
    u32::try_from(u64_field(obj, key, ctx)?).map_err(|_| format!("{ctx}: {key:?} is too large"))
}

fn mode(text: &str, ctx: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{ctx}: mode {text:?} is not an octal permission"))
}

fn strings(value: Option<&Value>, ctx: &str) -> Result<Vec<String>, String> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .as_array()
        .ok_or_else(|| format!("{ctx} is not an array"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{ctx} holds a non-string"))
        })
        .collect()
}

fn parse_profile(value: Option<&Value>) -> Result<Profile, String> {
    let mut profile = Profile::default();
    let Some(value) = value else {
        return Ok(profile);
    };
    // Images from before profiles were objects name the profile only.
    if let Some(name) = value.as_str() {
        profile.name = name.to_owned();
        return Ok(profile);
    }
    let ctx = "profile";
    profile.name = str_field(value, "name", ctx)?.to_owned();
    profile.command = match value.get("command") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .ok_or("profile: \"command\" is not a string")?
                .to_owned(),
        ),
    };
    profile.args = strings(value.get("args"), "profile.args")?;
    if let Some(env) = value.get("env") {
        let env = env.as_object().ok_or("profile.env is not an object")?;
        for (k, v) in env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("profile.env: {k:?} is not a variable name"));
            }
            let v = v
                .as_str()
                .ok_or_else(|| format!("profile.env.{k} is not a string"))?;
            profile.env.push((k.clone(), v.to_owned()));
        }
    }
    if let Some(files) = value.get("files") {
        for f in files.as_array().ok_or("profile.files is not an array")? {
            let ctx = "profile.files[]";
            let name = str_field(f, "name", ctx)?;
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(format!("{ctx}: {name:?} is not a plain file name"));
            }
            profile.files.push(ProfileFile {
                name: name.to_owned(),
                mode: mode(str_field(f, "mode", ctx)?, ctx)?,
                content: str_field(f, "content", ctx)?.to_owned(),
            });
        }
    }
    profile.verify_first_start = match value.get("verify") {
        None => false,
        Some(v) => match v.as_str() {
            Some("every-start") => false,
            Some("first-start") => true,
            _ => {
                return Err(
                    "profile: \"verify\" is neither \"every-start\" nor \"first-start\"".into(),
                );
            }
        },
    };
    profile.supervise = match value.get("supervise") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or("profile: \"supervise\" is not a boolean")?,
    };
    Ok(profile)
}

pub fn parse(text: &[u8]) -> Result<Description, String> {
    let doc = json::parse(text)?;
    let ctx = "image.json";
    let schema = u64_field(&doc, "schema", ctx)?;
    if schema != 1 {
        return Err(format!(
            "schema {schema} is newer than this bakedb-init understands (1)"
        ));
    }
    let data_dir = str_field(&doc, "data_dir", ctx)?;
    if !data_dir.starts_with('/') || check_rel_path(&data_dir[1..]).is_err() {
        return Err(format!(
            "data_dir {data_dir:?} is not an absolute path without . or .."
        ));
    }
    let owner = field(&doc, "owner", ctx)?;
    let chunk_size = u64_field(&doc, "chunk_size", ctx)?;
    if chunk_size == 0 {
        return Err("chunk_size is 0".into());
    }
    let mut files = Vec::new();
    for f in field(&doc, "files", ctx)?
        .as_array()
        .ok_or("image.json: \"files\" is not an array")?
    {
        let path = str_field(f, "path", "files[]")?;
        check_rel_path(path)?;
        let ctx = format!("files[{path}]");
        let size = u64_field(f, "size", &ctx)?;
        let sha256 = match f.get("sha256") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(parse_hex32)
                    .ok_or_else(|| format!("{ctx}: sha256 is not 64 hex digits"))?,
            ),
        };
        let chunks = strings(f.get("chunks"), &format!("{ctx}.chunks"))?
            .iter()
            .map(|c| {
                parse_hex32(c).ok_or_else(|| format!("{ctx}: chunk {c:?} is not 64 hex digits"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let expected_chunks = size.div_ceil(chunk_size).max(1);
        match (&sha256, chunks.len() as u64) {
            (Some(_), 0) if size <= chunk_size => {}
            (None, n) if n == expected_chunks && n > 0 => {}
            _ => {
                return Err(format!(
                    "{ctx}: a file of {size} bytes needs a sha256 (up to {chunk_size} bytes) or {expected_chunks} chunk digests"
                ));
            }
        }
        files.push(FileEntry {
            path: path.to_owned(),
            size,
            mode: mode(str_field(f, "mode", &ctx)?, &ctx)?,
            sha256,
            chunks,
        });
    }
    let mut sorted: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("files: {:?} is listed twice", w[0]));
    }
    let dirs = strings(doc.get("dirs"), "dirs")?;
    for d in &dirs {
        check_rel_path(d)?;
    }
    Ok(Description {
        engine: str_field(&doc, "engine", ctx)?.to_owned(),
        data_dir: data_dir.trim_end_matches('/').to_owned(),
        owner_uid: u32_field(owner, "uid", "owner")?,
        owner_gid: u32_field(owner, "gid", "owner")?,
        chunk_size,
        files,
        dirs,
        profile: parse_profile(doc.get("profile"))?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The image.json of the e2e golden image, byte for byte as `bakedb build` writes it
    /// (tests/e2e/golden.rs refreshes it); bakedb-engines' typed module reads the same file.
    #[test]
    fn reads_what_bakedb_build_writes() {
        let golden = include_bytes!("../../../tests/e2e/golden/image.json");
        let d = parse(golden).unwrap();
        assert_eq!(d.engine, "sqlite");
        assert_eq!(d.data_dir, "/var/lib/bakedb");
        assert_eq!((d.owner_uid, d.owner_gid), (65532, 65532));
        assert_eq!(d.chunk_size, 16 << 20);
        assert_eq!(d.files.len(), 1);
        assert_eq!(d.files[0].path, "golden.db");
        assert!(d.files[0].sha256.is_some());
        assert_eq!(d.profile.name, "sqlite-readonly");
        assert!(
            d.profile
                .env
                .iter()
                .any(|(k, v)| k == "BAKEDB_DATABASE" && v == "{data_dir}/golden.db")
        );
    }

    pub const SAMPLE: &str = r#"{
  "chunk_size": 16,
  "data_dir": "/var/lib/bakedb",
  "engine": "sqlite",
  "files": [
    {"mode": "0644", "path": "app.db", "sha256": "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff", "size": 10},
    {"chunks": ["00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff", "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"], "mode": "0600", "path": "sub/big", "size": 20}
  ],
  "owner": {"gid": 65532, "uid": 65532},
  "profile": {"name": "sqlite-readonly", "command": "bakedb-serve", "args": ["--db", "{data_dir}/app.db"],
              "env": {"SQLITE_TMPDIR": "/tmp"}, "files": [{"name": "x.conf", "mode": "0600", "content": "a={runtime_dir}\n"}]},
  "schema": 1,
  "snapshot": {"source": "/x/app.db"}
}"#;

    #[test]
    fn reads_what_build_writes() {
        let d = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(d.data_dir, "/var/lib/bakedb");
        assert_eq!((d.owner_uid, d.owner_gid), (65532, 65532));
        assert_eq!(d.files.len(), 2);
        assert_eq!(d.files[0].mode, 0o644);
        assert_eq!(d.files[1].chunks.len(), 2);
        assert_eq!(d.files[1].chunks[1][0], 0xff);
        assert_eq!(d.profile.name, "sqlite-readonly");
        assert_eq!(d.profile.command.as_deref(), Some("bakedb-serve"));
        assert_eq!(d.profile.env, vec![("SQLITE_TMPDIR".into(), "/tmp".into())]);
        assert_eq!(d.profile.files[0].mode, 0o600);
    }

    #[test]
    fn refuses_paths_that_leave_the_data_dir() {
        for bad in ["../etc/passwd", "/etc/passwd", "a//b", "a/./b", "a/..", ""] {
            let text = SAMPLE.replace("\"app.db\", \"sha256\"", &format!("{bad:?}, \"sha256\""));
            assert!(text != SAMPLE);
            let err = parse(text.as_bytes()).unwrap_err();
            assert!(err.contains("not a plain relative path"), "{bad}: {err}");
        }
        let text = SAMPLE.replace("\"/var/lib/bakedb\"", "\"/var/../etc\"");
        assert!(parse(text.as_bytes()).unwrap_err().contains("data_dir"));
    }

    #[test]
    fn refuses_inconsistent_digests() {
        // 20 bytes in chunks of 16 need two chunk digests, not one.
        let text = SAMPLE.replace("\"size\": 20", "\"size\": 40");
        assert!(
            parse(text.as_bytes())
                .unwrap_err()
                .contains("3 chunk digests")
        );
        let text = SAMPLE.replace("\"size\": 10", "\"size\": 17");
        assert!(
            parse(text.as_bytes())
                .unwrap_err()
                .contains("needs a sha256")
        );
        let text = SAMPLE.replace("\"sub/big\"", "\"app.db\"");
        assert!(parse(text.as_bytes()).unwrap_err().contains("listed twice"));
        let text = SAMPLE.replace("\"schema\": 1", "\"schema\": 2");
        assert!(parse(text.as_bytes()).unwrap_err().contains("newer"));
    }
}
