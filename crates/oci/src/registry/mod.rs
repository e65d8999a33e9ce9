//! The `docker://` transport: a small client of the distribution API (OCI distribution spec)
//! on ureq, synchronous and streaming.
//!
//! One `Client` per registry host holds the connection pool, the authentication challenge
//! the registry answered `GET /v2/` with, the credentials found for it and the bearer tokens
//! it handed out (reused until they expire). Every request goes through `Client::send`, which
//! adds the authorization, answers a 401 once by fetching a token for the scopes the request
//! needs, and retries idempotent requests with exponential backoff on 429, 5xx and dropped
//! connections. Blob uploads (`push`) resume or restart on their own terms; blob reads
//! (`BlobReader`) resume with a Range request and check the digest at the end. Every wait
//! between tries ends early when the caller's stop flag is raised, and no other try follows:
//! a command asked to stop fails its request at once instead of after minutes of backoff.

pub mod auth;
mod push;
pub mod tls;

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use ureq::http::{self, Method, Response, StatusCode};

use crate::digest::Digest;
use crate::error::{Error, RegistryFailure, Result};
use crate::image::{MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_MANIFEST};
use crate::reference::{DOCKER_HUB, DockerRef};
use auth::Challenge;
pub use auth::Credentials;
pub use push::{BlobData, PushStats, Pushed};

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// containers/image's limit on a manifest body: anything larger is not a manifest.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// How a command talks to registries: given once, shared by every reference it opens.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// `--creds`, for one registry host only (credentials are never sent to another).
    pub credentials: Option<(String, Credentials)>,
    /// `--authfile`: read before the default auth files, in place of `$REGISTRY_AUTH_FILE`.
    pub auth_file: Option<PathBuf>,
    /// `--cert-dir`: CA files and client certificate for every registry of the command.
    pub cert_dir: Option<PathBuf>,
    /// `--tls-verify=false`: no certificate checks, and plain HTTP when HTTPS fails.
    pub tls_verify: bool,
    /// Blobs larger than this go up in PATCH chunks of this size; smaller ones in one PUT.
    pub chunk_size: u64,
    /// Tries of one request (or one upload) before its failure is final.
    pub attempts: u32,
    /// The first wait between tries; it doubles each time, up to 8 s.
    pub backoff: Duration,
    /// Raised by the caller (e.g. on SIGTERM) to stop retrying: a wait between tries ends
    /// early and the request fails with the failure it had. A request under way is not cut.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            credentials: None,
            auth_file: None,
            cert_dir: None,
            tls_verify: true,
            chunk_size: 64 << 20,
            attempts: 6,
            backoff: Duration::from_millis(250),
            stop: None,
        }
    }
}

/// The registries one command talks to, a client each, created when first needed.
#[derive(Clone, Default)]
pub struct Registries {
    options: Arc<RegistryOptions>,
    clients: Arc<Mutex<HashMap<String, Arc<Client>>>>,
}

impl Registries {
    pub fn new(options: RegistryOptions) -> Self {
        Registries {
            options: Arc::new(options),
            clients: Arc::default(),
        }
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// The same options with nothing learnt yet: credentials are looked up again and each
    /// registry is asked `GET /v2/` again (after a refusal that may since have been fixed).
    pub fn fresh(&self) -> Registries {
        Registries {
            options: self.options.clone(),
            clients: Arc::default(),
        }
    }

    /// The client for `registry` (HOST[:PORT] as in references), shared by every caller.
    pub fn client(&self, registry: &str) -> Result<Arc<Client>> {
        let mut clients = self.clients.lock().expect("registry clients lock");
        if let Some(c) = clients.get(registry) {
            return Ok(c.clone());
        }
        let client = Arc::new(Client::new(registry, self.options.clone())?);
        clients.insert(registry.to_owned(), client.clone());
        Ok(client)
    }
}

/// A manifest (or index) as a registry served it, its digest checked.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// What HEAD on a manifest tells: enough for a descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// The access one request needs, for a bearer token's scope.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub repository: String,
    pub push: bool,
}

impl Scope {
    pub fn pull(repository: &str) -> Scope {
        Scope {
            repository: repository.to_owned(),
            push: false,
        }
    }

    pub fn push(repository: &str) -> Scope {
        Scope {
            repository: repository.to_owned(),
            push: true,
        }
    }

    fn text(&self) -> String {
        let actions = if self.push { "pull,push" } else { "pull" };
        format!("repository:{}:{actions}", self.repository)
    }
}

pub(crate) enum ReqBody<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// `len` bytes of `path` from `offset`, reopened for every try.
    File {
        path: &'a Path,
        offset: u64,
        len: u64,
    },
}

/// One request: what `send` needs to build it again for every try.
pub(crate) struct Req<'a> {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: ReqBody<'a>,
    pub scopes: Vec<Scope>,
    /// Safe to send again after a failure whose outcome is unknown.
    pub idempotent: bool,
    /// A 401 fetches a new token and tries once more.
    pub renew: bool,
    /// For messages: "pushing blob sha256:…".
    pub what: String,
    pub location: String,
}

impl<'a> Req<'a> {
    pub fn new(method: Method, url: String, what: String, location: String) -> Self {
        Req {
            idempotent: matches!(
                method,
                Method::GET | Method::HEAD | Method::PUT | Method::DELETE
            ),
            renew: true,
            method,
            url,
            headers: Vec::new(),
            body: ReqBody::Empty,
            scopes: Vec::new(),
            what,
            location,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn scope(mut self, scope: Scope) -> Self {
        self.scopes.push(scope);
        self
    }

    pub fn body(mut self, body: ReqBody<'a>) -> Self {
        self.body = body;
        self
    }

    pub fn once(mut self) -> Self {
        self.idempotent = false;
        self
    }

    /// A 401 is the answer: no new token is fetched (the one for these scopes is kept).
    pub fn without_renewal(mut self) -> Self {
        self.renew = false;
        self
    }

    /// A POST that may be sent again: one that starts an upload session (a session a lost
    /// answer leaves behind is abandoned, and the registry removes it in time) or mounts a
    /// blob (mounting it twice is mounting it once).
    pub fn repeatable(mut self) -> Self {
        self.idempotent = true;
        self
    }
}

struct Token {
    value: String,
    expires: Instant,
}

#[derive(Default)]
struct State {
    /// `scheme://host`, once `GET /v2/` answered.
    base: Option<String>,
    challenge: Option<Challenge>,
    /// Per repository (auth files may hold a key per repository), looked up once.
    credentials: HashMap<String, Option<Credentials>>,
    looked: Vec<String>,
    tokens: HashMap<String, Arc<Token>>,
}

/// One registry host.
pub struct Client {
    registry: String,
    /// Docker Hub's API lives on another host than its name.
    api_host: String,
    agent: ureq::Agent,
    options: Arc<RegistryOptions>,
    /// The client certificate TLS offers, for messages.
    client_cert: Option<PathBuf>,
    state: Mutex<State>,
}

/// What a failed try was, to decide whether to try again.
enum Failure {
    /// Connection dropped, reset, timed out: the request may be sent again.
    Transport(String),
    /// TLS refused: trying again cannot help. `client_refused`: the registry's alert says
    /// it did not take this client's certificate, or the lack of one.
    Tls {
        text: String,
        client_refused: bool,
    },
    Other(String),
}

fn classify(e: ureq::Error) -> Failure {
    fn tls(e: &rustls::Error) -> Failure {
        use rustls::AlertDescription as A;
        Failure::Tls {
            text: e.to_string(),
            // What a server answers a client certificate it does not accept, or its absence
            // (Go's servers say bad_certificate for both).
            client_refused: matches!(
                e,
                rustls::Error::AlertReceived(
                    A::BadCertificate
                        | A::CertificateRequired
                        | A::UnknownCA
                        | A::CertificateUnknown
                        | A::CertificateExpired
                        | A::CertificateRevoked
                        | A::UnsupportedCertificate
                )
            ),
        }
    }
    match e {
        ureq::Error::Rustls(r) => tls(&r),
        ureq::Error::Tls(t) => Failure::Tls {
            text: t.to_owned(),
            client_refused: false,
        },
        ureq::Error::Io(io) => match io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(r) => tls(r),
            None => Failure::Transport(io.to_string()),
        },
        ureq::Error::Timeout(t) => Failure::Transport(format!("timed out ({t})")),
        ureq::Error::ConnectionFailed => Failure::Transport("connection failed".into()),
        ureq::Error::HostNotFound => Failure::Other("host not found".into()),
        ureq::Error::Protocol(p) => Failure::Transport(format!("HTTP protocol error: {p}")),
        other => Failure::Other(other.to_string()),
    }
}

/// The registry's own words from an error body: `CODE: message` per error, or the start of
/// the text.
fn registry_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let Some(errors) = v["errors"].as_array()
    {
        let parts: Vec<String> = errors
            .iter()
            .map(|e| {
                let code = e["code"].as_str().unwrap_or("");
                let msg = e["message"].as_str().unwrap_or("");
                format!("{code}: {msg}").trim_matches([' ', ':']).to_owned()
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.trim().to_owned()
}

/// The host arch as OCI platforms name it (Go's GOARCH).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => {
            if cfg!(target_endian = "little") {
                "ppc64le"
            } else {
                "ppc64"
            }
        }
        other => other,
    }
}

impl Client {
    fn new(registry: &str, options: Arc<RegistryOptions>) -> Result<Client> {
        let api_host = if registry == DOCKER_HUB {
            "registry-1.docker.io".to_owned()
        } else {
            registry.to_owned()
        };
        let (tls, client_cert) =
            tls::config(registry, options.cert_dir.as_deref(), options.tls_verify).map_err(
                |reason| Error::Registry {
                    location: format!("docker://{registry}"),
                    what: "setting up TLS".into(),
                    reason,
                    failure: RegistryFailure::Unreachable,
                },
            )?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .user_agent(concat!("bakedb/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(600)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .max_redirects(10)
            .build();
        Ok(Client {
            registry: registry.to_owned(),
            api_host,
            agent: config.new_agent(),
            options,
            client_cert,
            state: Mutex::default(),
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    fn location(&self, repository: &str) -> String {
        format!("docker://{}/{repository}", self.registry)
    }

    fn err(&self, location: &str, what: &str, failure: RegistryFailure, reason: String) -> Error {
        Error::Registry {
            location: location.to_owned(),
            what: what.to_owned(),
            reason,
            failure,
        }
    }

    /// `scheme://host`, asking `GET /v2/` the first time: that answer says whether and how
    /// the registry wants authentication. With `--tls-verify=false` plain HTTP is tried
    /// when HTTPS fails, as containers/image does for an insecure registry.
    pub(crate) fn base(&self) -> Result<String> {
        if let Some(b) = &self.state.lock().expect("registry state").base {
            return Ok(b.clone());
        }
        let location = format!("docker://{}", self.registry);
        let what = "connecting";
        let mut schemes = vec!["https"];
        if !self.options.tls_verify {
            schemes.push("http");
        }
        let mut failures = Vec::new();
        // Something at the address spoke TLS: the advice is then about certificates.
        let mut answered = false;
        for scheme in schemes {
            let base = format!("{scheme}://{}", self.api_host);
            if !failures.is_empty() && self.stopped() {
                // Plain HTTP would be one more connection that may hang until its timeout.
                failures.push(format!("{base}/v2/ not tried: stopping"));
                break;
            }
            let mut attempt = 0;
            let answer = loop {
                attempt += 1;
                match self.agent.get(format!("{base}/v2/")).call() {
                    Ok(resp)
                        if is_retryable(resp.status())
                            && attempt < self.options.attempts
                            && self.wait(attempt, &resp) => {}
                    Ok(resp) => break Ok(resp),
                    Err(e) => match classify(e) {
                        Failure::Transport(_)
                            if attempt < self.options.attempts
                                && self.pause(self.backoff(attempt)) => {}
                        f => break Err(f),
                    },
                }
            };
            match answer {
                Ok(resp) => {
                    let status = resp.status();
                    let challenge = resp
                        .headers()
                        .get_all(http::header::WWW_AUTHENTICATE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .find_map(auth::parse_challenge);
                    if status == StatusCode::OK || status == StatusCode::UNAUTHORIZED {
                        let mut state = self.state.lock().expect("registry state");
                        state.base = Some(base.clone());
                        state.challenge = challenge;
                        return Ok(base);
                    }
                    if is_retryable(status) {
                        failures.push(format!(
                            "{base}/v2/ answered {status} {attempt} times (retried with backoff): the registry is overloaded or failing"
                        ));
                    } else {
                        failures.push(format!(
                            "{base}/v2/ answered {status}: not a registry (the distribution API answers 200 or 401 there)"
                        ));
                    }
                }
                Err(Failure::Tls {
                    text,
                    client_refused: true,
                }) => {
                    answered = true;
                    failures.push(format!(
                        "TLS with {} failed: {}",
                        self.api_host,
                        self.client_cert_refused(&text)
                    ));
                }
                Err(Failure::Tls { text, .. }) => {
                    answered = true;
                    failures.push(format!(
                        "TLS with {} failed: {text}; trust its CA with --cert-dir DIR (DIR/*.crt) or a file in /etc/containers/certs.d/{}/, or use --tls-verify=false for a test registry without TLS",
                        self.api_host, self.registry
                    ))
                }
                Err(Failure::Transport(t) | Failure::Other(t)) => {
                    failures.push(format!("{base}/v2/: {t}"))
                }
            }
        }
        let mut reason = failures.join("; ");
        if !answered {
            reason.push_str("; is the registry running and the address right?");
        }
        Err(self.err(&location, what, RegistryFailure::Unreachable, reason))
    }

    /// The registry ended the handshake over this client's certificate: say which one was
    /// offered, or that none was and where one goes.
    fn client_cert_refused(&self, alert: &str) -> String {
        match &self.client_cert {
            Some(cert) => format!(
                "{alert}: the registry did not accept the client certificate {}; is it signed by a CA the registry trusts, and still valid?",
                cert.display()
            ),
            None => format!(
                "{alert}: the registry asks for a client certificate and none was found; put NAME.cert and NAME.key (a pair signed by a CA it trusts) in --cert-dir DIR or /etc/containers/certs.d/{}/",
                self.registry
            ),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << (attempt.saturating_sub(1)).min(5);
        (self.options.backoff * factor).min(Duration::from_secs(8))
    }

    /// Wait before another try: the registry's Retry-After, else backoff. False when the
    /// caller asked to stop: then there is no other try.
    fn wait(&self, attempt: u32, resp: &Response<ureq::Body>) -> bool {
        self.pause(retry_after(resp).unwrap_or_else(|| self.backoff(attempt)))
    }

    /// Whether the caller's stop flag is raised.
    fn stopped(&self) -> bool {
        self.options
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// Sleep `total` before another try, in short steps that look at the stop flag (a
    /// signal handler raises it, so there is nothing to block on). False when a stop was
    /// asked for, before or meanwhile: then the caller gives up with the failure it has.
    /// The retry loops call it (and `wait`) last in a match guard, so the retry arm is only
    /// taken once the wait ran its course and a stop falls through to the failure arms.
    pub(crate) fn pause(&self, total: Duration) -> bool {
        let Some(stop) = &self.options.stop else {
            std::thread::sleep(total);
            return true;
        };
        let until = Instant::now() + total;
        loop {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    fn credentials(&self, repository: &str) -> Result<Option<Credentials>> {
        if let Some((host, creds)) = &self.options.credentials
            && host == &self.registry
        {
            return Ok(Some(creds.clone()));
        }
        let mut state = self.state.lock().expect("registry state");
        if let Some(c) = state.credentials.get(repository) {
            return Ok(c.clone());
        }
        let mut looked = Vec::new();
        let found = auth::lookup(
            &self.registry,
            repository,
            self.options.auth_file.as_deref(),
            &mut looked,
        )
        .map_err(|reason| {
            self.err(
                &self.location(repository),
                "reading credentials",
                RegistryFailure::Unauthorized,
                reason,
            )
        })?;
        state.looked = looked;
        state
            .credentials
            .insert(repository.to_owned(), found.clone());
        Ok(found)
    }

    /// The Authorization header for `scopes`, fetching a bearer token if needed.
    fn authorization(&self, scopes: &[Scope], location: &str) -> Result<Option<String>> {
        let challenge = self.state.lock().expect("registry state").challenge.clone();
        let repo = scopes.first().map_or("", |s| s.repository.as_str());
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials(repo)?.map(|c| c.basic_header())),
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let mut texts: Vec<String> = scopes.iter().map(Scope::text).collect();
                if let Some(extra) = scope {
                    texts.extend(extra.split(' ').map(str::to_owned));
                }
                texts.sort();
                texts.dedup();
                let key = texts.join(" ");
                if let Some(t) = self.state.lock().expect("registry state").tokens.get(&key)
                    && t.expires > Instant::now()
                {
                    return Ok(Some(format!("Bearer {}", t.value)));
                }
                let token = self.fetch_token(&realm, service.as_deref(), &texts, repo, location)?;
                let value = format!("Bearer {}", token.value);
                self.state
                    .lock()
                    .expect("registry state")
                    .tokens
                    .insert(key, Arc::new(token));
                Ok(Some(value))
            }
        }
    }

    /// GET the token endpoint (docker's token protocol), with the credentials as Basic auth
    /// when there are any; anonymous otherwise (public images on Docker Hub).
    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        repo: &str,
        location: &str,
    ) -> Result<Token> {
        let creds = self.credentials(repo)?;
        let mut url = realm.to_owned();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        let mut add = |k: &str, v: &str| {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.push_str(&percent_encode(v));
            sep = '&';
        };
        if let Some(s) = service {
            add("service", s);
        }
        for s in scopes {
            add("scope", s);
        }
        if let Some(c) = &creds {
            add("account", &c.username);
        }
        let what = "getting a bearer token";
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            let mut req = self.agent.get(&url);
            if let Some(c) = &creds {
                req = req.header("Authorization", c.basic_header());
            }
            match req.call() {
                Ok(r)
                    if is_retryable(r.status())
                        && attempt < self.options.attempts
                        && self.wait(attempt, &r) => {}
                Ok(r) => break r,
                Err(e) => match classify(e) {
                    Failure::Transport(_)
                        if attempt < self.options.attempts && self.pause(self.backoff(attempt)) => {
                    }
                    Failure::Transport(t) | Failure::Tls { text: t, .. } | Failure::Other(t) => {
                        return Err(self.err(
                            location,
                            what,
                            RegistryFailure::Unreachable,
                            format!("the token endpoint {realm}: {t}"),
                        ));
                    }
                },
            }
        };
        let status = resp.status();
        let body = read_limited(resp, 1 << 20).unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.err(
                location,
                what,
                RegistryFailure::Unauthorized,
                self.refusal(
                    &creds,
                    repo,
                    &format!(
                        "the token endpoint {realm} answered {status}: {}",
                        registry_message(&body)
                    ),
                ),
            ));
        }
        if !status.is_success() {
            let (failure, times) = if is_retryable(status) {
                (RegistryFailure::Unreachable, format!(" {attempt} times"))
            } else {
                (RegistryFailure::Rejected, String::new())
            };
            return Err(self.err(
                location,
                what,
                failure,
                format!(
                    "the token endpoint {realm} answered {status}{times}: {}",
                    registry_message(&body)
                ),
            ));
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let value = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                self.err(
                    location,
                    what,
                    RegistryFailure::Rejected,
                    format!("the token endpoint {realm} answered no token"),
                )
            })?;
        // docker's token spec: 60 s when not given; renew a little early.
        let secs = v["expires_in"].as_u64().unwrap_or(60).max(60);
        Ok(Token {
            value: value.to_owned(),
            expires: Instant::now() + Duration::from_secs(secs.saturating_sub(10)),
        })
    }

    /// The sentence for refused or missing credentials: who was refused, and what to do.
    fn refusal(&self, creds: &Option<Credentials>, repo: &str, answer: &str) -> String {
        match creds {
            Some(c) => format!(
                "{answer}: the registry refused the credentials of user {:?} (from {}); check them, or log in again with `skopeo login {}`",
                c.username, c.origin, self.registry
            ),
            None => {
                let looked = self.state.lock().expect("registry state").looked.join(", ");
                format!(
                    "{answer}: the registry requires credentials for {}/{repo} and none were found (looked at --creds and {looked}); pass --creds USER:PASS or log in with `skopeo login {}`",
                    self.registry, self.registry
                )
            }
        }
    }

    /// Send `req`, with authorization, answering one 401 with a new token, and trying again
    /// (if it is idempotent) on 429, 5xx and dropped connections.
    pub(crate) fn send(&self, req: &Req) -> Result<Response<ureq::Body>> {
        let base = self.base()?;
        let url = if req.url.starts_with("http://") || req.url.starts_with("https://") {
            req.url.clone()
        } else {
            format!("{base}{}", req.url)
        };
        // Authorization goes only to the registry itself, never to a host an upload URL
        // or redirect points at.
        let same_host = url.starts_with(&format!("{base}/"));
        let mut attempt = 0;
        let mut renewed = false;
        loop {
            attempt += 1;
            let authorization = if same_host {
                self.authorization(&req.scopes, &req.location)?
            } else {
                None
            };
            let mut builder = http::Request::builder()
                .method(req.method.clone())
                .uri(&url);
            for (k, v) in &req.headers {
                builder = builder.header(*k, v);
            }
            if let Some(a) = &authorization {
                builder = builder.header("Authorization", a);
            }
            let result = match &req.body {
                ReqBody::Empty => {
                    if matches!(req.method, Method::PUT | Method::POST | Method::PATCH) {
                        builder = builder.header("Content-Length", "0");
                    }
                    builder
                        .body(())
                        .map_err(ureq::Error::Http)
                        .and_then(|r| self.agent.run(r))
                }
                ReqBody::Bytes(b) => builder
                    .header("Content-Length", b.len().to_string())
                    .body(*b)
                    .map_err(ureq::Error::Http)
                    .and_then(|r| self.agent.run(r)),
                ReqBody::File { path, offset, len } => {
                    let mut file = open_at(path, *offset).map_err(Error::io("reading", *path))?;
                    let mut limited = (&mut file).take(*len);
                    builder
                        .header("Content-Length", len.to_string())
                        .body(ureq::SendBody::from_reader(&mut limited))
                        .map_err(ureq::Error::Http)
                        .and_then(|r| self.agent.run(r))
                }
            };
            let more = attempt < self.options.attempts;
            match result {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !renewed && req.renew => {
                    renewed = true;
                    attempt -= 1;
                    self.learn_challenge(&resp, &req.scopes);
                    let _ = read_limited(resp, 64 << 10);
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    let creds =
                        self.credentials(req.scopes.first().map_or("", |s| s.repository.as_str()))?;
                    let body = read_limited(resp, 64 << 10).unwrap_or_default();
                    return Err(self.err(
                        &req.location,
                        &req.what,
                        RegistryFailure::Unauthorized,
                        self.refusal(
                            &creds,
                            req.scopes.first().map_or("", |s| s.repository.as_str()),
                            &format!("401 {}", registry_message(&body)),
                        ),
                    ));
                }
                Ok(resp)
                    if req.idempotent
                        && more
                        && is_retryable(resp.status())
                        && self.wait(attempt, &resp) => {}
                Ok(resp) if req.idempotent && attempt > 1 && is_retryable(resp.status()) => {
                    let status = resp.status();
                    let body = read_limited(resp, 64 << 10).unwrap_or_default();
                    return Err(self.err(
                        &req.location,
                        &req.what,
                        RegistryFailure::Unreachable,
                        format!(
                            "the registry answered {status} {attempt} times (retried with backoff): {}",
                            registry_message(&body)
                        ),
                    ));
                }
                Ok(resp) => return Ok(resp),
                Err(e) => match classify(e) {
                    Failure::Transport(_)
                        if req.idempotent && more && self.pause(self.backoff(attempt)) => {}
                    Failure::Transport(t) => {
                        return Err(self.err(
                            &req.location,
                            &req.what,
                            RegistryFailure::Unreachable,
                            format!("{t} ({attempt} tries)"),
                        ));
                    }
                    Failure::Tls {
                        text,
                        client_refused,
                    } => {
                        return Err(self.err(
                            &req.location,
                            &req.what,
                            RegistryFailure::Unreachable,
                            if client_refused {
                                format!("TLS: {}", self.client_cert_refused(&text))
                            } else {
                                format!("TLS: {text}")
                            },
                        ));
                    }
                    Failure::Other(t) => {
                        return Err(self.err(
                            &req.location,
                            &req.what,
                            RegistryFailure::Unreachable,
                            t,
                        ));
                    }
                },
            }
        }
    }

    /// A 401 names the challenge again, maybe with the scope a token lacks: remember it
    /// and forget the tokens for these scopes, so the next try fetches a new one.
    fn learn_challenge(&self, resp: &Response<ureq::Body>, scopes: &[Scope]) {
        let challenge = resp
            .headers()
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(auth::parse_challenge);
        let mut state = self.state.lock().expect("registry state");
        if let Some(c) = challenge {
            // The scope of one answer is for that request; keep the realm and service.
            state.challenge = Some(match c {
                Challenge::Bearer { realm, service, .. } => Challenge::Bearer {
                    realm,
                    service,
                    scope: None,
                },
                other => other,
            });
        }
        let mut texts: Vec<String> = scopes.iter().map(Scope::text).collect();
        texts.sort();
        state.tokens.remove(&texts.join(" "));
    }

    /// An answer that is not what the protocol says, as an error with the registry's words.
    pub(crate) fn unexpected(
        &self,
        resp: Response<ureq::Body>,
        req_what: &str,
        location: &str,
    ) -> Error {
        let status = resp.status();
        let body = read_limited(resp, 64 << 10).unwrap_or_default();
        let failure = match status {
            StatusCode::NOT_FOUND => RegistryFailure::NotFound,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryFailure::Unauthorized,
            s if is_retryable(s) => RegistryFailure::Unreachable,
            _ => RegistryFailure::Rejected,
        };
        let mut reason = format!("the registry answered {status}");
        let words = registry_message(&body);
        if !words.is_empty() {
            reason.push_str(&format!(": {words}"));
        }
        if status == StatusCode::FORBIDDEN {
            reason.push_str("; the credentials lack permission for this repository");
        }
        self.err(location, req_what, failure, reason)
    }

    /// Whether this registry accepts pushes to `repository` with the credentials found: an
    /// upload is started and cancelled, before any work is done.
    pub fn check_push(&self, repository: &str) -> Result<()> {
        let location = self.location(repository);
        let what = "checking push access";
        let req = Req::new(
            Method::POST,
            format!("/v2/{repository}/blobs/uploads/"),
            what.into(),
            location.clone(),
        )
        .scope(Scope::push(repository))
        .repeatable();
        let resp = self.send(&req)?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.unexpected(resp, what, &location));
        }
        if let Some(upload) = header(&resp, "location") {
            self.cancel_upload(repository, &upload);
        }
        Ok(())
    }

    /// Best effort: an abandoned upload session is left to the registry's own clean-up
    /// when the DELETE fails.
    pub(crate) fn cancel_upload(&self, repository: &str, upload: &str) {
        // distribution wants the "*" action for any DELETE, which a push token lacks: a
        // 401 would throw away the push token and fetch the same one again, for nothing.
        let req = Req::new(
            Method::DELETE,
            upload.to_owned(),
            "cancelling an upload".into(),
            self.location(repository),
        )
        .scope(Scope::push(repository))
        .once()
        .without_renewal();
        if let Ok(resp) = self.send(&req) {
            let _ = read_limited(resp, 64 << 10);
        }
    }

    const ACCEPT: &'static str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

    /// HEAD a manifest: its digest, size and media type, or None when the registry has no
    /// such tag or digest.
    pub fn head_manifest(&self, reference: &DockerRef) -> Result<Option<Descriptor>> {
        let what = format!("looking up {}", reference.api_reference());
        let location = reference.location();
        let req = Req::new(
            Method::HEAD,
            format!(
                "/v2/{}/manifests/{}",
                reference.repository,
                reference.api_reference()
            ),
            what.clone(),
            location.clone(),
        )
        .header("Accept", Self::ACCEPT)
        .scope(Scope::pull(&reference.repository));
        let resp = self.send(&req)?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.unexpected(resp, &what, &location));
        }
        let digest = header(&resp, "docker-content-digest")
            .and_then(|d| d.parse::<Digest>().ok())
            .or(reference.digest);
        let size = header(&resp, "content-length").and_then(|l| l.parse().ok());
        let media_type = header(&resp, "content-type").unwrap_or_default();
        match (digest, size) {
            (Some(digest), Some(size)) => Ok(Some(Descriptor {
                digest,
                size,
                media_type: media_type.split(';').next().unwrap_or("").trim().to_owned(),
            })),
            // A registry that does not say the digest on HEAD: ask for the manifest itself.
            _ => {
                let m = self.get_manifest(reference)?;
                Ok(Some(Descriptor {
                    digest: m.digest,
                    size: m.bytes.len() as u64,
                    media_type: m.media_type,
                }))
            }
        }
    }

    /// GET a manifest or index, its digest checked: against the reference's digest, and
    /// against the Docker-Content-Digest the registry sent. None: no such tag or digest.
    pub fn fetch_manifest(&self, reference: &DockerRef) -> Result<Option<Manifest>> {
        let what = format!("reading manifest {}", reference.api_reference());
        let location = reference.location();
        let req = Req::new(
            Method::GET,
            format!(
                "/v2/{}/manifests/{}",
                reference.repository,
                reference.api_reference()
            ),
            what.clone(),
            location.clone(),
        )
        .header("Accept", Self::ACCEPT)
        .scope(Scope::pull(&reference.repository));
        let resp = self.send(&req)?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.unexpected(resp, &what, &location));
        }
        let claimed = header(&resp, "docker-content-digest");
        let content_type = header(&resp, "content-type").unwrap_or_default();
        let bytes = read_limited(resp, MAX_MANIFEST_BYTES + 1).map_err(|e| {
            self.err(
                &location,
                &what,
                RegistryFailure::Unreachable,
                e.to_string(),
            )
        })?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(self.err(
                &location,
                &what,
                RegistryFailure::Rejected,
                format!("the manifest is larger than {MAX_MANIFEST_BYTES} bytes"),
            ));
        }
        let digest = Digest::of(&bytes);
        let expected = reference
            .digest
            .map(|d| d.to_string())
            .or(claimed.filter(|c| c.starts_with("sha256:")));
        if let Some(expected) = expected
            && expected != digest.to_string()
        {
            return Err(self.err(
                &location,
                &what,
                RegistryFailure::Corrupt,
                format!(
                    "the registry served a manifest with digest {digest} ({} bytes) for {expected}: it is corrupt or was changed in transit; refused",
                    bytes.len()
                ),
            ));
        }
        let media_type = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
            .unwrap_or_else(|| {
                content_type
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            });
        Ok(Some(Manifest {
            bytes,
            media_type,
            digest,
        }))
    }

    /// `fetch_manifest`, a missing one being an error.
    pub fn get_manifest(&self, reference: &DockerRef) -> Result<Manifest> {
        self.fetch_manifest(reference)?
            .ok_or_else(|| self.not_found(reference))
    }

    /// "no such tag", with the first tags the repository has, as for a layout.
    pub fn not_found(&self, reference: &DockerRef) -> Error {
        match &reference.tag {
            Some(tag) => {
                let available = match self.list_tags(&reference.repository, 20) {
                    Ok((tags, more)) if tags.is_empty() => {
                        let _ = more;
                        "none: the repository is empty or does not exist".to_owned()
                    }
                    Ok((tags, more)) => {
                        let mut s = tags.join(", ");
                        if more {
                            s.push_str(" and more");
                        }
                        s
                    }
                    Err(_) => "unknown".into(),
                };
                Error::TagNotFound {
                    location: reference.location(),
                    tag: tag.clone(),
                    available,
                }
            }
            None => self.err(
                &reference.location(),
                "reading the manifest",
                RegistryFailure::NotFound,
                format!("the registry has no manifest {}", reference.api_reference()),
            ),
        }
    }

    /// Up to `max` tags of a repository (the first page), and whether there are more.
    pub fn list_tags(&self, repository: &str, max: usize) -> Result<(Vec<String>, bool)> {
        let what = "listing tags";
        let location = self.location(repository);
        let req = Req::new(
            Method::GET,
            format!("/v2/{repository}/tags/list?n={}", max + 1),
            what.into(),
            location.clone(),
        )
        .scope(Scope::pull(repository));
        let resp = self.send(&req)?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok((Vec::new(), false));
        }
        if !resp.status().is_success() {
            return Err(self.unexpected(resp, what, &location));
        }
        let body = read_limited(resp, 4 << 20).unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut tags: Vec<String> = v["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        let more = tags.len() > max;
        tags.truncate(max);
        Ok((tags, more))
    }

    /// PUT a manifest under a tag or its digest; returns the digest the registry stored it
    /// under, which must be the manifest's own.
    pub fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let what = format!("writing manifest {digest} as {reference}");
        let location = self.location(repository);
        let req = Req::new(
            Method::PUT,
            format!("/v2/{repository}/manifests/{reference}"),
            what.clone(),
            location.clone(),
        )
        .header("Content-Type", media_type)
        .body(ReqBody::Bytes(bytes))
        .scope(Scope::push(repository));
        let resp = self.send(&req)?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            return Err(self.unexpected(resp, &what, &location));
        }
        if let Some(stored) = header(&resp, "docker-content-digest")
            && stored != digest.to_string()
        {
            return Err(self.err(
                &location,
                &what,
                RegistryFailure::Rejected,
                format!("the registry stored it as {stored}, not as its digest {digest}"),
            ));
        }
        let _ = read_limited(resp, 64 << 10);
        Ok(digest)
    }

    /// Point `tag` at the manifest `digest` of the same repository (move or add a tag): the
    /// manifest is read, checked and written again under the tag.
    pub fn tag(&self, repository: &str, digest: &Digest, tag: &str) -> Result<()> {
        let reference = DockerRef {
            registry: self.registry.clone(),
            repository: repository.to_owned(),
            tag: None,
            digest: Some(*digest),
        };
        let m = self.get_manifest(&reference)?;
        self.put_manifest(repository, tag, &m.bytes, &m.media_type)?;
        Ok(())
    }

    /// HEAD a blob: its size if the repository has it.
    pub fn has_blob(&self, repository: &str, digest: &Digest) -> Result<Option<u64>> {
        let what = format!("looking for blob {digest}");
        let location = self.location(repository);
        let req = Req::new(
            Method::HEAD,
            format!("/v2/{repository}/blobs/{digest}"),
            what.clone(),
            location.clone(),
        )
        .scope(Scope::pull(repository));
        let resp = self.send(&req)?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(
                header(&resp, "content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0),
            )),
            _ => Err(self.unexpected(resp, &what, &location)),
        }
    }

    /// A blob's bytes as served, streamed; the digest is checked when the stream ends, and
    /// a dropped connection resumes with a Range request.
    pub fn open_blob(self: &Arc<Self>, repository: &str, digest: &Digest) -> Result<BlobReader> {
        let mut reader = BlobReader {
            client: self.clone(),
            repository: repository.to_owned(),
            digest: *digest,
            body: None,
            hasher: Sha256::new(),
            position: 0,
            resumes: 0,
            done: false,
        };
        reader.connect().map_err(|e| match e.into_inner() {
            Some(inner) => match inner.downcast::<Error>() {
                Ok(e) => *e,
                Err(other) => self.err(
                    &self.location(repository),
                    "reading blob",
                    RegistryFailure::Unreachable,
                    other.to_string(),
                ),
            },
            None => self.err(
                &self.location(repository),
                "reading blob",
                RegistryFailure::Unreachable,
                "failed".into(),
            ),
        })?;
        Ok(reader)
    }

    /// Link a blob of repository `from` into `repository` on the same registry without
    /// sending it (cross-repository mount). False when the registry would not: the upload
    /// it started instead is cancelled.
    pub fn mount_blob(&self, repository: &str, digest: &Digest, from: &str) -> Result<bool> {
        let what = format!("mounting blob {digest} from {from}");
        let location = self.location(repository);
        let req = Req::new(
            Method::POST,
            format!(
                "/v2/{repository}/blobs/uploads/?mount={digest}&from={}",
                percent_encode(from)
            ),
            what.clone(),
            location.clone(),
        )
        .scope(Scope::push(repository))
        .scope(Scope::pull(from))
        .repeatable();
        let resp = self.send(&req)?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                if let Some(upload) = header(&resp, "location") {
                    self.cancel_upload(repository, &upload);
                }
                Ok(false)
            }
            _ => Err(self.unexpected(resp, &what, &location)),
        }
    }
}

/// A 429's or 503's Retry-After in seconds (capped at 60 s); the HTTP-date form is not used
/// by registries and is ignored (backoff then).
pub(crate) fn retry_after(resp: &Response<ureq::Body>) -> Option<Duration> {
    resp.headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(60)))
}

fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

pub(crate) fn header(resp: &Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

pub(crate) fn read_limited(resp: Response<ureq::Body>, limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    resp.into_body()
        .into_reader()
        .take(limit)
        .read_to_end(&mut out)?;
    Ok(out)
}

fn open_at(path: &Path, offset: u64) -> io::Result<std::fs::File> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path)?;
    f.seek(io::SeekFrom::Start(offset))?;
    Ok(f)
}

/// Query-string encoding of everything but unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A blob being read from a registry. Its digest is checked when the stream ends: a
/// registry serving other bytes gets an InvalidData error instead of the end of the stream.
pub struct BlobReader {
    client: Arc<Client>,
    repository: String,
    digest: Digest,
    body: Option<ureq::BodyReader<'static>>,
    hasher: Sha256,
    position: u64,
    resumes: u32,
    done: bool,
}

impl BlobReader {
    /// (Re)open the stream at `position`: a Range request after a dropped connection.
    fn connect(&mut self) -> io::Result<()> {
        let client = &self.client;
        let location = client.location(&self.repository);
        let what = format!("reading blob {}", self.digest);
        let mut req = Req::new(
            Method::GET,
            format!("/v2/{}/blobs/{}", self.repository, self.digest),
            what.clone(),
            location.clone(),
        )
        .scope(Scope::pull(&self.repository));
        if self.position > 0 {
            req = req.header("Range", format!("bytes={}-", self.position));
        }
        let resp = client.send(&req).map_err(io::Error::other)?;
        let status = resp.status();
        let mut reader = match status {
            StatusCode::PARTIAL_CONTENT if self.position > 0 => resp.into_body().into_reader(),
            StatusCode::OK => {
                let mut r = resp.into_body().into_reader();
                // The registry ignored the Range: skip what was read already.
                if self.position > 0 {
                    let skipped = io::copy(&mut (&mut r).take(self.position), &mut io::sink())?;
                    if skipped != self.position {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the blob is shorter on a second read",
                        ));
                    }
                }
                r
            }
            StatusCode::NOT_FOUND => {
                return Err(io::Error::other(Error::MissingBlob {
                    expected: self.digest.to_string(),
                    what: "blob".into(),
                    location,
                }));
            }
            _ => return Err(io::Error::other(client.unexpected(resp, &what, &location))),
        };
        let _ = &mut reader;
        self.body = Some(reader);
        Ok(())
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        loop {
            let body = match self.body.as_mut() {
                Some(b) => b,
                None => {
                    self.connect()?;
                    continue;
                }
            };
            match body.read(buf) {
                Ok(0) => {
                    self.done = true;
                    let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
                    if actual != self.digest {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{}: the registry served blob {} as {} bytes with digest {actual}: it is corrupt or was changed in transit; refused",
                                self.client.location(&self.repository),
                                self.digest,
                                self.position
                            ),
                        ));
                    }
                    return Ok(0);
                }
                Ok(n) => {
                    self.hasher.update(&buf[..n]);
                    self.position += n as u64;
                    return Ok(n);
                }
                Err(e) if self.resumes + 1 < self.client.options.attempts => {
                    self.resumes += 1;
                    self.body = None;
                    if !self.client.pause(self.client.backoff(self.resumes)) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Pick the image for this machine's platform from an index or manifest list, as skopeo
/// does (linux and the host's architecture).
pub fn pick_platform(index: &Value, location: &str) -> Result<(Digest, String)> {
    let arch = host_architecture();
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let mut seen = Vec::new();
    for m in &manifests {
        let os = m["platform"]["os"].as_str().unwrap_or("");
        let a = m["platform"]["architecture"].as_str().unwrap_or("");
        let v = m["platform"]["variant"].as_str().unwrap_or("");
        seen.push(if v.is_empty() {
            format!("{os}/{a}")
        } else {
            format!("{os}/{a}/{v}")
        });
        let variant_ok = arch != "arm64" || v.is_empty() || v == "v8";
        if os == "linux" && a == arch && variant_ok {
            let media_type = m["mediaType"].as_str().unwrap_or("").to_owned();
            if media_type != MEDIA_TYPE_MANIFEST && media_type != MEDIA_TYPE_DOCKER_MANIFEST {
                continue;
            }
            if let Some(d) = m["digest"].as_str().and_then(|d| d.parse().ok()) {
                return Ok((d, media_type));
            }
        }
    }
    Err(Error::Registry {
        location: location.to_owned(),
        what: "choosing a platform".into(),
        reason: format!(
            "the image index has no linux/{arch} image (it has: {}); name one by its digest, docker://…@sha256:…",
            if seen.is_empty() {
                "none".to_owned()
            } else {
                seen.join(", ")
            }
        ),
        failure: RegistryFailure::NotFound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_are_picked_like_skopeo() {
        let index = serde_json::json!({"manifests": [
            {"mediaType": MEDIA_TYPE_MANIFEST, "digest": format!("sha256:{}", "1".repeat(64)), "size": 1, "platform": {"os": "linux", "architecture": "s390x"}},
            {"mediaType": MEDIA_TYPE_MANIFEST, "digest": format!("sha256:{}", "2".repeat(64)), "size": 1, "platform": {"os": "windows", "architecture": host_architecture()}},
            {"mediaType": MEDIA_TYPE_MANIFEST, "digest": format!("sha256:{}", "3".repeat(64)), "size": 1, "platform": {"os": "linux", "architecture": host_architecture()}},
        ]});
        let (d, _) = pick_platform(&index, "x").unwrap();
        assert_eq!(d.to_string(), format!("sha256:{}", "3".repeat(64)));
        let err = pick_platform(&serde_json::json!({"manifests": []}), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no linux/"), "{err}");
    }

    #[test]
    fn registry_errors_are_quoted() {
        assert_eq!(
            registry_message(br#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#),
            "DENIED: requested access to the resource is denied"
        );
        assert_eq!(registry_message(b"plain text\n"), "plain text");
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
    }

    /// With the stop flag raised a failed connection is not tried again, and plain HTTP is
    /// not tried after HTTPS: one connection, where six per scheme would take ~15 s.
    #[test]
    fn a_raised_stop_flag_ends_the_retries() {
        let listener = bakedb_testkit::proxy::ClosingListener::start();
        let registries = Registries::new(RegistryOptions {
            tls_verify: false,
            stop: Some(Arc::new(AtomicBool::new(true))),
            ..RegistryOptions::default()
        });
        let err = registries
            .client(&listener.host())
            .unwrap()
            .base()
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Registry {
                    failure: RegistryFailure::Unreachable,
                    reason,
                    ..
                } if reason.contains("not tried: stopping")
            ),
            "{err}"
        );
        assert_eq!(listener.accepted(), 1);
    }
}
