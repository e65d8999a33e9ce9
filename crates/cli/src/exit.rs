//! Exit codes (documented in the README) and the one place errors are printed.
//!
//! Each step of a command tags its failures with the code of its role (source, base, output)
//! through an anyhow context, so the same library error (say, a digest mismatch) exits 5 when
//! it is found in a base image and 3 when `bakedb verify` finds it.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Internal = 1,
    Usage = 2,
    VerifyFailed = 3,
    Source = 4,
    Base = 5,
    Output = 6,
    Exists = 7,
    NotFound = 8,
}

/// Context carrying an exit code and a message such as "reading base image oci:x:y".
#[derive(Debug)]
pub struct Stage(pub Code, pub String);

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.1)
    }
}

pub trait StageExt<T> {
    fn stage(self, code: Code, what: impl FnOnce() -> String) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> StageExt<T> for Result<T, E> {
    fn stage(self, code: Code, what: impl FnOnce() -> String) -> anyhow::Result<T> {
        self.map_err(|e| e.into().context(Stage(code, what())))
    }
}

/// An engine's error with the exit code of whose fault it is; `what` (may be empty: the
/// engine's message says what was being done) goes in front.
pub fn engine_error(err: bakedb_engines::Error, what: &str) -> anyhow::Error {
    use bakedb_engines::Blame;
    let code = match err.blame() {
        Blame::Usage => Code::Usage,
        Blame::Source => Code::Source,
        Blame::Base => Code::Base,
    };
    anyhow::Error::new(err).context(Stage(code, what.to_owned()))
}

/// A usage error (exit 2): `detail` says what is wrong and what to do, `step` what was
/// being checked.
pub fn usage_error(step: &str, detail: String) -> anyhow::Error {
    anyhow::Error::msg(detail).context(Stage(Code::Usage, step.to_owned()))
}

pub fn code_of(err: &anyhow::Error) -> Code {
    use bakedb_oci::Error as E;
    let stage = err.downcast_ref::<Stage>().map(|s| s.0);
    match (stage, err.downcast_ref::<E>()) {
        (_, Some(E::TagExists { .. } | E::ArchiveExists { .. })) => Code::Exists,
        (_, Some(E::BadReference { .. })) => Code::Usage,
        (Some(Code::VerifyFailed), Some(E::TagNotFound { .. } | E::AmbiguousImage { .. })) => {
            Code::NotFound
        }
        // verify and inspect: an image that cannot be reached at all (no such repository,
        // no access, no registry there) is not an inconsistent one.
        (
            Some(Code::VerifyFailed),
            Some(E::Registry {
                failure:
                    bakedb_oci::RegistryFailure::NotFound
                    | bakedb_oci::RegistryFailure::Unauthorized
                    | bakedb_oci::RegistryFailure::Unreachable,
                ..
            }),
        ) => Code::NotFound,
        (Some(code), _) => code,
        (None, _) => Code::Internal,
    }
}

/// Print the error as one line and exit with its code. A reader that went away (`bakedb
/// inspect REF | head -1`: EPIPE on stdout) is not a failure: exit 0 silently, as ripgrep
/// does. Everything bakedb prints on stdout goes through `stdout()`, so that EPIPE arrives
/// here as an error instead of a panic in println!.
pub fn report_and_exit(err: anyhow::Error) -> ! {
    let broken_pipe = err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        std::process::exit(0);
    }
    // anyhow's `{:#}`, without the empty contexts that carry only an exit code.
    let message: Vec<String> = err
        .chain()
        .map(ToString::to_string)
        .filter(|m| !m.is_empty())
        .collect();
    stderr_line(&format!("bakedb: {}", message.join(": ")));
    std::process::exit(code_of(&err) as i32);
}

/// Buffered stdout whose write errors are returned (println! panics on them). Flush it
/// before returning: an error from the flush is the command's result.
pub fn stdout() -> std::io::BufWriter<std::io::StdoutLock<'static>> {
    std::io::BufWriter::new(std::io::stdout().lock())
}

/// One line on stderr. A closed stderr (`bakedb build 2>&1 | head -1`) does not stop a
/// build: eprintln! would panic, this drops the line.
pub fn stderr_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
