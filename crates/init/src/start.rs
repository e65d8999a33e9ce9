//! Becoming the engine: privileges, program lookup, exec, or supervision as PID 1.
//!
//! Supervision copies catatonit's shape (catatonit.c): block the signals before the child
//! exists, unblock them in the child before exec (std keeps the mask across exec), then one
//! sigwaitinfo loop that forwards and reaps until the main child is gone.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What supervision forwards to the child (the set tini and catatonit forward).
const FORWARDED: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// PID 1 ignores signals it has no handler for, so without these `docker stop` during a long
/// verification would wait for SIGKILL. exec resets handled signals to their defaults.
pub fn exit_on_stop_signals() {
    extern "C" fn on_signal(sig: libc::c_int) {
        // SAFETY: _exit is async-signal-safe; nothing else runs here.
        unsafe { libc::_exit(128 + sig) }
    }
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installing a handler that only calls _exit; the sigaction struct is
        // zero-initialised (empty mask, no flags) before the handler is set.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Identity {
    /// Not root: run as whoever we are (the image's User, or what the runtime chose).
    Unchanged,
    /// Root: become the data owner before anything else.
    Drop { uid: u32, gid: u32 },
    /// Root, and BAKEDB_RUN_AS_ROOT=1 says to stay root.
    RootAllowed,
    /// Root, and the image was built with root owning the data.
    RootOwner,
}

pub fn decide_identity(euid: u32, owner: (u32, u32), allow_root: bool) -> Identity {
    if euid != 0 {
        Identity::Unchanged
    } else if allow_root {
        Identity::RootAllowed
    } else if owner.0 == 0 {
        Identity::RootOwner
    } else {
        Identity::Drop {
            uid: owner.0,
            gid: owner.1,
        }
    }
}

pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// setgroups, setgid, setuid, in that order (as gosu does), then check it took.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), String> {
    let groups = [gid as libc::gid_t];
    // SAFETY: plain syscalls with a valid one-element array; results checked below.
    unsafe {
        if libc::setgroups(1, groups.as_ptr()) != 0 {
            return Err(format!(
                "setgroups([{gid}]): {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setgid(gid) != 0 {
            return Err(format!(
                "setgid({gid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setuid(uid) != 0 {
            return Err(format!(
                "setuid({uid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::getuid() != uid || libc::geteuid() != uid || libc::getgid() != gid {
            return Err(format!("still not uid {uid} gid {gid} after setuid"));
        }
    }
    Ok(())
}

/// Find the program like execvp would, so that "not found" (127) and "not executable" (126)
/// are told apart and the plan can show the path.
pub fn resolve(program: &str, path_env: Option<&str>) -> Result<PathBuf, (i32, String)> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return match std::fs::metadata(&p) {
            Err(e) => Err((127, format!("{program}: {e}"))),
            Ok(_) if !executable(&p) => Err((126, format!("{program} is not an executable file"))),
            Ok(_) => Ok(p),
        };
    }
    // Docker's default when the image sets no PATH.
    let search = path_env.unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let mut not_executable = None;
    for dir in search.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(program);
        if executable(&candidate) {
            return Ok(candidate);
        }
        if candidate.exists() && not_executable.is_none() {
            not_executable = Some(candidate);
        }
    }
    match not_executable {
        Some(p) => Err((126, format!("{} is not an executable file", p.display()))),
        None => Err((127, format!("{program}: not found in PATH={search}"))),
    }
}

/// Variables that are not UTF-8, passed through as they came.
pub type Passthrough = [(OsString, OsString)];

fn command(
    program: &Path,
    argv: &[String],
    env: &[(String, String)],
    passthrough: &Passthrough,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg0(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (OsStr::new(k), OsStr::new(v))))
        .envs(passthrough.iter().map(|(k, v)| (k, v)));
    // SAFETY: runs in the child between fork and exec and only makes async-signal-safe
    // calls: an empty mask (std keeps ours across exec) and SIGPIPE back to default.
    unsafe {
        cmd.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd
}

fn exec_failure(program: &Path, e: std::io::Error) -> (i32, String) {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    };
    (code, format!("cannot execute {}: {e}", program.display()))
}

/// Replace this process with the engine; returns only if that failed.
pub fn exec(
    program: &Path,
    argv: &[String],
    env: &[(String, String)],
    passthrough: &Passthrough,
) -> (i32, String) {
    let e = command(program, argv, env, passthrough).exec();
    exec_failure(program, e)
}

/// Close every descriptor above stderr so the child inherits nothing init was given.
fn close_inherited_fds() {
    // SAFETY: close_range on our own descriptor table; no Rust object owns fds >= 3 here
    // (verification's files are closed, no threads are running).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        // Kernels before 5.9: walk /proc/self/fd instead.
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let fds: Vec<i32> = dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect();
            for fd in fds {
                // SAFETY: closing a descriptor nothing in this process still uses (see above);
                // the one read_dir used is already closed and fails harmlessly.
                unsafe { libc::close(fd) };
            }
        }
    }
}

fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Run the engine as a child: forward signals, reap every zombie, and return the main
/// child's exit code (or 128+signal) once it is gone.
pub fn supervise(
    program: &Path,
    argv: &[String],
    env: &[(String, String)],
    passthrough: &Passthrough,
) -> (i32, Option<String>) {
    // SAFETY: signal-mask and prctl calls on our own process with initialised sigsets.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if libc::getpid() != 1 {
            // Orphans of the engine must come to us, not to whoever is PID 1.
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        set
    };
    close_inherited_fds();
    let child = match command(program, argv, env, passthrough).spawn() {
        Ok(child) => child.id() as libc::pid_t,
        Err(e) => {
            let (code, message) = exec_failure(program, e);
            return (code, Some(message));
        }
    };
    loop {
        // SAFETY: waiting on a valid, initialised signal set; no siginfo wanted.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig < 0 {
            continue; // EINTR
        }
        if sig != libc::SIGCHLD {
            // SAFETY: signalling our own child; ESRCH once it is gone is harmless.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        let mut main_status = None;
        loop {
            let mut status = 0;
            // SAFETY: reaping any child without blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == child {
                main_status = Some(status);
            }
        }
        if let Some(status) = main_status {
            return (exit_code(status), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_drops_to_the_data_owner_unless_told() {
        assert_eq!(
            decide_identity(1000, (65532, 65532), false),
            Identity::Unchanged
        );
        assert_eq!(
            decide_identity(1000, (65532, 65532), true),
            Identity::Unchanged
        );
        assert_eq!(
            decide_identity(0, (65532, 65533), false),
            Identity::Drop {
                uid: 65532,
                gid: 65533
            }
        );
        assert_eq!(
            decide_identity(0, (65532, 65532), true),
            Identity::RootAllowed
        );
        assert_eq!(decide_identity(0, (0, 0), false), Identity::RootOwner);
    }

    #[test]
    fn lookup_tells_not_found_from_not_executable() {
        let dir = std::env::temp_dir().join(format!("bakedb-init-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("plain"), b"").unwrap();
        let path = format!("/nonexistent:{}:/bin:/usr/bin", dir.display());
        assert_eq!(
            resolve("sh", Some(&path)).unwrap().file_name().unwrap(),
            "sh"
        );
        assert_eq!(resolve("plain", Some(&path)).unwrap_err().0, 126);
        let (code, msg) = resolve("no-such-program", Some(&path)).unwrap_err();
        assert_eq!(code, 127);
        assert!(msg.contains("not found in PATH="), "{msg}");
        assert_eq!(resolve("/no/such", None).unwrap_err().0, 127);
        assert_eq!(
            resolve(dir.join("plain").to_str().unwrap(), None)
                .unwrap_err()
                .0,
            126
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
