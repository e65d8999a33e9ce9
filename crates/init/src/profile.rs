//! The read-only tuning mechanism. Each engine's profile comes with the engine (crates/engines
//! writes it into image.json); init only applies it:
//!
//! - `env`: set in the engine's environment unless the container already sets the variable
//!   (a user's `-e` wins, as it would without init);
//! - `args`: inserted right after the program name when the command is the profile's
//!   `command` (so the user's own flags come later and win, e.g. a later `-c` for postgres);
//! - `files`: written into the runtime directory (default /tmp/bakedb, or BAKEDB_RUNTIME_DIR),
//!   never into the data directory, as the user the engine runs as;
//! - `supervise`: the engine must not be PID 1;
//! - `verify`: "every-start" (default) or "first-start", for engines that write into their
//!   data directory at run time (PostgreSQL's pg_control, WAL, postmaster.pid): init
//!   verifies at a container's first start and leaves a stamp (VERIFIED_STAMP) in the data
//!   directory, which lives and dies with the engine's own writes; a restart of the same
//!   container finds the stamp and starts without verifying again;
//! - `patches`: how the patched files of a `--from` build reach the engine: "apply" (init
//!   composes them in place before the engine starts) or "in-place" (the engine reads base
//!   and patches itself; init writes nothing). See docs/patch-format.md.
//!
//! `{data_dir}` and `{runtime_dir}` in args, env values and file contents are replaced.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const DEFAULT_RUNTIME_DIR: &str = "/tmp/bakedb";

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub name: String,
    /// The program (basename) `args` are for; None: any command.
    pub command: Option<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub files: Vec<ProfileFile>,
    pub supervise: bool,
    pub verify_first_start: bool,
    /// None: the image has no patch layers, or an image from before them.
    pub patches: Option<PatchMode>,
}

/// How patched files reach the engine (profile.patches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchMode {
    /// The engine reads its files itself (PostgreSQL, any --cmd): init composes each patched
    /// file in place, then verifies the composed file.
    Apply,
    /// bakedb-serve reads base and patches through its VFS: init verifies them as stored.
    InPlace,
}

/// The stamp of a first-start verification, at the top of the data directory; it holds the
/// BAKEDB_DATA_DIGEST that was verified. With `"patches": "apply"` it also means the patched
/// files were composed: it is written only after the composed files were verified.
pub const VERIFIED_STAMP: &str = ".bakedb-verified";

#[derive(Clone, Debug, PartialEq)]
pub struct ProfileFile {
    /// Plain file name inside the runtime directory.
    pub name: String,
    pub mode: u32,
    pub content: String,
}

/// What the engine is started with once the profile is applied.
#[derive(Debug, PartialEq)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub runtime_dir: PathBuf,
    /// (path, mode, content) to write before the engine starts.
    pub files: Vec<(PathBuf, u32, String)>,
    summary: String,
}

impl Launch {
    /// The one line init prints about the profile.
    pub fn summary(&self) -> &str {
        &self.summary
    }
}

fn basename(program: &str) -> &str {
    program.rsplit('/').next().unwrap_or(program)
}

/// Apply `profile` to `command` and the current environment. Pure, so the plan and the
/// real start agree and both can be tested.
pub fn prepare(
    profile: &Profile,
    command: &[String],
    env: &[(String, String)],
    data_dir: &str,
    runtime_dir: &Path,
) -> Launch {
    let runtime = runtime_dir.to_string_lossy();
    let expand = |s: &str| {
        s.replace("{data_dir}", data_dir)
            .replace("{runtime_dir}", &runtime)
    };
    let mut parts = Vec::new();

    let mut final_env = env.to_vec();
    let (mut set, mut kept) = (Vec::new(), Vec::new());
    for (k, v) in &profile.env {
        if env.iter().any(|(ek, _)| ek == k) {
            kept.push(k.as_str());
        } else {
            final_env.push((k.clone(), expand(v)));
            set.push(format!("{k}={}", expand(v)));
        }
    }
    if !set.is_empty() {
        parts.push(format!("env {}", set.join(" ")));
    }
    if !kept.is_empty() {
        parts.push(format!(
            "env {} kept as the container sets them",
            kept.join(",")
        ));
    }

    let mut argv = command.to_vec();
    if !profile.args.is_empty() {
        let program = command.first().map_or("", |p| basename(p));
        match &profile.command {
            Some(wanted) if wanted != program => parts.push(format!(
                "args not applied: the command is {program}, the profile is for {wanted}"
            )),
            _ => {
                let args: Vec<String> = profile.args.iter().map(|a| expand(a)).collect();
                parts.push(format!("args {}", args.join(" ")));
                argv.splice(1.min(argv.len())..1.min(argv.len()), args);
            }
        }
    }

    let files: Vec<(PathBuf, u32, String)> = profile
        .files
        .iter()
        .map(|f| (runtime_dir.join(&f.name), f.mode, expand(&f.content)))
        .collect();
    for (path, mode, content) in &files {
        parts.push(format!(
            "wrote {} ({mode:04o}, {} bytes)",
            path.display(),
            content.len()
        ));
    }
    if profile.supervise {
        parts.push("supervised".into());
    }
    let name = if profile.name.is_empty() {
        "(none)"
    } else {
        &profile.name
    };
    let summary = if parts.is_empty() {
        format!("profile {name}: nothing to apply")
    } else {
        format!("profile {name}: {}", parts.join("; "))
    };
    Launch {
        argv,
        env: final_env,
        runtime_dir: runtime_dir.to_owned(),
        files,
        summary,
    }
}

/// Create the runtime directory (0700, ours) and write the profile's files into it. A
/// directory left by an earlier start of the same container is reused only if it is a real
/// directory we own, so nobody can plant a symlink or a config for the engine.
pub fn write_files(launch: &Launch) -> Result<(), String> {
    if launch.files.is_empty() {
        return Ok(());
    }
    let dir = &launch.runtime_dir;
    let io = |what: &str, path: &Path, e: std::io::Error| {
        format!(
            "{what} {}: {e}; set BAKEDB_RUNTIME_DIR to a writable directory (e.g. a tmpfs)",
            path.display()
        )
    };
    match fs::DirBuilder::new()
        .mode(0o700)
        .recursive(false)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(dir).map_err(|e| io("inspecting", dir, e))?;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
                return Err(format!(
                    "runtime directory {} exists but is not a directory owned by uid {euid} and writable only by it; remove it or set BAKEDB_RUNTIME_DIR",
                    dir.display()
                ));
            }
        }
        Err(e) => return Err(io("creating runtime directory", dir, e)),
    }
    for (path, mode, content) in &launch.files {
        let tmp = path.with_extension("bakedb-tmp");
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(*mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| io("creating", &tmp, e))?;
        f.write_all(content.as_bytes())
            .map_err(|e| io("writing", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| io("renaming into place", path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sv(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn profile() -> Profile {
        Profile {
            name: "pg-readonly".into(),
            command: Some("postgres".into()),
            args: sv(&[
                "-c",
                "config_file={runtime_dir}/pg.conf",
                "-D",
                "{data_dir}",
            ]),
            env: vec![
                ("PGDATA".into(), "{data_dir}".into()),
                ("TZ".into(), "UTC".into()),
            ],
            files: vec![ProfileFile {
                name: "pg.conf".into(),
                mode: 0o600,
                content: "data_directory = '{data_dir}'\n".into(),
            }],
            supervise: false,
            verify_first_start: false,
            patches: None,
        }
    }

    #[test]
    fn args_go_after_the_program_and_before_user_flags() {
        let env = vec![("TZ".into(), "Europe/Vienna".into())];
        let l = prepare(
            &profile(),
            &sv(&["/usr/bin/postgres", "-c", "work_mem=8MB"]),
            &env,
            "/var/lib/bakedb",
            Path::new("/tmp/bakedb"),
        );
        assert_eq!(
            l.argv,
            sv(&[
                "/usr/bin/postgres",
                "-c",
                "config_file=/tmp/bakedb/pg.conf",
                "-D",
                "/var/lib/bakedb",
                "-c",
                "work_mem=8MB"
            ])
        );
        // The container's own TZ wins; PGDATA is added.
        assert_eq!(
            l.env,
            vec![
                ("TZ".into(), "Europe/Vienna".into()),
                ("PGDATA".into(), "/var/lib/bakedb".into())
            ]
        );
        assert_eq!(
            l.files,
            vec![(
                PathBuf::from("/tmp/bakedb/pg.conf"),
                0o600,
                "data_directory = '/var/lib/bakedb'\n".into()
            )]
        );
        assert_eq!(
            l.summary(),
            "profile pg-readonly: env PGDATA=/var/lib/bakedb; env TZ kept as the container sets them; \
             args -c config_file=/tmp/bakedb/pg.conf -D /var/lib/bakedb; wrote /tmp/bakedb/pg.conf (0600, 35 bytes)"
        );
    }

    #[test]
    fn args_are_only_for_the_profiles_command() {
        let l = prepare(
            &profile(),
            &sv(&["sh", "-c", "psql"]),
            &[],
            "/d",
            Path::new("/run/x"),
        );
        assert_eq!(l.argv, sv(&["sh", "-c", "psql"]));
        assert!(
            l.summary()
                .contains("args not applied: the command is sh, the profile is for postgres"),
            "{}",
            l.summary()
        );
        // A profile without a command applies its args to any program.
        let mut any = profile();
        any.command = None;
        let l = prepare(&any, &sv(&["sh"]), &[], "/d", Path::new("/r"));
        assert_eq!(
            l.argv,
            sv(&["sh", "-c", "config_file=/r/pg.conf", "-D", "/d"])
        );
    }

    #[test]
    fn empty_profile_says_so() {
        let l = prepare(
            &Profile::default(),
            &sv(&["true"]),
            &[],
            "/d",
            Path::new("/r"),
        );
        assert_eq!(l.summary(), "profile (none): nothing to apply");
        assert_eq!(l.argv, sv(&["true"]));
        assert!(l.files.is_empty());
    }

    #[test]
    fn files_land_in_a_private_runtime_dir() {
        let base = std::env::temp_dir().join(format!("bakedb-init-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir(&base).unwrap();
        let runtime = base.join("rt");
        let l = prepare(&profile(), &sv(&["postgres"]), &[], "/d", &runtime);
        write_files(&l).unwrap();
        let conf = runtime.join("pg.conf");
        assert_eq!(
            fs::read_to_string(&conf).unwrap(),
            "data_directory = '/d'\n"
        );
        assert_eq!(fs::metadata(&conf).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(fs::metadata(&runtime).unwrap().mode() & 0o7777, 0o700);
        // A second start of the same container reuses the directory.
        write_files(&l).unwrap();
        // A symlink planted in place of the directory is refused.
        fs::remove_dir_all(&runtime).unwrap();
        std::os::unix::fs::symlink(&base, &runtime).unwrap();
        let err = write_files(&l).unwrap_err();
        assert!(err.contains("is not a directory owned by"), "{err}");
        fs::remove_dir_all(&base).unwrap();
    }
}
