//! Blob uploads, streamed from disk: HEAD first (a blob the registry has is never sent
//! again), then a monolithic upload (POST, PUT with the body) for a blob up to the chunk
//! size, or a chunked one (POST, PATCH per chunk with its Content-Range, PUT) for a larger
//! one. A chunked upload that loses its connection asks the registry how much it has (GET
//! on the upload URL) and goes on from there; one that cannot (the session is gone, a
//! monolithic PUT was cut, the registry refuses the digest) starts a new session from the
//! first byte. Nothing is held in memory but the request being sent.

use std::path::Path;
use std::time::Duration;

use ureq::http::{Method, StatusCode};

use super::{Client, Req, ReqBody, Scope, header, read_limited, retry_after};
use crate::digest::Digest;
use crate::error::{Error, RegistryFailure, Result};

/// Where a blob's bytes are: in memory (a config), or a byte range of a file (a blob in a
/// layout or staging layout, or inside an archive).
#[derive(Clone, Copy, Debug)]
pub enum BlobData<'a> {
    Bytes(&'a [u8]),
    File { path: &'a Path, offset: u64 },
}

/// What pushing one blob came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    AlreadyThere,
    Mounted,
    Uploaded,
}

/// What a push sent, for the build's summary line and for callers that report it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    pub uploaded: u64,
    pub uploaded_bytes: u64,
    pub already_there: u64,
    pub mounted: u64,
}

impl PushStats {
    pub fn add(&mut self, pushed: Pushed, size: u64) {
        match pushed {
            Pushed::AlreadyThere => self.already_there += 1,
            Pushed::Mounted => self.mounted += 1,
            Pushed::Uploaded => {
                self.uploaded += 1;
                self.uploaded_bytes += size;
            }
        }
    }
}

/// Why one upload session failed, and whether a new one may succeed.
enum Attempt {
    Done,
    /// Start over with a new session, after the registry's Retry-After or else backoff.
    Restart(Error, Option<Duration>),
}

impl Client {
    /// Make sure `repository` has the blob: nothing if it has it already, else upload it.
    pub fn push_blob(
        &self,
        repository: &str,
        digest: &Digest,
        size: u64,
        data: BlobData,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Pushed> {
        if self.has_blob(repository, digest)?.is_some() {
            return Ok(Pushed::AlreadyThere);
        }
        self.upload_blob(repository, digest, size, data, progress)?;
        Ok(Pushed::Uploaded)
    }

    /// Upload a blob the registry does not have, trying new sessions up to the attempt limit.
    pub fn upload_blob(
        &self,
        repository: &str,
        digest: &Digest,
        size: u64,
        data: BlobData,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let mut last = None;
        let mut wait = None;
        let mut sessions = 0;
        for session in 1..=self.options.attempts {
            if session > 1 {
                if !self.pause(wait.unwrap_or_else(|| self.backoff(session - 1))) {
                    break;
                }
                // The cut request may have been completed after all.
                if self.has_blob(repository, digest)?.is_some() {
                    return Ok(());
                }
            }
            sessions = session;
            match self.upload_session(repository, digest, size, data, progress)? {
                Attempt::Done => return Ok(()),
                Attempt::Restart(e, after) => {
                    last = Some(e);
                    wait = after;
                }
            }
        }
        Err(match last.expect("at least one session") {
            Error::Registry {
                location,
                what,
                reason,
                failure,
            } => Error::Registry {
                location,
                what,
                reason: format!("{reason} ({sessions} upload sessions, retried with backoff)"),
                failure,
            },
            other => other,
        })
    }

    fn upload_session(
        &self,
        repository: &str,
        digest: &Digest,
        size: u64,
        data: BlobData,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Attempt> {
        let location = self.location(repository);
        let what = format!("pushing blob {digest}");
        let start = Req::new(
            Method::POST,
            format!("/v2/{repository}/blobs/uploads/"),
            what.clone(),
            location.clone(),
        )
        .scope(Scope::push(repository))
        .repeatable();
        let resp = self.send(&start)?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.unexpected(resp, &what, &location));
        }
        let Some(mut upload) = header(&resp, "location") else {
            return Err(self.err(
                &location,
                &what,
                RegistryFailure::Rejected,
                "the registry started an upload without a Location".into(),
            ));
        };
        // A registry may ask for larger chunks than ours (OCI-Chunk-Min-Length).
        let min_chunk = header(&resp, "oci-chunk-min-length")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let _ = read_limited(resp, 64 << 10);
        let chunk = self.options.chunk_size.max(min_chunk).max(1);
        let body = |offset: u64, len: u64| match data {
            BlobData::Bytes(b) => ReqBody::Bytes(&b[offset as usize..(offset + len) as usize]),
            BlobData::File { path, offset: base } => ReqBody::File {
                path,
                offset: base + offset,
                len,
            },
        };
        let finish_url = |upload: &str| {
            let sep = if upload.contains('?') { '&' } else { '?' };
            format!("{upload}{sep}digest={digest}")
        };
        if size <= chunk {
            // Monolithic: the whole blob in the PUT that closes the session. Cut half-way,
            // the session holds an unknown prefix: start a new one.
            let put = Req::new(PUT, finish_url(&upload), what.clone(), location.clone())
                .header("Content-Type", "application/octet-stream")
                .body(body(0, size))
                .scope(Scope::push(repository))
                .once();
            return match self.send(&put) {
                Ok(resp) if resp.status() == StatusCode::CREATED => {
                    let _ = read_limited(resp, 64 << 10);
                    progress(size);
                    Ok(Attempt::Done)
                }
                Ok(resp) if restartable(resp.status()) => {
                    let after = retry_after(&resp);
                    let e = self.unexpected(resp, &what, &location);
                    self.cancel_upload(repository, &upload);
                    Ok(Attempt::Restart(e, after))
                }
                Ok(resp) => Err(self.unexpected(resp, &what, &location)),
                Err(
                    e @ Error::Registry {
                        failure: RegistryFailure::Unreachable,
                        ..
                    },
                ) => {
                    self.cancel_upload(repository, &upload);
                    Ok(Attempt::Restart(e, None))
                }
                Err(e) => Err(e),
            };
        }
        // Chunked: PATCH each chunk with its range; after a failure, resume where the
        // registry says it is.
        let mut offset = 0u64;
        let mut resumes = 0u32;
        while offset < size {
            let len = chunk.min(size - offset);
            let patch = Req::new(
                Method::PATCH,
                upload.clone(),
                what.clone(),
                location.clone(),
            )
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{offset}-{}", offset + len - 1))
            .body(body(offset, len))
            .scope(Scope::push(repository))
            .once();
            let mut after = None;
            let failed = match self.send(&patch) {
                Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
                    if let Some(next) = header(&resp, "location") {
                        upload = next;
                    }
                    let _ = read_limited(resp, 64 << 10);
                    offset += len;
                    progress(len);
                    continue;
                }
                Ok(resp)
                    if restartable(resp.status())
                        || resp.status() == StatusCode::RANGE_NOT_SATISFIABLE =>
                {
                    after = retry_after(&resp);
                    self.unexpected(resp, &what, &location)
                }
                Ok(resp) => return Err(self.unexpected(resp, &what, &location)),
                Err(
                    e @ Error::Registry {
                        failure: RegistryFailure::Unreachable,
                        ..
                    },
                ) => e,
                Err(e) => return Err(e),
            };
            resumes += 1;
            if resumes >= self.options.attempts
                || !self.pause(after.unwrap_or_else(|| self.backoff(resumes)))
            {
                return Err(failed);
            }
            match self.upload_status(repository, &upload)? {
                Some((next, have)) if have <= size => {
                    upload = next;
                    if have > offset {
                        progress(have - offset);
                    }
                    offset = have;
                }
                _ => {
                    self.cancel_upload(repository, &upload);
                    return Ok(Attempt::Restart(failed, None));
                }
            }
        }
        let put = Req::new(PUT, finish_url(&upload), what.clone(), location.clone())
            .scope(Scope::push(repository))
            .once();
        match self.send(&put) {
            Ok(resp) if resp.status() == StatusCode::CREATED => {
                let _ = read_limited(resp, 64 << 10);
                Ok(Attempt::Done)
            }
            Ok(resp) if restartable(resp.status()) => {
                let after = retry_after(&resp);
                let e = self.unexpected(resp, &what, &location);
                self.cancel_upload(repository, &upload);
                Ok(Attempt::Restart(e, after))
            }
            Ok(resp) => Err(self.unexpected(resp, &what, &location)),
            Err(
                e @ Error::Registry {
                    failure: RegistryFailure::Unreachable,
                    ..
                },
            ) => Ok(Attempt::Restart(e, None)),
            Err(e) => Err(e),
        }
    }

    /// Where an upload session is: its URL for the next request and how many bytes the
    /// registry holds (the end of its `Range: 0-N`). None when the session is gone.
    fn upload_status(&self, repository: &str, upload: &str) -> Result<Option<(String, u64)>> {
        let req = Req::new(
            Method::GET,
            upload.to_owned(),
            "asking how much of an upload arrived".into(),
            self.location(repository),
        )
        .scope(Scope::push(repository));
        let resp = match self.send(&req) {
            Ok(r) => r,
            Err(Error::Registry {
                failure: RegistryFailure::Unreachable,
                ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if resp.status() != StatusCode::NO_CONTENT && !resp.status().is_success() {
            let _ = read_limited(resp, 64 << 10);
            return Ok(None);
        }
        let next = header(&resp, "location").unwrap_or_else(|| upload.to_owned());
        let have = match header(&resp, "range") {
            // "0-N" holds N+1 bytes; "0-0" after no data at all is ambiguous, and the
            // distribution registry says "0-0" for an empty upload too: resume from 0 then.
            Some(r) => r
                .trim_start_matches("bytes=")
                .split_once('-')
                .and_then(|(_, end)| end.parse::<u64>().ok())
                .map_or(0, |end| if end == 0 { 0 } else { end + 1 }),
            None => 0,
        };
        let _ = read_limited(resp, 64 << 10);
        Ok(Some((next, have)))
    }
}

const PUT: Method = Method::PUT;

/// Answers after which a new upload session may succeed: the session expired or was lost
/// (404, 416), the digest did not match what arrived (400 DIGEST_INVALID after a cut
/// request), or the registry is overloaded.
fn restartable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        400 | 404 | 416 | 429 | 500 | 502 | 503 | 504
    )
}
