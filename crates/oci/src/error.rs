//! One error type for the crate; every variant names the path, digest or reference involved so
//! the binary can print a message that says what failed and where without extra context.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {expected} ({what}) is missing from {location}")]
    MissingBlob {
        expected: String,
        what: String,
        location: String,
    },
    #[error(
        "blob {expected} ({what}) in {location} does not match its descriptor: content has digest {actual} and {actual_size} bytes, descriptor says {expected_size} bytes"
    )]
    DigestMismatch {
        expected: String,
        what: String,
        location: String,
        actual: String,
        expected_size: u64,
        actual_size: u64,
    },
    #[error(
        "layer {layer} in {location}: uncompressed content has diff_id {actual}, config lists {expected}"
    )]
    DiffIdMismatch {
        layer: String,
        location: String,
        expected: String,
        actual: String,
    },
    #[error("layer {layer} in {location}: {media_type} stream is corrupt or truncated")]
    CorruptStream {
        layer: String,
        location: String,
        media_type: String,
        #[source]
        source: io::Error,
    },
    #[error("{location}: unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType {
        location: String,
        what: String,
        media_type: String,
    },
    #[error("{location}: {what} is not valid: {reason}")]
    Invalid {
        location: String,
        what: String,
        reason: String,
    },
    #[error("{location}: no image tagged {tag:?} (tags present: {available})")]
    TagNotFound {
        location: String,
        tag: String,
        available: String,
    },
    #[error(
        "{location} holds {count} images and no tag was given; name one with :TAG (tags present: {available})"
    )]
    AmbiguousImage {
        location: String,
        count: usize,
        available: String,
    },
    #[error("{location} already has tag {tag:?}; drop --no-overwrite or choose another tag")]
    TagExists { location: String, tag: String },
    #[error("{location} already exists; drop --no-overwrite or choose another file")]
    ArchiveExists { location: String },
    #[error("{location}: {reason}")]
    BadArchive { location: String, reason: String },
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    /// A registry refused, failed or could not be reached; `reason` says what to do.
    #[error("{location}: {what}: {reason}")]
    Registry {
        location: String,
        what: String,
        reason: String,
        failure: RegistryFailure,
    },
}

/// Why a registry operation failed, for exit codes: the message says the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistryFailure {
    /// No credentials, refused credentials, or no permission (401, 403).
    Unauthorized,
    /// No such repository, tag, manifest or blob (404).
    NotFound,
    /// Connection, TLS or DNS failure, or retries used up on 429/5xx.
    Unreachable,
    /// The registry served content that does not match its digest.
    Corrupt,
    /// Anything else the registry answered that bakedb cannot use.
    Rejected,
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
