//! The `--source` connection string: its password never reaches a command line.
//!
//! `ps` shows every process's argv to every user, so a password in the URI that bakedb hands
//! to pg_basebackup or psql would be readable by anyone on the machine while the backup runs.
//! The password is taken out of the URI and written to a private password file (libpq's
//! PGPASSFILE, mode 0600, removed when the connection is dropped), the way PostgreSQL's own
//! documentation recommends over PGPASSWORD. Passwords the user supplies through PGPASSWORD,
//! PGPASSFILE or a service file (PGSERVICE) reach the tools unchanged.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::Command;

use crate::{Error, Result};

/// Whether `source` is a PostgreSQL connection URI (what `--source` takes for a live server).
pub fn is_url(source: &str) -> bool {
    source.starts_with("postgresql://") || source.starts_with("postgres://")
}

/// A source connection string with any password replaced, fit for messages and image.json.
pub fn redact(url: &str) -> String {
    let parts = UrlParts::split(url);
    let mut out = parts.rebuild(parts.password.map(|_| "***"));
    out = replace_query_password(&out, Some("***"));
    out
}

/// The pieces of a `postgresql://` URI that matter here.
struct UrlParts<'a> {
    /// "postgresql://" and the user name (or nothing), without the password.
    head: &'a str,
    password: Option<&'a str>,
    /// "@host:port/db?query", or the whole rest when there is no user info.
    tail: &'a str,
}

impl<'a> UrlParts<'a> {
    fn split(url: &'a str) -> UrlParts<'a> {
        let none = UrlParts {
            head: url,
            password: None,
            tail: "",
        };
        let Some(scheme_end) = url.find("://") else {
            return none;
        };
        let rest = scheme_end + 3;
        let authority_end = url[rest..].find(['/', '?']).map_or(url.len(), |i| rest + i);
        let Some(at) = url[rest..authority_end].rfind('@') else {
            return none;
        };
        let at = rest + at;
        match url[rest..at].find(':') {
            Some(colon) => UrlParts {
                head: &url[..rest + colon],
                password: Some(&url[rest + colon + 1..at]),
                tail: &url[at..],
            },
            None => none,
        }
    }

    fn rebuild(&self, password: Option<&str>) -> String {
        match password {
            Some(p) => format!("{}:{p}{}", self.head, self.tail),
            None => format!("{}{}", self.head, self.tail),
        }
    }
}

/// `password=...` in the query part replaced (Some) or removed (None).
fn replace_query_password(url: &str, with: Option<&str>) -> String {
    let Some(q) = url.find('?') else {
        return url.to_owned();
    };
    let (head, query) = url.split_at(q + 1);
    let kept: Vec<String> = query
        .split('&')
        .filter_map(|kv| match (kv.split_once('='), with) {
            (Some(("password", _)), Some(w)) => Some(format!("password={w}")),
            (Some(("password", _)), None) => None,
            _ => Some(kv.to_owned()),
        })
        .collect();
    if kept.is_empty() {
        head[..head.len() - 1].to_owned()
    } else {
        format!("{head}{}", kept.join("&"))
    }
}

fn query_password(url: &str) -> Option<&str> {
    let query = &url[url.find('?')? + 1..];
    query.split('&').find_map(|kv| kv.strip_prefix("password="))
}

/// %XX sequences decoded (URI user info and query values are percent-encoded).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A line of a libpq password file matching every host, port, database and user.
fn passfile_line(password: &str) -> String {
    let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:*:{escaped}\n")
}

/// A private password file, removed when dropped.
struct Passfile(PathBuf);

impl Passfile {
    fn create(password: &str) -> Result<Passfile> {
        let dir = std::env::temp_dir();
        let mut last_err = None;
        for n in 0..100u32 {
            let path = dir.join(format!("bakedb-pgpass.{}.{n}", std::process::id()));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut file) => {
                    let file_guard = Passfile(path.clone());
                    file.write_all(passfile_line(password).as_bytes())
                        .map_err(|source| Error::Io {
                            op: "writing",
                            path: path.clone(),
                            source,
                        })?;
                    return Ok(file_guard);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(source) => {
                    return Err(Error::Io {
                        op: "creating",
                        path,
                        source,
                    });
                }
            }
        }
        Err(Error::Io {
            op: "creating a password file in",
            path: dir,
            source: last_err.unwrap_or_else(|| std::io::Error::other("no free name")),
        })
    }
}

impl Drop for Passfile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The source server as the tools reach it: the URI without its password, and the password
/// (if the URI had one) in a private password file that every tool command is pointed at.
pub struct Source {
    url: String,
    redacted: String,
    passfile: Option<Passfile>,
}

impl Source {
    /// Take `url` apart; None when it is not a PostgreSQL URI.
    pub fn new(url: &str) -> Result<Option<Source>> {
        if !is_url(url) {
            return Ok(None);
        }
        let parts = UrlParts::split(url);
        let password = parts
            .password
            .map(percent_decode)
            .or_else(|| query_password(url).map(percent_decode));
        let bare = replace_query_password(&parts.rebuild(None), None);
        let passfile = password.as_deref().map(Passfile::create).transpose()?;
        Ok(Some(Source {
            url: bare,
            redacted: redact(url),
            passfile,
        }))
    }

    /// The URI without any password: safe on a command line.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URI with any password replaced by `***`, for messages and image.json.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The URI connecting to database `db` instead (a `dbname` query parameter wins over the
    /// path in libpq's URI parsing).
    pub fn url_for(&self, db: &str) -> String {
        let encoded: String = db
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}dbname={encoded}", self.url)
    }

    /// Point `cmd` (a libpq client) at the password file, when there is one.
    pub fn apply(&self, cmd: &mut Command) {
        if let Some(passfile) = &self.passfile {
            cmd.env("PGPASSFILE", &passfile.0).env_remove("PGPASSWORD");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgresql://app:s3cr@t@db.example:5432/app?sslmode=require"),
            "postgresql://app:***@db.example:5432/app?sslmode=require"
        );
        assert_eq!(
            redact("postgresql://app@host/db"),
            "postgresql://app@host/db"
        );
        assert_eq!(
            redact("postgres://host/db?user=a&password=b&x=1"),
            "postgres://host/db?user=a&password=***&x=1"
        );
        assert!(is_url("postgres://h/d") && !is_url("/var/lib/x"));
    }

    #[test]
    fn the_password_leaves_the_url_for_a_private_file() {
        let s = Source::new("postgresql://app:p%40ss:w\\rd@db:5433/app?sslmode=disable")
            .unwrap()
            .unwrap();
        assert_eq!(s.url(), "postgresql://app@db:5433/app?sslmode=disable");
        assert_eq!(
            s.redacted(),
            "postgresql://app:***@db:5433/app?sslmode=disable"
        );
        let path = s.passfile.as_ref().unwrap().0.clone();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, "*:*:*:*:p@ss\\:w\\\\rd\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut cmd = Command::new("true");
        s.apply(&mut cmd);
        assert!(
            cmd.get_envs()
                .any(|(k, v)| k == "PGPASSFILE" && v == Some(path.as_os_str()))
        );
        drop(s);
        assert!(!path.exists(), "the password file outlived the connection");

        let s = Source::new("postgres://h/db?user=a&password=x%20y&x=1")
            .unwrap()
            .unwrap();
        assert_eq!(s.url(), "postgres://h/db?user=a&x=1");
        assert_eq!(
            fs::read_to_string(&s.passfile.as_ref().unwrap().0).unwrap(),
            "*:*:*:*:x y\n"
        );
        let s = Source::new("postgres://h/db?password=only")
            .unwrap()
            .unwrap();
        assert_eq!(s.url(), "postgres://h/db");
        assert_eq!(s.url_for("my db"), "postgres://h/db?dbname=my%20db");
        let s = Source::new("postgresql://u@h/db").unwrap().unwrap();
        assert!(s.passfile.is_none());
        assert_eq!(s.url_for("x"), "postgresql://u@h/db?dbname=x");
        assert!(Source::new("mysql://x").unwrap().is_none());
    }
}
