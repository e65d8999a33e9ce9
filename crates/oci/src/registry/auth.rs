//! Credentials where skopeo and podman look for them, and the registry's authentication
//! challenge (`WWW-Authenticate`: Basic, or Bearer with a token endpoint).
//!
//! The lookup follows containers/image (pkg/docker/config): `--creds` first, then the auth
//! files in order, `$REGISTRY_AUTH_FILE` (or `--authfile`) taking the place of the
//! per-session `$XDG_RUNTIME_DIR/containers/auth.json`; in each file a `credHelpers` entry
//! for the registry runs `docker-credential-NAME get`, else the most specific `auths` key
//! (`host/ns/repo`, `host/ns`, `host`), else a key that normalises to the host
//! (`https://host/v1/`, `index.docker.io` for docker.io).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// Where they came from, for messages: `--creds`, a file, a helper.
    pub origin: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password, not even in a debug dump.
        write!(f, "Credentials({:?} from {})", self.username, self.origin)
    }
}

impl Credentials {
    /// `USER[:PASS]`, as skopeo's `--creds` takes it. A missing password is empty here;
    /// skopeo would prompt, a non-interactive build cannot.
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let (user, pass) = text.split_once(':').unwrap_or((text, ""));
        if user.is_empty() {
            return Err("--creds takes USER[:PASS] and the user name is empty".into());
        }
        Ok(Credentials {
            username: user.to_owned(),
            password: pass.to_owned(),
            origin: "--creds".into(),
        })
    }

    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

#[derive(Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default, Clone)]
struct AuthEntry {
    #[serde(default)]
    auth: String,
}

/// The auth files in the order containers/image reads them. `auth_file` is `--authfile`.
pub fn auth_file_paths(auth_file: Option<&Path>) -> Vec<(PathBuf, bool)> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let home = env("HOME").map(PathBuf::from);
    let mut paths = Vec::new();
    if let Some(f) = auth_file {
        paths.push((f.to_owned(), false));
    } else if let Some(f) = env("REGISTRY_AUTH_FILE") {
        paths.push((PathBuf::from(f), false));
    } else if let Some(dir) = env("XDG_RUNTIME_DIR") {
        paths.push((PathBuf::from(dir).join("containers/auth.json"), false));
    } else {
        use std::os::unix::fs::MetadataExt;
        // The owner of /proc/self is this process's uid: no unsafe getuid call needed.
        let uid = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
        paths.push((
            PathBuf::from(format!("/run/containers/{uid}/auth.json")),
            false,
        ));
    }
    match (env("XDG_CONFIG_HOME"), &home) {
        (Some(dir), _) => paths.push((PathBuf::from(dir).join("containers/auth.json"), false)),
        (None, Some(h)) => paths.push((h.join(".config/containers/auth.json"), false)),
        (None, None) => {}
    }
    match (env("DOCKER_CONFIG"), &home) {
        (Some(dir), _) => paths.push((PathBuf::from(dir).join("config.json"), false)),
        (None, Some(h)) => paths.push((h.join(".docker/config.json"), false)),
        (None, None) => {}
    }
    if let Some(h) = &home {
        paths.push((h.join(".dockercfg"), true));
    }
    paths
}

/// containers/image's normalizeRegistry: a URL key becomes its host; Docker Hub's names
/// become index.docker.io.
fn normalize_key(key: &str) -> String {
    let stripped = key
        .strip_prefix("http://")
        .or_else(|| key.strip_prefix("https://"))
        .unwrap_or(key);
    let host = stripped.split('/').next().unwrap_or(stripped);
    match host {
        "registry-1.docker.io" | "docker.io" => "index.docker.io".into(),
        h => h.into(),
    }
}

/// Credentials for `registry` (HOST[:PORT]) and `repository`, from the auth files; the
/// files looked at are added to `looked`, for the message when none are found.
pub fn lookup(
    registry: &str,
    repository: &str,
    auth_file: Option<&Path>,
    looked: &mut Vec<String>,
) -> Result<Option<Credentials>, String> {
    for (path, legacy) in auth_file_paths(auth_file) {
        looked.push(path.display().to_string());
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let file: AuthFile = if legacy {
            AuthFile {
                auths: serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?,
                cred_helpers: BTreeMap::new(),
            }
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?
        };
        if let Some(helper) = file.cred_helpers.get(registry) {
            return helper_get(helper, registry, &path).map(Some);
        }
        let mut keys = Vec::new();
        if !legacy {
            let mut name = format!("{registry}/{repository}");
            loop {
                keys.push(name.clone());
                match name.rfind('/') {
                    Some(i) => name.truncate(i),
                    None => break,
                }
            }
        } else {
            keys.push(registry.to_owned());
        }
        let entry = keys.iter().find_map(|k| file.auths.get(k)).or_else(|| {
            let want = normalize_key(registry);
            file.auths
                .iter()
                .find(|(k, _)| normalize_key(k) == want)
                .map(|(_, v)| v)
        });
        if let Some(entry) = entry
            && let Some(creds) = decode_auth(&entry.auth, &path)?
        {
            return Ok(Some(creds));
        }
    }
    Ok(None)
}

fn decode_auth(auth: &str, path: &Path) -> Result<Option<Credentials>, String> {
    if auth.is_empty() {
        return Ok(None);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| format!("{}: an \"auth\" value is not base64: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&decoded);
    // As docker does, an entry without a colon is skipped.
    Ok(text.split_once(':').map(|(u, p)| Credentials {
        username: u.to_owned(),
        password: p.trim_matches('\0').to_owned(),
        origin: path.display().to_string(),
    }))
}

/// `docker-credential-NAME get`, the registry on stdin, `{"Username", "Secret"}` on stdout.
/// `auth_file` named the helper, for messages.
fn helper_get(helper: &str, registry: &str, auth_file: &Path) -> Result<Credentials, String> {
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "{} names the credential helper {helper:?} for {registry}, and {program} is not on PATH; install it, or remove the entry from \"credHelpers\"",
                auth_file.display()
            ),
            _ => format!("running the credential helper {program}: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(registry.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("running the credential helper {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the credential helper {program} failed for {registry}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    #[derive(Deserialize)]
    struct HelperAnswer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("the credential helper {program} answered no credentials: {e}"))?;
    Ok(Credentials {
        username: answer.username,
        password: answer.secret,
        origin: format!("credential helper {program}"),
    })
}

/// What a `WWW-Authenticate` header asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        /// The scope the registry named (on an insufficient-scope answer).
        scope: Option<String>,
    },
}

/// Parse `Basic realm="x"` or `Bearer realm="https://…",service="…",scope="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

/// `k="v", k2=v2` with quoted strings that may hold commas and escaped quotes.
fn parse_params(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next().is_none() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm=http://x/t, error="insufficient_scope""#),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn creds_flag_and_auth_entries_decode() {
        let c = Credentials::parse("alice:pa:ss").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "pa:ss")
        );
        assert_eq!(Credentials::parse("bob").unwrap().password, "");
        assert!(Credentials::parse(":x").is_err());
        assert_eq!(c.basic_header(), "Basic YWxpY2U6cGE6c3M=");
        assert!(!format!("{c:?}").contains("pa:ss"));
        assert_eq!(
            normalize_key("https://index.docker.io/v1/"),
            "index.docker.io"
        );
        assert_eq!(normalize_key("docker.io"), "index.docker.io");
        assert_eq!(normalize_key("http://reg:5000"), "reg:5000");
    }

    #[test]
    fn auth_files_are_read_in_containers_image_order_most_specific_key_first() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &file,
            format!(
                r#"{{"auths": {{"reg:5000": {{"auth": "{}"}}, "reg:5000/team": {{"auth": "{}"}}, "https://index.docker.io/v1/": {{"auth": "{}"}}}}}}"#,
                b64("host:1"),
                b64("team:2"),
                b64("hub:3")
            ),
        )
        .unwrap();
        let mut looked = Vec::new();
        let get = |reg: &str, repo: &str, looked: &mut Vec<String>| {
            lookup(reg, repo, Some(&file), looked)
                .unwrap()
                .map(|c| c.username)
        };
        assert_eq!(
            get("reg:5000", "team/app", &mut looked).as_deref(),
            Some("team")
        );
        assert_eq!(
            get("reg:5000", "other/app", &mut looked).as_deref(),
            Some("host")
        );
        assert_eq!(
            get("docker.io", "library/busybox", &mut looked).as_deref(),
            Some("hub")
        );
        assert_eq!(looked[0], file.display().to_string());
        std::fs::write(&file, "{not json").unwrap();
        let err = lookup("reg:5000", "x", Some(&file), &mut looked).unwrap_err();
        assert!(err.contains("is not valid JSON"), "{err}");
    }
}
