//! Registries a test starts itself: `docker-registry` (distribution) on a free 127.0.0.1
//! port with its storage in a temp dir, optionally behind htpasswd basic auth or docker's
//! token auth (a [`TokenServer`] of the kit), and TLS with a CA the kit makes with openssl,
//! optionally requiring a client certificate; stopped and removed when dropped. The shared registry of
//! .ci/run is [`crate::tools::registry`]; [`push_pinned`] puts an image there with skopeo.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{self, run_ok};
use crate::token::{self, TokenServer};
use crate::tools;

/// What a registry asks of its clients.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// This one user and password: htpasswd basic auth, or with `token` bearer tokens.
    pub user: Option<(String, String)>,
    /// Bearer tokens from a token server of the kit that knows `user` (docker's token auth,
    /// as Docker Hub, GHCR and Harbor speak it), instead of basic auth.
    pub token: bool,
    /// HTTPS with a certificate for 127.0.0.1 signed by a CA of the test's own.
    pub tls: bool,
    /// With `tls`: a client certificate signed by that CA is required (`http.tls.clientcas`).
    pub client_certs: bool,
}

pub struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    tls: bool,
    client_certs: bool,
    /// Declared after `child`: dropped once the registry is stopped.
    token: Option<TokenServer>,
}

impl Registry {
    /// Start a registry and wait until it answers; None (the test is skipped) locally when
    /// docker-registry or openssl is missing, a failure under CI.
    pub fn start(options: RegistryOptions) -> Option<Registry> {
        let bin = tools::tool("docker-registry")?;
        if options.tls || options.token {
            tools::tool("openssl")?;
        }
        assert!(
            !options.token || options.user.is_some(),
            "token auth needs a user"
        );
        assert!(
            !options.client_certs || options.tls,
            "client certificates need TLS"
        );
        let dir = crate::dirs::test_dir_for("registry");
        let root = dir.path().to_owned();
        let root = root.as_path();
        std::fs::create_dir(root.join("storage")).unwrap();
        let mut auth = String::new();
        let mut token_server = None;
        if let (true, Some((user, password))) = (options.token, &options.user) {
            let server = TokenServer::start(root, user, password);
            auth = format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                server.realm(),
                token::SERVICE,
                token::ISSUER,
                server.certificate().display()
            );
            token_server = Some(server);
        } else if let Some((user, password)) = &options.user {
            let hash = bcrypt::hash(password, 4).expect("bcrypt");
            std::fs::write(root.join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: bakedb-test\n    path: {}\n",
                root.join("htpasswd").display()
            );
        }
        let mut tls = String::new();
        if options.tls {
            make_ca_and_server_cert(root);
            tls = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                root.join("server.crt").display(),
                root.join("server.key").display()
            );
            if options.client_certs {
                make_client_cert(root);
                tls.push_str(&format!(
                    "    clientcas:\n      - {}\n",
                    root.join("ca.crt").display()
                ));
            }
        }
        // The port may be taken between the check and the bind: a registry that exits at
        // once is started again on another.
        for _ in 0..5 {
            let addr = crate::ports::free_addr();
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n{auth}http:\n  addr: {addr}\n  secret: bakedb-test\n{tls}",
                root.join("storage").display()
            );
            std::fs::write(root.join("config.yml"), config).unwrap();
            let log = std::fs::File::create(root.join("registry.log")).unwrap();
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(root.join("config.yml"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            if wait_ready(&mut child, addr, options.tls) {
                return Some(Registry {
                    child,
                    addr,
                    dir,
                    tls: options.tls,
                    client_certs: options.client_certs,
                    token: token_server,
                });
            }
            let log = std::fs::read_to_string(root.join("registry.log")).unwrap_or_default();
            assert!(
                log.contains("address already in use"),
                "docker-registry on {addr} did not come up:\n{log}"
            );
        }
        panic!("docker-registry found no free port in 5 tries");
    }

    /// HOST:PORT, as a docker:// reference names it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The certificate directory to pass as `--cert-dir` (holds `ca.crt`); TLS only.
    pub fn cert_dir(&self) -> PathBuf {
        assert!(self.tls, "a registry without TLS has no CA");
        self.dir.path().join("certs")
    }

    /// A certificate directory with the CA and the client certificate the registry accepts
    /// (`ca.crt`, `client.cert`, `client.key`); `client_certs` only.
    pub fn client_cert_dir(&self) -> PathBuf {
        assert!(
            self.client_certs,
            "this registry asks for no client certificate"
        );
        self.dir.path().join("client-certs")
    }

    /// The token server its clients are sent to; `token` only.
    pub fn token_server(&self) -> &TokenServer {
        self.token
            .as_ref()
            .expect("this registry has no token auth")
    }

    /// The storage root (`docker/registry/v2/...` below it).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The file a blob's bytes are stored in, to count or damage them.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.storage(), digest)
    }
}

/// Where distribution's file system driver keeps a blob under `storage`.
pub fn blob_path(storage: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// How many blobs a registry's storage holds.
pub fn blob_count(storage: &Path) -> usize {
    let blobs = storage.join("docker/registry/v2/blobs/sha256");
    std::fs::read_dir(&blobs)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|prefix| {
            std::fs::read_dir(prefix.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|blob| blob.path().join("data").is_file())
        .count()
}

/// Ready when `/v2/` answers (plain HTTP) or the port accepts connections (TLS: the
/// registry binds only once its certificate is loaded). False when it exited.
fn wait_ready(child: &mut Child, addr: SocketAddr, tls: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        let up = if tls {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        } else {
            crate::http::request(addr, "GET", "/v2/", &[], b"")
                .is_ok_and(|r| r.status == 200 || r.status == 401)
        };
        if up {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    process::stop(child, libc::SIGKILL, Duration::from_secs(5));
    panic!("docker-registry on {addr} not ready within 30 s");
}

impl Drop for Registry {
    fn drop(&mut self) {
        process::stop(&mut self.child, libc::SIGTERM, Duration::from_secs(10));
    }
}

/// ca.key/ca.crt, a server key and a certificate for 127.0.0.1 signed by the CA, and
/// certs/ca.crt (a certificate directory as containers-certs.d(5) lays one out).
fn make_ca_and_server_cert(dir: &Path) {
    let openssl = || {
        let mut c = Command::new("openssl");
        c.current_dir(dir);
        c
    };
    run_ok(openssl().args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=bakedb test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]));
    run_ok(openssl().args([
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]));
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_ok(openssl().args([
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]));
    std::fs::create_dir(dir.join("certs")).unwrap();
    std::fs::copy(dir.join("ca.crt"), dir.join("certs/ca.crt")).unwrap();
}

/// A client key and certificate signed by the CA of `make_ca_and_server_cert`, and
/// client-certs/ holding them with the CA as containers-certs.d(5) names them.
fn make_client_cert(dir: &Path) {
    let openssl = || {
        let mut c = Command::new("openssl");
        c.current_dir(dir);
        c
    };
    run_ok(openssl().args([
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=bakedb test client",
    ]));
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run_ok(openssl().args([
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.cert",
        "-days",
        "2",
        "-extfile",
        "client.ext",
    ]));
    let certs = dir.join("client-certs");
    std::fs::create_dir(&certs).unwrap();
    for name in ["ca.crt", "client.cert", "client.key"] {
        std::fs::copy(dir.join(name), certs.join(name)).unwrap();
    }
}

/// `skopeo copy` of `reference` (e.g. oci:image:v1, relative to `dir`) to
/// `docker://{repo}:{tag}` over plain HTTP; panics unless the registry then serves the
/// manifest `digest` (the one bakedb built) under that tag. Returns `repo@digest`, the image
/// pinned as a Kubernetes manifest names it.
pub fn push_pinned(dir: &Path, reference: &str, repo: &str, tag: &str, digest: &str) -> String {
    let skopeo = tools::tool("skopeo").expect("skopeo is installed");
    let remote = format!("docker://{repo}:{tag}");
    run_ok(Command::new(&skopeo).current_dir(dir).args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        reference,
        &remote,
    ]));
    let out = run_ok(Command::new(&skopeo).args(["inspect", "--tls-verify=false", &remote]));
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("skopeo inspect {remote}: {e}"));
    assert_eq!(
        inspect["Digest"], digest,
        "the registry serves another manifest under {remote}"
    );
    format!("{repo}@{digest}")
}

/// An auth file (containers-auth.json(5), also docker's config.json) holding `user` and
/// `password` for `host`.
pub fn auth_json(host: &str, user: &str, password: &str) -> String {
    use base64::Engine as _;
    // The same crate bakedb's registry client decodes these files with.
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({ "auths": { host: { "auth": token } } }).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn auth_files_hold_user_and_password_in_standard_base64() {
        let json = super::auth_json("127.0.0.1:5000", "alice", "s3cret");
        assert_eq!(
            json,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0"}}}"#
        );
    }
}
