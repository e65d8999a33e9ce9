//! Timing a run: wall time, peak RSS and CPU time (GNU time, when installed), and how much of
//! the machine other processes took meanwhile; waiting for a quiet machine and timing again
//! when it was not; page cache states; medians and ranges of the rounds.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::tools::failed;

/// One timed run.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub secs: f64,
    pub peak_rss_kib: Option<u64>,
    pub cpu_secs: Option<f64>,
    /// What the run produced (a manifest digest, an image id), to judge reproducibility.
    pub digest: Option<String>,
    pub output_bytes: Option<u64>,
    /// The program's own per-phase timings, from its log lines.
    pub phases: Vec<(String, f64)>,
    /// Share of all cores that other processes used during the run: above a few per cent,
    /// the machine was not quiet and the time is suspect.
    pub other_load: Option<f64>,
}

impl Sample {
    /// The largest peak RSS of `samples`, in MiB.
    pub fn peak_rss_mib(samples: &[Sample]) -> Option<f64> {
        samples
            .iter()
            .filter_map(|s| s.peak_rss_kib)
            .max()
            .map(|k| k as f64 / 1024.0)
    }

    /// The largest share of the cores other processes took during one of `samples`.
    pub fn most_other_load(samples: &[Sample]) -> Option<f64> {
        samples
            .iter()
            .filter_map(|s| s.other_load)
            .max_by(f64::total_cmp)
    }
}

pub struct Timer {
    pub gnu_time: Option<PathBuf>,
    /// Where GNU time writes its report.
    pub report: PathBuf,
}

pub struct Finished {
    pub sample: Sample,
    pub stdout: String,
    pub stderr: String,
}

impl Timer {
    /// A timer that uses /usr/bin/time (GNU time) when it is installed and reports into
    /// `report`.
    pub fn new(report: PathBuf) -> Timer {
        let gnu_time = Path::new("/usr/bin/time");
        Timer {
            gnu_time: gnu_time.is_file().then(|| gnu_time.to_owned()),
            report,
        }
    }

    /// Run `cmd` to completion under GNU time (when installed) and time it; stdout is captured
    /// unless `discard_stdout`, in which case it goes to /dev/null as the shell's `> /dev/null`.
    pub fn run(&self, cmd: &mut Command, discard_stdout: bool) -> Result<Finished> {
        let mut wrapped = match &self.gnu_time {
            Some(time) => {
                let mut w = Command::new(time);
                w.args(["-f", "%M %U %S", "-o"])
                    .arg(&self.report)
                    .arg(cmd.get_program())
                    .args(cmd.get_args());
                for (key, value) in cmd.get_envs() {
                    match value {
                        Some(v) => w.env(key, v),
                        None => w.env_remove(key),
                    };
                }
                if let Some(dir) = cmd.get_current_dir() {
                    w.current_dir(dir);
                }
                w
            }
            None => std::mem::replace(cmd, Command::new("true")),
        };
        wrapped.stdin(Stdio::null()).stderr(Stdio::piped());
        wrapped.stdout(if discard_stdout {
            Stdio::null()
        } else {
            Stdio::piped()
        });
        let cpu_before = CpuTimes::now();
        let started = Instant::now();
        let out = wrapped
            .output()
            .with_context(|| format!("running {:?}", wrapped.get_program()))?;
        let secs = started.elapsed().as_secs_f64();
        let busy = cpu_before
            .zip(CpuTimes::now())
            .map(|(a, b)| a.busy_fraction_until(&b));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(failed(&wrapped, &out));
        }
        let mut sample = Sample {
            secs,
            ..Sample::default()
        };
        if self.gnu_time.is_some() {
            let report = fs::read_to_string(&self.report)
                .with_context(|| format!("reading {}", self.report.display()))?;
            let fields: Vec<&str> = report
                .lines()
                .last()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            if let [rss, user, sys] = fields[..] {
                sample.peak_rss_kib = rss.parse().ok();
                sample.cpu_secs = user
                    .parse::<f64>()
                    .ok()
                    .zip(sys.parse::<f64>().ok())
                    .map(|(u, s)| u + s);
            }
        }
        sample.other_load = busy
            .zip(sample.cpu_secs)
            .map(|(busy, own)| (busy - own / (secs * nproc() as f64)).max(0.0));
        Ok(Finished {
            sample,
            stdout,
            stderr,
        })
    }
}

/// The cores this process may use.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Clock ticks per second, the unit of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    super::run_quiet(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The fields of /proc/PID/stat after the command's closing parenthesis (field 3 on).
fn proc_stat(pid: u32) -> Option<Vec<u64>> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<Vec<u64>> {
    // The command may hold spaces and parentheses; the state (field 3) is a letter, and 0 in
    // its place keeps the numbering.
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
pub fn process_cpu_ticks(pid: u32) -> Option<u64> {
    let f = proc_stat(pid)?;
    Some(f.get(11)? + f.get(12)?)
}

/// CPU time of a server and its children, in clock ticks: its own, its children's that it
/// has reaped (fields 16 and 17) and its live children's. Taken before and after a run, the
/// difference is what the server did meanwhile, however many children came and went.
pub fn server_cpu_ticks(pid: u32) -> Option<u64> {
    let own = proc_stat(pid)?;
    let mut ticks = own.get(11)? + own.get(12)? + own.get(13)? + own.get(14)?;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = proc_stat(child)
            && f.get(1) == Some(&u64::from(pid))
        {
            ticks += f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
        }
    }
    Some(ticks)
}

/// The machine-wide counters of /proc/stat's first line, in clock ticks.
#[derive(Clone, Copy)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    fn now() -> Option<CpuTimes> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let idle = ticks.get(3)? + ticks.get(4)?;
        let total: u64 = ticks.iter().take(8).sum();
        Some(CpuTimes {
            busy: total - idle,
            total,
        })
    }

    /// Share of all cores busy between `self` and `later`.
    fn busy_fraction_until(&self, later: &CpuTimes) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 {
            0.0
        } else {
            later.busy.saturating_sub(self.busy) as f64 / total as f64
        }
    }
}

/// Share of all cores taken by other processes above which a timed run is repeated.
pub const NOISY: f64 = 0.10;
/// How many times a noisy run is taken again, at most.
pub const NOISY_RETRIES: usize = 3;

/// Run `attempt` (which prepares and times one run) again while other processes used more
/// than `threshold` of the cores during it (`other_load` says how much), at most
/// NOISY_RETRIES more times: the last result.
pub fn until_quiet<T>(
    threshold: f64,
    mut attempt: impl FnMut() -> Result<T>,
    other_load: impl Fn(&T) -> Option<f64>,
) -> Result<T> {
    let mut result = attempt()?;
    for _ in 0..NOISY_RETRIES {
        match other_load(&result) {
            Some(load) if load > threshold => {
                eprintln!(
                    "xtask:   other processes used {:.0} % of the CPU during the run; timing it again",
                    load * 100.0
                );
                result = attempt()?;
            }
            _ => break,
        }
    }
    Ok(result)
}

/// A started container and how long it took: the first answer it gave, seconds from spawning
/// `docker run -d` to that answer, and to `docker run -d`'s exit (the container started).
pub struct FirstAnswer<T> {
    pub answer: T,
    pub secs: f64,
    pub returned: Option<f64>,
}

/// Spawn `docker_run` (`docker run -d … IMAGE`) now and ask the container every `poll` until
/// it answers: `ask` (told whether `docker run -d` has returned) gives the answer, None for
/// not yet, or an error that ends the wait; after `timeout`, `timed_out` is the error.
pub fn first_answer<T>(
    docker_run: &mut Command,
    image: &str,
    poll: Duration,
    timeout: Duration,
    mut ask: impl FnMut(bool) -> Result<Option<T>>,
    timed_out: impl FnOnce() -> anyhow::Error,
) -> Result<FirstAnswer<T>> {
    docker_run
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = docker_run.spawn().context("starting docker run")?;
    let mut returned = None;
    let (answer, secs) = loop {
        if returned.is_none()
            && let Some(status) = child.try_wait()?
        {
            returned = Some(started.elapsed().as_secs_f64());
            if !status.success() {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                anyhow::bail!("docker run {image} failed ({status}): {}", stderr.trim());
            }
        }
        if let Some(answer) = ask(returned.is_some())? {
            break (answer, started.elapsed().as_secs_f64());
        }
        if started.elapsed() > timeout {
            return Err(timed_out());
        }
        std::thread::sleep(poll);
    };
    if returned.is_none() {
        let status = child.wait()?;
        returned = Some(started.elapsed().as_secs_f64());
        if !status.success() {
            anyhow::bail!("docker run exited with {status} after the container answered");
        }
    }
    Ok(FirstAnswer {
        answer,
        secs,
        returned,
    })
}

/// Wait (up to two minutes) until other processes leave the cores alone: on a shared machine a
/// compiler in the background would otherwise be timed along with the case.
pub fn wait_until_quiet() {
    const QUIET: f64 = 0.10;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut told = false;
    loop {
        let before = CpuTimes::now();
        std::thread::sleep(Duration::from_millis(1000));
        let Some(busy) = before
            .zip(CpuTimes::now())
            .map(|(a, b)| a.busy_fraction_until(&b))
        else {
            return;
        };
        if busy < QUIET {
            return;
        }
        if Instant::now() > deadline {
            eprintln!(
                "xtask:   the machine is still {:.0} % busy; timing anyway",
                busy * 100.0
            );
            return;
        }
        if !told {
            eprintln!(
                "xtask:   waiting for the machine to go quiet ({:.0} % of all cores busy)",
                busy * 100.0
            );
            told = true;
        }
    }
}

/// The page cache state a case runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    Cold,
    Warm,
}

impl Cache {
    pub const BOTH: [Cache; 2] = [Cache::Cold, Cache::Warm];

    pub fn name(self) -> &'static str {
        match self {
            Cache::Cold => "cold",
            Cache::Warm => "warm",
        }
    }
}

/// Whether cold cases can be measured here (root may drop the page cache, which this tries
/// once): Ok, or why not, as the report says it.
pub fn cold_cache() -> Result<(), String> {
    match bakedb_testkit::tools::effective_uid() {
        0 => drop_caches(),
        uid => Err(format!(
            "not measured: dropping the page cache needs root (running as uid {uid})"
        )),
    }
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`.
pub fn drop_caches() -> Result<(), String> {
    sync();
    fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("not measured: writing /proc/sys/vm/drop_caches: {e}"))
}

/// Read the whole file once so the timed runs find it in the page cache.
pub fn warm(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    while file
        .read(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?
        > 0
    {}
    Ok(())
}

/// Write back dirty pages (the previous run's output) so they do not land in the next run.
pub fn sync() {
    let _ = Command::new("sync").status();
}

pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// The value below which a share `p` of the values lie (the nearest rank).
pub fn percentile(values: impl IntoIterator<Item = f64>, p: f64) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let last = values.len().checked_sub(1)?;
    Some(values[((last as f64) * p).round() as usize])
}

/// The lowest and the highest value.
pub fn range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values.into_iter().fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// `a / b` when both are known and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(vec![3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(percentile((1..=10).map(f64::from), 0.9), Some(9.0));
        assert_eq!(percentile(vec![], 0.9), None);
    }

    #[test]
    fn reads_cpu_times() {
        let stat =
            "4242 (postgres: bench (x)) S 4200 4242 4242 0 -1 4194560 1 2 0 0 17 5 30 12 20 0";
        let f = parse_stat(stat).unwrap();
        assert_eq!(
            (f[0], f[1], f[11], f[12], f[13], f[14]),
            (0, 4200, 17, 5, 30, 12)
        );
        let me = std::process::id();
        let own = process_cpu_ticks(me).unwrap();
        assert!(server_cpu_ticks(me).unwrap() >= own);
    }

    #[test]
    fn ranges() {
        assert_eq!(range([2.0, 3.5, 1.25]), Some((1.25, 3.5)));
        assert_eq!(range([]), None);
    }
}
