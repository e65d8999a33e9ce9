//! Running programs and stopping the ones a harness started.

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::Error;

/// The signals [`stop`] sends, for crates without libc.
pub use libc::{SIGINT, SIGTERM};

/// Run to completion; panics only when the program cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// Run and require success; the panic message carries both output streams.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run and require success, as an error instead of a panic.
pub fn checked(cmd: &mut Command) -> Result<Output, Error> {
    let out = cmd.output().map_err(|source| Error::Spawn {
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Failed {
            command: format!("{cmd:?}"),
            status: out.status,
            output: stderr(&out),
        });
    }
    Ok(out)
}

/// The last line of `text` that is not blank, trimmed: what a failed tool says last.
pub fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// Send `signal` to `child` and wait up to `patience` for it to exit, then SIGKILL it. Reaps
/// it either way; whether it exited without the kill.
pub fn stop(child: &mut Child, signal: libc::c_int, patience: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child, so it
    // cannot have been reused by another process.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
