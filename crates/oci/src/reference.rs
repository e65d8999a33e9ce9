//! Image references in skopeo's transport syntax, so users pass the same strings to both tools:
//! `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:NAME:TAG]`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

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
}

impl ImageRef {
    pub fn tag(&self) -> Option<&str> {
        match self {
            ImageRef::Oci { tag, .. } | ImageRef::OciArchive { tag, .. } => tag.as_deref(),
            ImageRef::DockerArchive { name, .. } => name.as_deref(),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        match self {
            ImageRef::Oci { dir, .. } => dir,
            ImageRef::OciArchive { file, .. } | ImageRef::DockerArchive { file, .. } => file,
        }
    }

    /// The transport and path without the tag, for messages.
    pub fn location(&self) -> String {
        match self {
            ImageRef::Oci { dir, .. } => format!("oci:{}", dir.display()),
            ImageRef::OciArchive { file, .. } => format!("oci-archive:{}", file.display()),
            ImageRef::DockerArchive { file, .. } => format!("docker-archive:{}", file.display()),
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
            bad("expected oci:DIR:TAG, oci-archive:FILE:TAG or docker-archive:FILE:NAME:TAG")
        })?;
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
                "unknown transport; use oci:, oci-archive: or docker-archive:",
            )),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
            "docker://x",
            "oci:",
            "oci:d:bad tag",
            "docker-archive:f:Upper:x",
            "oci:d:-x",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
    }
}
