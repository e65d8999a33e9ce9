//! The programs a bench runs: the bakedb it measures, the tools it compares with, docker and
//! skopeo; and reading what bakedb prints.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use bakedb_testkit::containers::DockerImage;
use bakedb_testkit::process::last_line;

/// A tool's version line, or why it cannot be used ("not available (…)").
pub type Found = Result<String, String>;

/// What a report says of a tool: its version line, or why it was not used.
pub fn found_text(found: &Found) -> String {
    match found {
        Ok(v) | Err(v) => v.clone(),
    }
}

/// The first line `program args` prints (stdout, else stderr), or why it cannot be used.
pub fn version(program: &Path, args: &[&str]) -> Found {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("not available ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "not available (`{} {}`: {})",
            program.display(),
            args.join(" "),
            last_line(&String::from_utf8_lossy(&out.stderr))
        ));
    }
    let text = String::from_utf8_lossy(if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    })
    .into_owned();
    Ok(text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// "`docker build` failed (exit status: 1): <its last line>" first, the details after.
pub fn failed(cmd: &Command, out: &std::process::Output) -> anyhow::Error {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = last_line(&stderr);
    let words: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    // Under GNU time the program comes after: time -f FORMAT -o FILE
    let start = if words[0].ends_with("/time") { 5 } else { 0 };
    let program = words
        .get(start)
        .map_or("?", |p| p.rsplit('/').next().unwrap_or(p));
    let first_arg = words.get(start + 1).map_or("", String::as_str);
    anyhow!(
        "`{program} {first_arg}` failed ({}): {last}\n{cmd:?}\n{stderr}",
        out.status
    )
}

/// Run to completion with stdin closed; its stdout, or an error that starts with its last
/// line on stderr.
pub fn run_quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        return Err(failed(cmd, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `target/` of the workspace, or CARGO_TARGET_DIR.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// `dir`, emptied: removed if it is there, then created.
pub fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// `cargo build --release -p bakedb-cli`, then a private copy of the binary in `scratch`:
/// a `cargo build --release` running beside the benchmark would otherwise swap the binary
/// between runs.
pub fn release_bakedb(root: &Path, scratch: &Path) -> Result<PathBuf> {
    eprintln!("xtask: building bakedb (release)");
    crate::run(
        crate::cargo()
            .current_dir(root)
            .args(["build", "--release", "-p", "bakedb-cli"]),
    )?;
    let bakedb = scratch.join("bakedb");
    let built = target_dir(root).join("release/bakedb");
    fs::copy(&built, &bakedb).with_context(|| format!("copying {}", built.display()))?;
    Ok(bakedb)
}

/// `abc123def456`, or `abc123def456 with uncommitted changes` when the sources that go into
/// the bakedb binary differ from that commit.
pub fn commit_measured(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown commit".into();
    };
    match git(&[
        "status",
        "--porcelain",
        "--",
        "crates",
        "Cargo.toml",
        "Cargo.lock",
    ]) {
        Some(changes) if changes.is_empty() => head,
        _ => format!("{head} with uncommitted changes"),
    }
}

/// The docker CLI that matches the daemon: DOCKER, else Debian's /usr/bin/docker, else the
/// one on PATH.
pub fn docker_bin() -> PathBuf {
    std::env::var_os("DOCKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let distro = PathBuf::from("/usr/bin/docker");
            if distro.is_file() {
                distro
            } else {
                PathBuf::from("docker")
            }
        })
}

/// The daemon's version (`docker info`), or an error when it does not answer.
pub fn docker_version(docker: &Path) -> Result<String> {
    let version = run_quiet(Command::new(docker).args(["info", "--format", "{{.ServerVersion}}"]))?;
    match version.trim() {
        "" => bail!("dockerd reports no version"),
        v => Ok(format!("docker {v}")),
    }
}

/// "skopeo 1.9.3", or an error that says how to install it.
pub fn skopeo_version() -> Result<String> {
    Ok(run_quiet(Command::new("skopeo").arg("--version"))
        .map_err(|e| anyhow!("{e:#}\nskopeo is missing: apt-get install skopeo"))?
        .trim()
        .replace(" version ", " "))
}

/// `docker load -i ARCHIVE` of the image `name`: removed again when the guard is dropped.
pub fn docker_load(docker: &Path, archive: &Path, name: &str) -> Result<DockerImage> {
    run_quiet(Command::new(docker).arg("load").arg("-i").arg(archive))?;
    Ok(DockerImage {
        docker: docker.to_owned(),
        name: name.to_owned(),
    })
}

/// docker's size of an image, in bytes.
pub fn image_size(docker: &Path, name: &str) -> Option<u64> {
    run_quiet(Command::new(docker).args(["image", "inspect", "--format", "{{.Size}}", name]))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `"key": "value"` from a JSON text, without a JSON parser.
pub fn json_str(text: &str, key: &str) -> Option<String> {
    let after = &text[text.find(&format!("\"{key}\""))? + key.len() + 2..];
    let after = after
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(after[..after.find('"')?].to_owned())
}

/// `"key": 123` from a JSON text.
pub fn json_u64(text: &str, key: &str) -> Option<u64> {
    let after = &text[text.find(&format!("\"{key}\""))? + key.len() + 2..];
    let after = after.trim_start().strip_prefix(':')?.trim_start();
    let end = after
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after.len());
    after[..end].parse().ok()
}

/// (digest, compressed size) of every layer in `bakedb build --json`'s output.
pub fn build_layers(json: &str) -> Vec<(String, u64)> {
    let Some(start) = json.find("\"layers\"") else {
        return Vec::new();
    };
    let layers = &json[start..];
    let layers = &layers[..layers.find(']').unwrap_or(layers.len())];
    layers
        .split('{')
        .skip(1)
        .filter_map(|entry| Some((json_str(entry, "digest")?, json_u64(entry, "size")?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_build_json() {
        let json = "{\n  \"config_digest\": \"sha256:c\",\n  \"manifest_digest\": \"sha256:ab12\",\n  \"layers\": [\n    {\n      \"diff_id\": \"sha256:d1\",\n      \"digest\": \"sha256:a\",\n      \"media_type\": \"x\",\n      \"size\": 1200\n    },\n    {\n      \"digest\": \"sha256:b\",\n      \"size\": 34\n    }\n  ],\n  \"manifest_size\": 900,\n  \"size\": 2134\n}";
        assert_eq!(
            build_layers(json),
            vec![("sha256:a".to_owned(), 1200), ("sha256:b".to_owned(), 34)]
        );
        assert_eq!(json_u64(json, "manifest_size"), Some(900));
        assert_eq!(json_u64(json, "size"), Some(1200));
        assert_eq!(
            json_str(json, "manifest_digest").as_deref(),
            Some("sha256:ab12")
        );
        assert_eq!(json_str(json, "nothing"), None);
        let json =
            "{\n  \"manifest_digest\": \"sha256:ab12\",\n  \"size\": 1234,\n  \"layers\": []\n}";
        assert_eq!(
            json_str(json, "manifest_digest").as_deref(),
            Some("sha256:ab12")
        );
        assert_eq!(json_u64(json, "size"), Some(1234));
    }
}
