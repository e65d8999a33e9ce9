//! A token server of docker's token protocol (distribution's docs/spec/auth/token.md), for a
//! test's registry to send its clients to: `GET /token?service=…&scope=…` with the user's
//! Basic credentials answers `{"token": JWT}` granting what each scope asks, a 401 for
//! anyone else. The JWT is RS256, signed with `openssl dgst` by a key whose self-signed
//! certificate rides in the header's `x5c`; the registry trusts that certificate through its
//! `rootcertbundle`. It counts the tokens it hands out per scope, so a test can tell a
//! client reused them. Stopped when dropped.

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use base64::Engine as _;

use crate::http;
use crate::process::run_ok;

/// The `service` and `issuer` a registry of the kit is configured with.
pub const SERVICE: &str = "bakedb-test-registry";
pub const ISSUER: &str = "bakedb-test-token-issuer";

pub struct TokenServer {
    addr: SocketAddr,
    certificate: PathBuf,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

struct State {
    user: String,
    password: String,
    key: PathBuf,
    /// The certificate's DER in standard base64, as `x5c` holds it.
    x5c: String,
    /// Tokens handed out, by the request's scopes (space-separated, as asked).
    issued: Mutex<BTreeMap<String, u64>>,
    refused: AtomicU64,
    stop: AtomicBool,
}

impl TokenServer {
    /// Make a signing key and certificate in `dir` and serve tokens to `user`.
    pub fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        let key = dir.join("token.key");
        let certificate = dir.join("token.crt");
        run_ok(Command::new("openssl").current_dir(dir).args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "token.key",
            "-out",
            "token.crt",
            "-days",
            "2",
            "-subj",
            "/CN=bakedb test token issuer",
        ]));
        let pem = std::fs::read_to_string(&certificate).unwrap();
        let x5c: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .concat();
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the token server");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            user: user.to_owned(),
            password: password.to_owned(),
            key,
            x5c,
            issued: Mutex::default(),
            refused: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_state = state.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if accept_state.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let state = accept_state.clone();
                std::thread::spawn(move || {
                    let _ = answer(conn, &state);
                });
            }
        });
        TokenServer {
            addr,
            certificate,
            state,
            accept: Some(accept),
        }
    }

    /// The URL registries name as the challenge's realm.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The certificate a registry must trust (its `rootcertbundle`).
    pub fn certificate(&self) -> &Path {
        &self.certificate
    }

    /// Tokens handed out so far, by the scopes they were asked for.
    pub fn issued(&self) -> BTreeMap<String, u64> {
        self.state.issued.lock().unwrap().clone()
    }

    /// Requests refused for want of the right credentials.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// One request per connection: a token, or a 401.
fn answer(conn: TcpStream, state: &State) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let Some(head) = http::read_request(&mut reader)? else {
        return Ok(());
    };
    http::discard_body(&head, &mut reader)?;
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    let params: Vec<(String, String)> = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    let param = |name: &'static str| {
        params
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v)
    };
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", state.user, state.password))
    );
    let (status, body) = if head.method != "GET" || path != "/token" {
        ("404 Not Found", r#"{"details":"GET /token"}"#.to_owned())
    } else if head.header("authorization") != Some(expected.as_str()) {
        state.refused.fetch_add(1, Ordering::SeqCst);
        (
            "401 Unauthorized",
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"incorrect username or password"}]}"#
                .to_owned(),
        )
    } else {
        let scopes: Vec<&String> = param("scope").collect();
        let service = param("service").next().cloned().unwrap_or_default();
        let token = sign(state, &service, &scopes);
        let key = scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        *state.issued.lock().unwrap().entry(key).or_default() += 1;
        (
            "200 OK",
            serde_json::json!({"token": token, "access_token": token, "expires_in": 300})
                .to_string(),
        )
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A JWT granting `scopes` (`repository:NAME:ACTIONS`) to the user, for `service`.
fn sign(state: &State, service: &str, scopes: &[&String]) -> String {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let b64url = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(serde_json::json!({
                "type": kind,
                "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [state.x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": state.user,
        "aud": service,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::SeqCst)),
        "access": access,
    });
    let signed = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&state.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running openssl dgst");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(signed.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "openssl dgst -sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{signed}.{}", b64url(&out.stdout))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&text[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            super::percent_decode("repository%3Aa%2Fb%3Apull%2Cpush"),
            "repository:a/b:pull,push"
        );
        assert_eq!(super::percent_decode("a+b%2"), "a b%2");
    }
}
