//! What `/etc/bakedb/image.json` promises, read into plain structs.
//!
//! The schema is written by `bakedb build` (crates/cli) from crates/engines; this is the
//! reading side, kept free of serde (see json.rs). Every path is checked to stay inside the
//! data directory before anything is opened.

use crate::json::{self, Value};
use crate::profile::{PatchMode, Profile, ProfileFile};

/// A file's expected contents: its size and either a whole-file digest (at most one chunk)
/// or one digest per chunk.
#[derive(Debug)]
pub struct Content {
    pub size: u64,
    /// Whole-file digest, for a file of at most one chunk.
    pub sha256: Option<[u8; 32]>,
    /// One digest per chunk_size piece, for a larger file.
    pub chunks: Vec<[u8; 32]>,
}

impl Content {
    /// The file's digests as a list: its one sha256, or its chunks.
    pub fn digests(&self) -> &[[u8; 32]] {
        match &self.sha256 {
            Some(sha) => std::slice::from_ref(sha),
            None => &self.chunks,
        }
    }
}

#[derive(Debug)]
pub struct FileEntry {
    /// Relative to the data directory, '/'-separated, no `.` or `..` components.
    pub path: String,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// The file as the engine reads it (composed, for a patched file).
    pub content: Content,
    /// A patched file: the file as its layer stores it, before `patches` are applied.
    pub base: Option<Base>,
    /// The patch files to apply to `base`, oldest first: paths relative to the data
    /// directory, each a files[] entry of its own (so verified like any data file).
    pub patches: Vec<String>,
}

#[derive(Debug)]
pub struct Base {
    /// The generation whose layer holds this version of the file.
    pub generation: u64,
    pub content: Content,
}

/// A page index file (docs/patch-format.md): not data, but covered by image.json like it.
#[derive(Debug)]
pub struct IndexFile {
    pub generation: u64,
    /// Absolute path in the container, e.g. /etc/bakedb/pages/0.idx.
    pub path: String,
    pub size: u64,
    pub sha256: [u8; 32],
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
    /// 0 for a full build, one more per `--from` build.
    pub generation: u64,
    /// The page index files of the chain, oldest first.
    pub page_index: Vec<IndexFile>,
}

impl Description {
    /// The files that have patches, in files[] order.
    pub fn patched(&self) -> impl Iterator<Item = &FileEntry> {
        self.files.iter().filter(|f| f.base.is_some())
    }
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
    profile.patches = match value.get("patches") {
        None => None,
        Some(v) => match v.as_str() {
            Some("apply") => Some(PatchMode::Apply),
            Some("in-place") => Some(PatchMode::InPlace),
            _ => {
                return Err("profile: \"patches\" is neither \"apply\" nor \"in-place\"".into());
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
        let content = parse_content(f, chunk_size, &ctx)?;
        let base = match f.get("base") {
            None | Some(Value::Null) => None,
            Some(b) => {
                let ctx = format!("{ctx}.base");
                Some(Base {
                    generation: u64_field(b, "generation", &ctx)?,
                    content: parse_content(b, chunk_size, &ctx)?,
                })
            }
        };
        let patches = strings(f.get("patches"), &format!("{ctx}.patches"))?;
        files.push(FileEntry {
            path: path.to_owned(),
            mode: mode(str_field(f, "mode", &ctx)?, &ctx)?,
            content,
            base,
            patches,
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
    let generation = match doc.get("generation") {
        None => 0,
        Some(_) => u64_field(&doc, "generation", ctx)?,
    };
    let profile = parse_profile(doc.get("profile"))?;
    check_patches(&files, generation, &profile)?;
    Ok(Description {
        engine: str_field(&doc, "engine", ctx)?.to_owned(),
        data_dir: data_dir.trim_end_matches('/').to_owned(),
        owner_uid: u32_field(owner, "uid", "owner")?,
        owner_gid: u32_field(owner, "gid", "owner")?,
        chunk_size,
        files,
        dirs,
        profile,
        generation,
        page_index: page_index(doc.get("page_index"))?,
    })
}

/// `size` and exactly one of `sha256` (a file of at most one chunk) and `chunks`.
fn parse_content(obj: &Value, chunk_size: u64, ctx: &str) -> Result<Content, String> {
    let size = u64_field(obj, "size", ctx)?;
    let sha256 = match obj.get("sha256") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .and_then(parse_hex32)
                .ok_or_else(|| format!("{ctx}: sha256 is not 64 hex digits"))?,
        ),
    };
    let chunks = strings(obj.get("chunks"), &format!("{ctx}.chunks"))?
        .iter()
        .map(|c| parse_hex32(c).ok_or_else(|| format!("{ctx}: chunk {c:?} is not 64 hex digits")))
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
    Ok(Content {
        size,
        sha256,
        chunks,
    })
}

/// A patched file and its patches must describe one composition init can carry out (or
/// check): every patch a listed file of its own inside the data directory, used once, not
/// itself patched; a base with patches and patches with a base; a profile that says how the
/// engine gets the composed files. Anything else is an image no builder should write.
fn check_patches(files: &[FileEntry], generation: u64, profile: &Profile) -> Result<(), String> {
    let by_path: std::collections::BTreeMap<&str, &FileEntry> =
        files.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut used: std::collections::BTreeMap<&str, &str> = Default::default();
    for f in files {
        let ctx = format!("files[{}]", f.path);
        let Some(base) = &f.base else {
            if !f.patches.is_empty() {
                return Err(format!("{ctx}: has patches but no base to apply them to"));
            }
            continue;
        };
        if f.patches.is_empty() {
            return Err(format!("{ctx}: has a base but no patches"));
        }
        if base.generation >= generation {
            return Err(format!(
                "{ctx}: base of generation {} is not older than the image (generation {generation})",
                base.generation
            ));
        }
        if profile.patches.is_none() {
            return Err(format!(
                "{ctx}: is patched, but the profile does not say how patches reach the engine (profile.patches: \"apply\" or \"in-place\")"
            ));
        }
        for patch in &f.patches {
            check_rel_path(patch).map_err(|e| format!("{ctx}.patches: {e}"))?;
            let Some(entry) = by_path.get(patch.as_str()) else {
                return Err(format!(
                    "{ctx}.patches: {patch:?} is not a file image.json lists"
                ));
            };
            if entry.base.is_some() {
                return Err(format!(
                    "{ctx}.patches: {patch:?} is a patched file itself, not a patch"
                ));
            }
            if let Some(other) = used.insert(patch, &f.path) {
                return Err(format!(
                    "{ctx}.patches: {patch:?} is already a patch of {other:?}"
                ));
            }
        }
    }
    Ok(())
}

fn page_index(value: Option<&Value>) -> Result<Vec<IndexFile>, String> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let mut out: Vec<IndexFile> = Vec::new();
    for entry in value
        .as_array()
        .ok_or("image.json: \"page_index\" is not an array")?
    {
        let path = str_field(entry, "path", "page_index[]")?;
        let ctx = format!("page_index[{path}]");
        // Outside the data directory (the image.json layer), so absolute; read, never written.
        if !path.starts_with('/') || check_rel_path(&path[1..]).is_err() {
            return Err(format!(
                "{ctx}: path is not an absolute path without . or .."
            ));
        }
        if out.iter().any(|i| i.path == path) {
            return Err(format!("{ctx}: listed twice"));
        }
        out.push(IndexFile {
            generation: u64_field(entry, "generation", &ctx)?,
            path: path.to_owned(),
            size: u64_field(entry, "size", &ctx)?,
            sha256: str_field(entry, "sha256", &ctx)
                .ok()
                .and_then(parse_hex32)
                .ok_or_else(|| format!("{ctx}: sha256 is not 64 hex digits"))?,
        });
    }
    Ok(out)
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
        assert!(d.files[0].content.sha256.is_some());
        assert_eq!(d.profile.name, "sqlite-readonly");
        assert!(
            d.profile
                .env
                .iter()
                .any(|(k, v)| k == "BAKEDB_DATABASE" && v == "{data_dir}/golden.db")
        );
        // Every image carries its page index, which init verifies like the data.
        assert_eq!(d.generation, 0);
        assert_eq!(d.page_index.len(), 1);
        assert_eq!(d.page_index[0].path, "/etc/bakedb/pages/0.idx");
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
        assert_eq!(d.files[1].content.chunks.len(), 2);
        assert_eq!(d.files[1].content.chunks[1][0], 0xff);
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

    const H1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const H2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    /// Generation 2 of a chain: app.db patched twice, a page index per generation.
    fn patched_sample() -> String {
        format!(
            r#"{{
  "chunk_size": 16,
  "data_dir": "/var/lib/bakedb",
  "engine": "sqlite",
  "files": [
    {{"base": {{"generation": 0, "size": 20, "chunks": ["{H1}", "{H2}"]}}, "mode": "0644", "path": "app.db",
      "patches": [".patches/1/app.db", ".patches/2/app.db"], "sha256": "{H1}", "size": 16}},
    {{"mode": "0644", "path": ".patches/1/app.db", "sha256": "{H2}", "size": 5}},
    {{"mode": "0644", "path": ".patches/2/app.db", "sha256": "{H2}", "size": 6}}
  ],
  "generation": 2,
  "owner": {{"gid": 1, "uid": 1}},
  "page_index": [
    {{"generation": 0, "layer": "sha256:{H1}", "path": "/etc/bakedb/pages/0.idx", "sha256": "{H1}", "size": 100}},
    {{"generation": 2, "layer": null, "path": "/etc/bakedb/pages/2.idx", "sha256": "{H2}", "size": 40}}
  ],
  "chain": [{{"generation": 0, "kind": "base", "layer": null, "whole": 3, "patched": 0, "deleted": 0, "pages": 0, "bytes": 1}}],
  "profile": {{"name": "sqlite-readonly", "patches": "apply"}},
  "schema": 1,
  "snapshot": {{}}
}}"#
        )
    }

    #[test]
    fn reads_patches_and_the_page_index() {
        let d = parse(patched_sample().as_bytes()).unwrap();
        assert_eq!(d.generation, 2);
        assert_eq!(d.profile.patches, Some(PatchMode::Apply));
        let app = &d.files[0];
        let base = app.base.as_ref().unwrap();
        assert_eq!((base.generation, base.content.size), (0, 20));
        assert_eq!(base.content.chunks.len(), 2);
        assert_eq!(app.content.size, 16);
        assert_eq!(app.patches, [".patches/1/app.db", ".patches/2/app.db"]);
        assert_eq!(d.patched().count(), 1);
        assert_eq!(d.page_index.len(), 2);
        assert_eq!(d.page_index[1].path, "/etc/bakedb/pages/2.idx");
        assert_eq!((d.page_index[1].generation, d.page_index[1].size), (2, 40));
        let in_place = patched_sample().replace("\"apply\"", "\"in-place\"");
        assert_eq!(
            parse(in_place.as_bytes()).unwrap().profile.patches,
            Some(PatchMode::InPlace)
        );
        // An image from before patch layers: none of it.
        let old = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!((old.generation, old.page_index.len()), (0, 0));
        assert_eq!(old.profile.patches, None);
        assert!(
            old.files
                .iter()
                .all(|f| f.base.is_none() && f.patches.is_empty())
        );
    }

    #[test]
    fn refuses_patches_that_do_not_add_up() {
        let sample = patched_sample();
        let base = r#""base": {"generation": 0, "size": 20, "chunks": [""#;
        let patches = r#""patches": [".patches/1/app.db", ".patches/2/app.db"], "#;
        for (from, to, message) in [
            (
                "\".patches/2/app.db\"]",
                "\".patches/3/app.db\"]",
                "files[app.db].patches: \".patches/3/app.db\" is not a file image.json lists",
            ),
            (patches, "", "files[app.db]: has a base but no patches"),
            (
                patches,
                r#""patches": [], "#,
                "files[app.db]: has a base but no patches",
            ),
            (
                "\"path\": \".patches/1/app.db\", \"sha256\"",
                "\"path\": \".patches/1/app.db\", \"patches\": [\"x\"], \"sha256\"",
                "files[.patches/1/app.db]: has patches but no base",
            ),
            (
                "\".patches/2/app.db\"]",
                "\"../outside\"]",
                "files[app.db].patches: path \"../outside\" is not a plain relative path inside the data directory",
            ),
            (
                "\".patches/2/app.db\"]",
                "\"/etc/passwd\"]",
                "path \"/etc/passwd\" is not a plain relative path",
            ),
            (
                "\".patches/2/app.db\"]",
                "\".patches/1/app.db\"]",
                "\".patches/1/app.db\" is already a patch of \"app.db\"",
            ),
            (
                "\".patches/2/app.db\"]",
                "\"app.db\"]",
                "\"app.db\" is a patched file itself, not a patch",
            ),
            (
                "\"patches\": \"apply\"",
                "\"patches\": \"copy\"",
                "profile: \"patches\" is neither \"apply\" nor \"in-place\"",
            ),
            (
                "\"patches\": \"apply\"",
                "\"patches\": true",
                "profile: \"patches\" is neither",
            ),
            (
                ", \"patches\": \"apply\"",
                "",
                "files[app.db]: is patched, but the profile does not say how patches reach the engine",
            ),
            (
                "\"generation\": 2,",
                "",
                "files[app.db]: base of generation 0 is not older than the image (generation 0)",
            ),
            (
                base,
                r#""base": {"generation": 0, "size": 20, "sha256": "1", "chunks": [""#,
                "files[app.db].base: sha256 is not 64 hex digits",
            ),
            (
                r#""size": 20, "chunks": [""#,
                r#""size": 40, "chunks": [""#,
                "files[app.db].base: a file of 40 bytes needs a sha256 (up to 16 bytes) or 3 chunk digests",
            ),
            (
                "\"/etc/bakedb/pages/2.idx\"",
                "\"pages/2.idx\"",
                "page_index[pages/2.idx]: path is not an absolute path",
            ),
            (
                "\"/etc/bakedb/pages/2.idx\"",
                "\"/etc/bakedb/../2.idx\"",
                "is not an absolute path without . or ..",
            ),
            (
                "\"/etc/bakedb/pages/2.idx\"",
                "\"/etc/bakedb/pages/0.idx\"",
                "page_index[/etc/bakedb/pages/0.idx]: listed twice",
            ),
            (
                &format!("\"sha256\": \"{H2}\", \"size\": 40"),
                "\"sha256\": \"x\", \"size\": 40",
                "page_index[/etc/bakedb/pages/2.idx]: sha256 is not 64 hex digits",
            ),
        ] {
            let text = sample.replacen(from, to, 1);
            assert!(text != sample, "{from:?} is not in the sample");
            let err = parse(text.as_bytes()).unwrap_err();
            assert!(err.contains(message), "{err:?} should contain {message:?}");
        }
    }
}
