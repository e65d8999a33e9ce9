//! The `--source` URI of a live MariaDB server, and the client it runs: the password never
//! reaches a command line.
//!
//! `ps` shows every process's argv to every user, so the credentials go into an option file
//! (`[client]`, mode 0600, in a private directory removed when the connection is dropped)
//! that `mariadb` and `mariadb-backup` read through `--defaults-file`, the way MariaDB's own
//! documentation recommends over `--password` on the command line. `--defaults-file` also
//! keeps the machine's /etc/mysql configuration out of the tools.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{err, io};
use crate::Result;

/// Whether `source` is a MariaDB connection URI (what `--source` takes for a live server).
pub fn is_url(source: &str) -> bool {
    source.starts_with("mysql://") || source.starts_with("mariadb://")
}

/// `source` with its password replaced, fit for messages and image.json.
pub fn redact(source: &str) -> String {
    match Url::parse(source) {
        Ok(url) => url.redacted(),
        Err(_) => "(not a mysql:// URI)".into(),
    }
}

/// A parsed `mysql://USER[:PASSWORD]@[HOST][:PORT][/][?socket=PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Url {
    scheme: String,
    user: String,
    password: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    socket: Option<String>,
}

/// %XX sequences decoded (URI user info and query values are percent-encoded).
fn percent_decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{:?} has a bad %-escape", text))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a %-escape is not UTF-8".into())
}

impl Url {
    fn parse(text: &str) -> std::result::Result<Url, String> {
        let (scheme, rest) = text
            .split_once("://")
            .filter(|(s, _)| *s == "mysql" || *s == "mariadb")
            .ok_or("it does not start with mysql://")?;
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (userinfo, hostport) = authority
            .rsplit_once('@')
            .ok_or("it names no user (mysql://USER@HOST:PORT/)")?;
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(percent_decode(p)?)),
            None => (userinfo, None),
        };
        let user = percent_decode(user)?;
        if user.is_empty() {
            return Err("it names no user (mysql://USER@HOST:PORT/)".into());
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("port {p:?} is not a number"))?,
                ),
            ),
            None => (hostport, None),
        };
        let path = tail.split('?').next().unwrap_or("");
        if !path.is_empty() && path != "/" {
            return Err(format!(
                "it names a database ({path:?}); bakedb bakes the whole server, so end the URI with / (mysql://USER@HOST:PORT/)"
            ));
        }
        let mut socket = None;
        if let Some((_, query)) = tail.split_once('?') {
            for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                match kv.split_once('=') {
                    Some(("socket", value)) => socket = Some(percent_decode(value)?),
                    _ => {
                        return Err(format!(
                            "unknown parameter {kv:?} (only socket=PATH is understood)"
                        ));
                    }
                }
            }
        }
        for value in [Some(&user), password.as_ref(), socket.as_ref()]
            .into_iter()
            .flatten()
        {
            if value.contains(['\n', '\r', '\0']) {
                return Err("the user, password or socket holds a line break".into());
            }
        }
        Ok(Url {
            scheme: scheme.to_owned(),
            user,
            password,
            host: (!host.is_empty()).then(|| host.to_owned()),
            port,
            socket,
        })
    }

    fn redacted(&self) -> String {
        let mut out = format!("{}://{}", self.scheme, self.user);
        if self.password.is_some() {
            out.push_str(":***");
        }
        out.push('@');
        out.push_str(self.host.as_deref().unwrap_or(""));
        if let Some(port) = self.port {
            out.push_str(&format!(":{port}"));
        }
        out.push('/');
        if let Some(socket) = &self.socket {
            out.push_str(&format!("?socket={socket}"));
        }
        out
    }

    /// The `[client]` option file's text. Values are double-quoted, with `\` and `"`
    /// escaped, so any password is read back as it is.
    fn option_file(&self) -> String {
        let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
        let mut text = String::from("[client]\n");
        text.push_str(&format!("user={}\n", quote(&self.user)));
        if let Some(p) = &self.password {
            text.push_str(&format!("password={}\n", quote(p)));
        }
        match (&self.socket, &self.host) {
            (Some(socket), _) => {
                text.push_str(&format!("socket={}\nprotocol=socket\n", quote(socket)));
            }
            (None, host) => {
                // "localhost" would mean the default socket to the client library: a host
                // given means TCP.
                let host = host.as_deref().unwrap_or("127.0.0.1");
                text.push_str(&format!("host={}\nprotocol=tcp\n", quote(host)));
                text.push_str(&format!("port={}\n", self.port.unwrap_or(3306)));
            }
        }
        text
    }
}

/// A live server to snapshot: the URI as given (redacted for messages) and its option file.
#[derive(Debug)]
pub struct Source {
    redacted: String,
    /// Private directory holding `client.cnf` (0600); removed on drop.
    dir: PathBuf,
    defaults: PathBuf,
}

impl Source {
    /// Parse `--source` and write the option file. None: not a mysql:// URI at all.
    pub fn new(text: &str) -> Result<Option<Source>> {
        if !is_url(text) {
            return Ok(None);
        }
        let url = Url::parse(text).map_err(|why| {
            err(
                "checking --source",
                format!(
                    "{}: {why}; pass mysql://USER[:PASSWORD]@HOST[:PORT]/ or mysql://USER[:PASSWORD]@/?socket=PATH",
                    redact(text)
                ),
            )
        })?;
        let dir = std::env::temp_dir().join(format!(
            "bakedb-mariadb.{}.{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        fs::create_dir(&dir).map_err(io("creating", &dir))?;
        let source = Source {
            redacted: url.redacted(),
            defaults: dir.join("client.cnf"),
            dir,
        };
        fs::set_permissions(&source.dir, fs::Permissions::from_mode(0o700))
            .map_err(io("setting the mode of", &source.dir))?;
        fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&source.defaults)
            .and_then(|mut f| f.write_all(url.option_file().as_bytes()))
            .map_err(io("writing", &source.defaults))?;
        Ok(Some(source))
    }

    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// `--defaults-file=…`, which must be a tool's first argument.
    pub fn defaults_arg(&self) -> String {
        format!("--defaults-file={}", self.defaults.display())
    }

    /// Run `sql` with the `mariadb` client in `bin`: its rows, tab-separated, raw.
    pub fn query(&self, client: &Path, sql: &str) -> Result<Vec<Vec<String>>> {
        let out = Command::new(client)
            .arg(self.defaults_arg())
            .args(["--batch", "--skip-column-names", "--raw", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(io("running", client))?;
        rows(&out).map_err(|why| err(format!("querying {}", self.redacted), why))
    }
}

/// The rows of a `mariadb --batch --raw` run, or what it said when it failed.
pub(crate) fn rows(out: &Output) -> std::result::Result<Vec<Vec<String>>, String> {
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        return Err(text.trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect())
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_socket_forms() {
        let url = Url::parse("mysql://bak:s%40cret%22x@db.example:3307/").unwrap();
        assert_eq!(url.user, "bak");
        assert_eq!(url.password.as_deref(), Some("s@cret\"x"));
        assert_eq!(url.host.as_deref(), Some("db.example"));
        assert_eq!(url.port, Some(3307));
        assert_eq!(url.redacted(), "mysql://bak:***@db.example:3307/");
        let file = url.option_file();
        assert!(file.contains("password=\"s@cret\\\"x\"\n"), "{file}");
        assert!(file.contains("protocol=tcp") && file.contains("port=3307"));

        let sock = Url::parse("mariadb://root@/?socket=/run/mysqld/mysqld.sock").unwrap();
        assert_eq!(sock.socket.as_deref(), Some("/run/mysqld/mysqld.sock"));
        assert!(sock.option_file().contains("protocol=socket"));
        assert_eq!(
            sock.redacted(),
            "mariadb://root@/?socket=/run/mysqld/mysqld.sock"
        );
        let plain = Url::parse("mysql://u@127.0.0.1").unwrap();
        assert!(plain.option_file().contains("port=3306"));
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for (bad, why) in [
            ("mysql://127.0.0.1:3306/", "no user"),
            ("mysql://u@h:port/", "not a number"),
            ("mysql://u@h/app", "names a database"),
            ("mysql://u@h/?ssl=1", "unknown parameter"),
            ("mysql://u:a%0Ab@h/", "line break"),
            ("postgresql://u@h/", "mysql://"),
        ] {
            let e = Url::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(redact("mysql://u:pw@h/"), "mysql://u:***@h/");
        assert!(!redact("mysql://u:pw@h/x").contains("pw"));
    }

    #[test]
    fn the_option_file_is_private() {
        use std::os::unix::fs::MetadataExt;
        let source = Source::new("mysql://u:pw@127.0.0.1:1/").unwrap().unwrap();
        let meta = fs::metadata(&source.defaults).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(!source.defaults_arg().contains("pw"));
        let dir = source.dir.clone();
        drop(source);
        assert!(!dir.exists());
        assert!(Source::new("/some/dir").unwrap().is_none());
    }
}
