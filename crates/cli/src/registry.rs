//! The flags every command that takes an image reference shares for `docker://` ones, as
//! skopeo spells them: `--creds`, `--authfile`, `--cert-dir`, `--tls-verify`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, anyhow};
use bakedb_oci::reference::ImageRef;
use bakedb_oci::registry::{Credentials, Registries, RegistryOptions};
use clap::Args;

use crate::exit::{Code, StageExt};

#[derive(Args, Clone, Default)]
pub struct RegistryArgs {
    /// Registry credentials USER[:PASS] (default: the auth files skopeo and podman read).
    #[arg(
        long,
        value_name = "USER[:PASS]",
        long_help = "Credentials for the registry of the command's docker:// reference: the --output's for `bakedb build` (and a --base or --from on that same registry), REF's for verify and inspect. They are never sent to another registry. Without it, credentials are looked up as skopeo and podman do: --authfile or $REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json; then $XDG_CONFIG_HOME/containers/auth.json (~/.config/containers/auth.json), $DOCKER_CONFIG/config.json (~/.docker/config.json) and ~/.dockercfg, each with its credHelpers."
    )]
    pub creds: Option<String>,
    /// Auth file to read first (default: $REGISTRY_AUTH_FILE), as skopeo's --authfile.
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,
    /// Directory of CA certificates (*.crt) and a client pair (*.cert, *.key) for registries.
    #[arg(
        long,
        value_name = "DIR",
        long_help = "Certificate directory for the registries of the command, as containers-certs.d(5) lays one out: every *.crt is a trusted CA (besides the system's), NAME.cert with NAME.key is the client certificate. Default: ~/.config/containers/certs.d/HOST[:PORT], /etc/containers/certs.d/HOST[:PORT] or /etc/docker/certs.d/HOST[:PORT], the first that exists."
    )]
    pub cert_dir: Option<PathBuf>,
    /// Verify registries' TLS certificates; false also allows plain HTTP (test registries).
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        long_help = "Whether to verify the registries' TLS certificates (default true). --tls-verify=false skips the check and, when HTTPS fails, talks plain HTTP, as skopeo does: for test registries only."
    )]
    pub tls_verify: bool,
    /// Not a flag: `bakedb watch` raises it on SIGTERM so the registry clients stop retrying.
    #[arg(skip)]
    pub stop: Option<Arc<AtomicBool>>,
}

/// Blob uploads larger than this go in PATCH chunks (`BAKEDB_REGISTRY_CHUNK_BYTES`).
const CHUNK_ENV: &str = "BAKEDB_REGISTRY_CHUNK_BYTES";

impl RegistryArgs {
    /// The registries of one command. `--creds` goes to `creds_for`, the registry the
    /// command writes to or reads.
    pub fn registries(&self, creds_for: Option<&ImageRef>) -> Result<Registries> {
        let mut options = RegistryOptions {
            auth_file: self.authfile.clone(),
            cert_dir: self.cert_dir.clone(),
            tls_verify: self.tls_verify,
            stop: self.stop.clone(),
            ..RegistryOptions::default()
        };
        if let Ok(text) = std::env::var(CHUNK_ENV) {
            options.chunk_size = text
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| anyhow!("{CHUNK_ENV}={text:?} is not a positive number of bytes"))
                .stage(Code::Usage, || format!("reading {CHUNK_ENV}"))?;
        }
        if let Some(text) = &self.creds {
            let creds = Credentials::parse(text)
                .map_err(|e| anyhow!(e))
                .stage(Code::Usage, || "parsing --creds".into())?;
            let host = match creds_for {
                Some(ImageRef::Docker(r)) => r.registry.clone(),
                _ => {
                    return Err(anyhow!(
                        "--creds is for a docker:// reference, and there is none here to send them to"
                    ))
                    .stage(Code::Usage, || "parsing --creds".into());
                }
            };
            options.credentials = Some((host, creds));
        }
        Ok(Registries::new(options))
    }
}
