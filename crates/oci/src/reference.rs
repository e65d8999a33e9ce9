//! Image references in skopeo's transport syntax, so users pass the same strings to both tools:
//! `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:NAME:TAG]` and
//! `docker://[HOST[:PORT]/]REPO[:TAG|@sha256:HEX]`, normalised as containers/image does
//! (`docker://busybox` is `docker.io/library/busybox:latest`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::Error;

/// The registry Docker Hub's short names live on, as containers/image spells it.
pub const DOCKER_HUB: &str = "docker.io";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    Oci {
        dir: PathBuf,
        tag: Option<String>,
    },
    OciArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    /// `name` is a Docker reference `NAME:TAG`.
    DockerArchive {
        file: PathBuf,
        name: Option<String>,
    },
    /// A registry: `registry` is HOST[:PORT] (`docker.io` for Docker Hub), `repository` the
    /// full path (`library/busybox`). Exactly one of `tag` and `digest` is set.
    Docker(DockerRef),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DockerRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl DockerRef {
    /// `docker://HOST/REPO`, for messages about the repository as a whole.
    pub fn location(&self) -> String {
        format!("docker://{}/{}", self.registry, self.repository)
    }

    /// What the registry API calls the reference: the tag, or the digest.
    pub fn api_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// The same repository with another tag.
    pub fn with_tag(&self, tag: &str) -> DockerRef {
        DockerRef {
            tag: Some(tag.to_owned()),
            digest: None,
            ..self.clone()
        }
    }

    /// Parse what follows `docker://`, as containers/image's ParseNormalizedNamed does.
    pub fn parse(text: &str) -> Result<DockerRef, String> {
        if text.is_empty() {
            return Err("the image name is empty".into());
        }
        let (rest, digest) = match text.split_once('@') {
            Some((r, d)) => (
                r,
                Some(
                    d.parse::<Digest>()
                        .map_err(|e| format!("the digest after '@': {e}"))?,
                ),
            ),
            None => (text, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(format!(
                "tag {tag:?}: a tag is 1 to 128 of [A-Za-z0-9._-], not starting with '.' or '-'"
            ));
        }
        if tag.is_some() && digest.is_some() {
            return Err(
                "a reference with both a tag and a digest is not supported (skopeo refuses it too): give one".into(),
            );
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if is_registry_host(first) || first.to_lowercase() != first => {
                (first, path.to_owned())
            }
            _ => (DOCKER_HUB, name.to_owned()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        if !valid_host(registry) {
            return Err(format!("{registry:?} is not a registry host[:port]"));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if !valid_repo_path(&repository) {
            return Err(format!(
                "repository {repository:?}: path components are lower-case letters, digits and separators (. _ __ -), as Docker requires"
            ));
        }
        if registry.len() + 1 + repository.len() > 255 {
            return Err("the repository name is longer than 255 characters".into());
        }
        Ok(DockerRef {
            registry: registry.to_owned(),
            repository,
            tag: match (tag, &digest) {
                (Some(t), _) => Some(t.to_owned()),
                (None, Some(_)) => None,
                // containers/image's docker transport adds :latest, as docker pull does.
                (None, None) => Some("latest".to_owned()),
            },
            digest,
        })
    }
}

impl fmt::Display for DockerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.location())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// HOST[:PORT]: DNS labels or an IPv4 address, or an IPv6 address in brackets.
fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, tail)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                ("", tail.strip_prefix(':'))
            }
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = host.starts_with('[')
        || (!name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            }));
    port_ok && name_ok
}

/// Path components of lower-case alphanumerics joined by `.`, `_`, `__` or dashes.
fn valid_repo_path(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|part| {
            let bytes = part.as_bytes();
            !part.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && !part.contains("..")
                && !part.contains("___")
                && !part.contains("._")
                && !part.contains("_.")
        })
}

impl ImageRef {
    pub fn tag(&self) -> Option<&str> {
        match self {
            ImageRef::Oci { tag, .. } | ImageRef::OciArchive { tag, .. } => tag.as_deref(),
            ImageRef::DockerArchive { name, .. } => name.as_deref(),
            ImageRef::Docker(r) => r.tag.as_deref(),
        }
    }

    /// The layout directory or archive file; None for a registry.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            ImageRef::Oci { dir, .. } => Some(dir),
            ImageRef::OciArchive { file, .. } | ImageRef::DockerArchive { file, .. } => Some(file),
            ImageRef::Docker(_) => None,
        }
    }

    /// The transport and path without the tag, for messages.
    pub fn location(&self) -> String {
        match self {
            ImageRef::Oci { dir, .. } => format!("oci:{}", dir.display()),
            ImageRef::OciArchive { file, .. } => format!("oci-archive:{}", file.display()),
            ImageRef::DockerArchive { file, .. } => format!("docker-archive:{}", file.display()),
            ImageRef::Docker(r) => r.location(),
        }
    }
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !tag.starts_with(['.', '-'])
}

fn valid_repo_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    let path = if parts.len() > 1 && is_registry_host(parts[0]) {
        &parts[1..]
    } else {
        &parts[..]
    };
    !name.is_empty()
        && path.iter().all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && part.as_bytes()[0].is_ascii_alphanumeric()
        })
}

/// Docker's rule: a first component with a dot or a port, or `localhost`, is a registry.
fn is_registry_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// The fully qualified form Docker and skopeo compare names in: `app:v1` is
/// `docker.io/library/app:v1`, `team/app:v1` is `docker.io/team/app:v1`.
pub fn normalize_docker_name(name: &str) -> String {
    let (repo, tag) = match name.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (name, "latest"),
    };
    let mut parts: Vec<&str> = repo.split('/').collect();
    if parts.len() == 1 || !is_registry_host(parts[0]) {
        if parts.len() == 1 {
            parts.insert(0, "library");
        }
        parts.insert(0, "docker.io");
    }
    format!("{}:{tag}", parts.join("/"))
}

impl FromStr for ImageRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::BadReference {
            reference: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (transport, rest) = s.split_once(':').ok_or_else(|| {
            bad("expected oci:DIR:TAG, oci-archive:FILE:TAG, docker-archive:FILE:NAME:TAG or docker://HOST/REPO:TAG")
        })?;
        if transport == "docker" {
            let name = rest.strip_prefix("//").ok_or_else(|| {
                bad("a registry reference starts with docker:// (docker://HOST/REPO:TAG), as in skopeo")
            })?;
            return DockerRef::parse(name)
                .map(ImageRef::Docker)
                .map_err(|reason| bad(&reason));
        }
        let (path, tail) = match rest.split_once(':') {
            Some((p, t)) => (p, Some(t)),
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(bad("the path is empty"));
        }
        let path = PathBuf::from(path);
        match transport {
            "oci" | "oci-archive" => {
                if let Some(tag) = tail
                    && !valid_tag(tag)
                {
                    return Err(bad(
                        "a tag is 1 to 128 of [A-Za-z0-9._-], not starting with '.' or '-'",
                    ));
                }
                let tag = tail.map(str::to_owned);
                Ok(if transport == "oci" {
                    ImageRef::Oci { dir: path, tag }
                } else {
                    ImageRef::OciArchive { file: path, tag }
                })
            }
            "docker-archive" => {
                let name = match tail {
                    None => None,
                    Some(t) => {
                        let (repo, tag) = t.rsplit_once(':').unwrap_or((t, "latest"));
                        if !valid_repo_name(repo) || !valid_tag(tag) {
                            return Err(bad(
                                "the image name must be NAME:TAG with a lower-case NAME, like docker",
                            ));
                        }
                        Some(format!("{repo}:{tag}"))
                    }
                };
                Ok(ImageRef::DockerArchive { file: path, name })
            }
            _ => Err(bad(
                "unknown transport; use oci:, oci-archive:, docker-archive: or docker://",
            )),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let ImageRef::Docker(r) = self {
            return write!(f, "{r}");
        }
        write!(f, "{}", self.location())?;
        match self.tag() {
            Some(t) => write!(f, ":{t}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_skopeo_syntax() {
        assert_eq!(
            "oci:out:v1".parse::<ImageRef>().unwrap(),
            ImageRef::Oci {
                dir: "out".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            "oci:/a/b".parse::<ImageRef>().unwrap(),
            ImageRef::Oci {
                dir: "/a/b".into(),
                tag: None
            }
        );
        assert_eq!(
            "docker-archive:x.tar:my/app:v2"
                .parse::<ImageRef>()
                .unwrap(),
            ImageRef::DockerArchive {
                file: "x.tar".into(),
                name: Some("my/app:v2".into())
            }
        );
        assert_eq!(
            "docker-archive:x.tar:localhost:5000/app:v1"
                .parse::<ImageRef>()
                .unwrap(),
            ImageRef::DockerArchive {
                file: "x.tar".into(),
                name: Some("localhost:5000/app:v1".into())
            }
        );
        assert_eq!(normalize_docker_name("app:v1"), "docker.io/library/app:v1");
        assert_eq!(
            normalize_docker_name("team/app"),
            "docker.io/team/app:latest"
        );
        assert_eq!(
            normalize_docker_name("docker.io/team/app:v1"),
            "docker.io/team/app:v1"
        );
        assert_eq!(
            normalize_docker_name("localhost:5000/app:v1"),
            "localhost:5000/app:v1"
        );
        assert_eq!(
            "docker-archive:x.tar:app".parse::<ImageRef>().unwrap(),
            ImageRef::DockerArchive {
                file: "x.tar".into(),
                name: Some("app:latest".into())
            }
        );
        assert_eq!(
            "oci-archive:a.tar:t"
                .parse::<ImageRef>()
                .unwrap()
                .to_string(),
            "oci-archive:a.tar:t"
        );
        for bad in [
            "out",
            "docker:x",
            "docker://",
            "docker://Upper/x/Y",
            "docker://x:v1@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "docker://x@sha256:00",
            "docker://host:port/x",
            "docker://x:-v",
            "docker://a//b",
            "docker://my_app.x/z",
            "oci:",
            "oci:d:bad tag",
            "docker-archive:f:Upper:x",
            "oci:d:-x",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_docker_references_as_containers_image_does() {
        let parse = |s: &str| match s.parse::<ImageRef>().unwrap() {
            ImageRef::Docker(r) => r,
            other => panic!("{s}: {other:?}"),
        };
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for (text, registry, repository, tag, shown) in [
            (
                "docker://busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                "docker://docker.io/library/busybox:latest",
            ),
            (
                "docker://team/app:v2",
                "docker.io",
                "team/app",
                Some("v2"),
                "docker://docker.io/team/app:v2",
            ),
            (
                "docker://index.docker.io/busybox:1",
                "docker.io",
                "library/busybox",
                Some("1"),
                "docker://docker.io/library/busybox:1",
            ),
            (
                "docker://localhost/app",
                "localhost",
                "app",
                Some("latest"),
                "docker://localhost/app:latest",
            ),
            (
                "docker://127.0.0.1:5000/a/b/c:t",
                "127.0.0.1:5000",
                "a/b/c",
                Some("t"),
                "docker://127.0.0.1:5000/a/b/c:t",
            ),
            (
                "docker://reg.example/app",
                "reg.example",
                "app",
                Some("latest"),
                "docker://reg.example/app:latest",
            ),
            (
                "docker://[::1]:5000/app:v",
                "[::1]:5000",
                "app",
                Some("v"),
                "docker://[::1]:5000/app:v",
            ),
            (
                "docker://Host/app:v",
                "Host",
                "app",
                Some("v"),
                "docker://Host/app:v",
            ),
            (
                "docker://my_app-x/z.y:v",
                "docker.io",
                "my_app-x/z.y",
                Some("v"),
                "docker://docker.io/my_app-x/z.y:v",
            ),
        ] {
            let r = parse(text);
            assert_eq!(
                (
                    r.registry.as_str(),
                    r.repository.as_str(),
                    r.tag.as_deref(),
                    r.digest
                ),
                (registry, repository, tag, None),
                "{text}"
            );
            assert_eq!(r.to_string(), shown);
            assert_eq!(ImageRef::Docker(r.clone()).to_string(), shown);
            assert_eq!(parse(shown), r, "{shown} parses back");
        }
        let r = parse(&format!("docker://reg:5000/app@{digest}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.unwrap().to_string(), digest);
        assert_eq!(r.api_reference(), digest);
        assert_eq!(r.to_string(), format!("docker://reg:5000/app@{digest}"));
        assert_eq!(r.with_tag("x").to_string(), "docker://reg:5000/app:x");
    }
}
