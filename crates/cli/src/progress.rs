//! Progress: a bar on a terminal, one plain line per phase elsewhere (CI logs), nothing with
//! --quiet.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    quiet: bool,
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        let interactive =
            !quiet && std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
        Progress {
            quiet,
            bar: interactive.then(ProgressBar::hidden),
            started: Instant::now(),
        }
    }

    /// Start a phase of `total` bytes (0: unknown).
    pub fn phase(&mut self, message: &str, total: u64) {
        self.started = Instant::now();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:24} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(message.to_owned());
            self.bar = Some(bar);
        }
    }

    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// End the phase with a line that stays in the log.
    pub fn done(&self, line: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if !self.quiet {
            crate::exit::stderr_line(&format!(
                "bakedb: {line} ({:.2} s)",
                self.started.elapsed().as_secs_f64()
            ));
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
