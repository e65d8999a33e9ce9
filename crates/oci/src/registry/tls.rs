//! TLS as containers/image sets it up: the system's roots plus the CA files of the registry's
//! certificate directory (`--cert-dir DIR`, else the first of
//! `~/.config/containers/certs.d/HOST[:PORT]`, `/etc/containers/certs.d/HOST[:PORT]` and
//! `/etc/docker/certs.d/HOST[:PORT]` that exists): every `*.crt` is a CA, a `NAME.cert` and
//! `NAME.key` pair is the client certificate.

use std::path::{Path, PathBuf};

use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};

/// The certificate directory for `host`, if any.
pub fn cert_dir_for(host: &str, cert_dir: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = cert_dir {
        return Some(dir.to_owned());
    }
    let mut candidates = Vec::new();
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        candidates.push(PathBuf::from(home).join(".config/containers/certs.d"));
    }
    candidates.push(PathBuf::from("/etc/containers/certs.d"));
    candidates.push(PathBuf::from("/etc/docker/certs.d"));
    candidates
        .into_iter()
        .map(|d| d.join(host))
        .find(|d| d.is_dir())
}

/// The TLS settings for one registry, and the client certificate they offer. `verify` false
/// skips certificate checks (`--tls-verify=false`).
pub fn config(
    host: &str,
    cert_dir: Option<&Path>,
    verify: bool,
) -> Result<(TlsConfig, Option<PathBuf>), String> {
    let mut roots: Vec<Certificate<'static>> = Vec::new();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        roots.push(Certificate::from_der(cert.as_ref()).to_owned());
    }
    let mut client = None;
    let mut client_path = None;
    let dir = cert_dir_for(host, cert_dir);
    if let Some(dir) = &dir {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("reading certificate directory {}: {e}", dir.display()))?;
        let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for path in &names {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            let read =
                || std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()));
            match ext {
                "crt" => {
                    let pem = read()?;
                    let mut n = 0;
                    for item in ureq::tls::parse_pem(&pem) {
                        if let Ok(ureq::tls::PemItem::Certificate(c)) = item {
                            roots.push(c);
                            n += 1;
                        }
                    }
                    if n == 0 {
                        return Err(format!(
                            "{} holds no PEM certificate (a CA file in a certificate directory must)",
                            path.display()
                        ));
                    }
                }
                "cert" => {
                    let key_path = path.with_extension("key");
                    let key_pem = std::fs::read(&key_path).map_err(|_| {
                        format!(
                            "client certificate {} has no key {} beside it",
                            path.display(),
                            key_path.display()
                        )
                    })?;
                    let chain: Vec<Certificate<'static>> = ureq::tls::parse_pem(&read()?)
                        .filter_map(|i| match i {
                            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                            _ => None,
                        })
                        .collect();
                    let key = PrivateKey::from_pem(&key_pem)
                        .map_err(|e| format!("reading key {}: {e}", key_path.display()))?;
                    if chain.is_empty() {
                        return Err(format!("{} holds no PEM certificate", path.display()));
                    }
                    client = Some(ClientCert::new_with_certs(&chain, key));
                    client_path = Some(path.clone());
                }
                "key" if !path.with_extension("cert").exists() => {
                    return Err(format!(
                        "key {} has no client certificate {} beside it",
                        path.display(),
                        path.with_extension("cert").display()
                    ));
                }
                _ => {}
            }
        }
    }
    if roots.is_empty() && verify {
        return Err(format!(
            "no trusted CA certificates: the system has none ({}) and no certificate directory adds one",
            native
                .errors
                .first()
                .map_or("none found".to_owned(), |e| e.to_string())
        ));
    }
    let config = TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(std::sync::Arc::new(roots)))
        .client_cert(client)
        .disable_verification(!verify)
        .unversioned_rustls_crypto_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .build();
    Ok((config, client_path))
}
