//! `bakedb watch`: follow a live database and keep an image of it current. Each committed
//! change (as the engine's follower sees it) becomes a generation: a re-bake onto the
//! previous image (`--from`, so only the changed pages ship), written under an immutable tag
//! of its own (`TAG-YYYYMMDDTHHMMSSZ`), then the watched tag moved to it. A tag therefore only
//! ever names a complete image: the output writes every blob before the manifest and the tag.
//!
//! No local state: at start the watched tag, when it exists, is the previous image; only a
//! missing layout, repository or tag means there is none, and a registry that does not answer
//! (or refuses the credentials) is asked again until it does. Failures
//! of the source, the build or the output are logged, counted and retried with backoff; the
//! loop never ends on one. SIGTERM or SIGINT lets the generation being baked finish, then
//! stops (exit 0); a second one abandons it at once (exit 130/143), which the output's atomic
//! writes make safe: the tag still names the last complete image. The registry clients see
//! the first signal too: a request that fails is then not retried, so a registry that is down
//! or failing (at start, or in the middle of a push) abandons the generation at once instead
//! of after the clients' backoff; the tag is moved only after a complete push, so it still
//! names the last complete image.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use bakedb_oci::output::{Output, OutputSettings};
use bakedb_oci::reference::ImageRef;
use bakedb_oci::source::ImageSource;

use crate::build::{self, Built};
use crate::progress::Progress;
use crate::{BuildArgs, duration, exit};
use bakedb_oci::registry::Registries;

#[derive(Args)]
pub struct WatchArgs {
    #[command(flatten)]
    build: BuildArgs,
    /// Least time between the starts of two generations (default 1s; at least 1s).
    #[arg(long, value_name = "DURATION", value_parser = duration::parse, default_value = "1s")]
    min_interval: Duration,
    /// How often the source is asked whether it changed (default 250ms).
    #[arg(long, value_name = "DURATION", value_parser = duration::parse, default_value = "250ms")]
    poll: Duration,
    /// Shell command run after each generation, with its digest in the environment.
    #[arg(
        long,
        value_name = "COMMAND",
        long_help = "A command run with `sh -c` after each generation is written and the tag moved, e.g. 'kubectl set image deploy/catalog db=$BAKEDB_IMAGE'. Its environment has BAKEDB_DIGEST (the manifest digest), BAKEDB_REFERENCE (the watched reference), BAKEDB_IMAGE (the generation's immutable reference), BAKEDB_IMAGE_DIGEST (REPOSITORY@DIGEST for docker:// outputs, else the immutable reference) and BAKEDB_GENERATION. A failure is logged and counted; the loop goes on."
    )]
    exec: Option<String>,
    /// Serve Prometheus metrics on ADDR (GET /metrics), e.g. 127.0.0.1:9187.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Stop after N generations (scripts and tests; default: follow until stopped).
    #[arg(long, value_name = "N")]
    generations: Option<u64>,
}

/// One generation's numbers, for the log line and the metrics.
struct Generation {
    number: u64,
    digest: String,
    immutable: String,
    /// The blobs this generation added (layers not in the previous image, config, manifest).
    bytes_new: u64,
    bake_secs: f64,
    tag_secs: f64,
    /// From the moment the change was seen to the tag naming the new image.
    delay_secs: f64,
    unchanged: bool,
}

pub fn run(mut args: WatchArgs, quiet: bool) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    // Every registry client of the loop (the tag's and each build's) sees the stop: a
    // registry that is down or failing is then not retried for seconds after SIGTERM.
    args.build.registry.stop = Some(Arc::clone(&stop));
    let mut plan = WatchPlan::check(&args)?;
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // A second signal while the first is being honoured ends the process at once.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&stop))
            .context("installing the signal handlers")?;
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handlers")?;
    }
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr, Arc::clone(&metrics))?;
    }
    let engine = bakedb_engines::engine(&args.build.engine).expect("clap checked the engine");
    let options = build::engine_options(
        &args.build.accept,
        args.build.busy_timeout,
        args.build.pg_bin.as_deref(),
        args.build.pg_lazy_copyup,
    );
    let mut follow = engine
        .follow(&args.build.source, &options)
        .map_err(|e| exit::engine_error(e, "following the source"))?;

    let mut backoff = Backoff::default();
    let mut previous = loop {
        match existing(&plan.watched, &plan.registries) {
            Ok(previous) => break previous,
            Err(Unread::Fatal(e)) => return Err(e),
            Err(Unread::Retry(e)) => {
                // Baking a fresh base now would push the whole database again and break
                // the chain the tag holds: wait for the registry instead.
                failed(&metrics, "tag", &e, &mut backoff, &stop);
                if stop.load(Ordering::Relaxed) {
                    if !quiet {
                        log("bakedb watch: stopped before the watched tag could be read");
                    }
                    return Ok(());
                }
                // Refused credentials may have been fixed meanwhile: look them up again.
                plan.registries = plan.registries.fresh();
            }
        }
    };
    backoff = Backoff::default();
    let mut previous_layers: Vec<String> = Vec::new();
    if let Some(reference) = &previous {
        log(&format!(
            "bakedb watch: {} exists; re-baking onto it",
            reference
        ));
    }
    let mut last_position: Option<String> = None;
    let mut last_start: Option<Instant> = None;
    let mut generation = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let position = match follow.position() {
            Ok(p) => p,
            Err(e) => {
                let e = exit::engine_error(e, "following the source");
                failed(&metrics, "source", &e, &mut backoff, &stop);
                continue;
            }
        };
        if last_position.as_ref() == Some(&position) {
            pause(args.poll, &stop);
            continue;
        }
        if let Some(started) = last_start {
            let wait = args.min_interval.saturating_sub(started.elapsed());
            if !wait.is_zero() {
                pause(wait, &stop);
                continue;
            }
        }
        let seen = Instant::now();
        last_start = Some(seen);
        let stamp = stamp(bakedb_oci::time::now());
        let immutable = plan.with_tag(&format!("{}-{stamp}", plan.tag));
        let mut build_args = args.build.clone();
        build_args.output = immutable.clone();
        build_args.from = previous.clone();
        build_args.no_overwrite = true;
        build_args.json = false;
        let mut progress = Progress::new(true);
        let built = match build::build(&build_args, &mut progress) {
            Ok(built) => built,
            Err(e) => {
                if previous.is_none() && generation == 0 && exit::code_of(&e) == exit::Code::Usage {
                    // Flags that can never work: say so once instead of retrying forever.
                    return Err(e);
                }
                failed(&metrics, "build", &e, &mut backoff, &stop);
                continue;
            }
        };
        let bake_secs = seen.elapsed().as_secs_f64();
        let tag_started = Instant::now();
        if let Err(e) = copy_tag(&immutable, &plan.watched, &plan.registries) {
            failed(&metrics, "tag", &e, &mut backoff, &stop);
            // The generation is complete under its own tag: build on it next time.
            previous = Some(immutable);
            continue;
        }
        let tag_secs = tag_started.elapsed().as_secs_f64();
        backoff = Backoff::default();
        generation += 1;
        let Built {
            written,
            data_digest,
        } = built;
        let layers: Vec<String> = written
            .layers
            .iter()
            .map(|l| l.digest.to_string())
            .collect();
        let bytes_new = written
            .layers
            .iter()
            .filter(|l| !previous_layers.contains(&l.digest.to_string()))
            .map(|l| l.size)
            .sum::<u64>()
            + written.manifest_size;
        let unchanged = previous_layers.is_empty() && previous.is_some() && {
            // After a restart nothing is known of the previous image's data but its digest.
            existing_data_digest(&plan.watched, &plan.registries).as_deref()
                == Some(&data_digest.to_string())
        };
        let g = Generation {
            number: generation,
            digest: written.manifest_digest.to_string(),
            immutable: immutable.clone(),
            bytes_new,
            bake_secs,
            tag_secs,
            delay_secs: seen.elapsed().as_secs_f64(),
            unchanged,
        };
        if !quiet {
            log(&g.line(&plan.watched));
        }
        metrics.lock().expect("metrics lock").record(&g);
        if let Some(command) = &args.exec {
            run_hook(command, &plan, &g, &metrics);
        }
        last_position = Some(position);
        previous = Some(immutable);
        previous_layers = layers;
        if args.generations.is_some_and(|n| generation >= n) {
            break;
        }
    }
    if stop.load(Ordering::Relaxed) && !quiet {
        log("bakedb watch: stopped; the tag names the last complete generation");
    }
    Ok(())
}

/// The checked output: a tagged OCI layout or registry reference (an archive is rewritten
/// whole every time, so it cannot follow a database).
struct WatchPlan {
    watched: String,
    tag: String,
    /// How the watched tag is read and moved in a registry: the build's registry flags.
    registries: Registries,
}

impl WatchPlan {
    fn check(args: &WatchArgs) -> Result<WatchPlan> {
        let usage = |detail: String| exit::usage_error("checking bakedb watch's flags", detail);
        if args.build.from.is_some() {
            return Err(usage(
                "--from is bakedb watch's own: each generation is baked onto the previous one (at start, onto --output's tag when it exists)".into(),
            ));
        }
        if args.build.no_overwrite {
            return Err(usage(
                "--no-overwrite cannot be used: bakedb watch moves --output's tag to every new generation".into(),
            ));
        }
        if args.build.json {
            return Err(usage(
                "--json is for bakedb build; bakedb watch logs one line per generation and serves --metrics-listen".into(),
            ));
        }
        if args.min_interval < Duration::from_secs(1) {
            return Err(usage(format!(
                "--min-interval {:?} is below 1s: each generation's immutable tag is named after the second it started",
                args.min_interval
            )));
        }
        if args.build.source.is_dir() {
            // For every engine a directory is a `bakedb snapshot` output.
            return Err(usage(format!(
                "--source {} is a snapshot directory, which never changes; bakedb watch follows a live database",
                args.build.source.display()
            )));
        }
        if args.poll.is_zero() {
            return Err(usage("--poll must be more than 0".into()));
        }
        let output = &args.build.output;
        let transport_ok = output.starts_with("oci:") || output.starts_with("docker://");
        let tag = tag_of(output);
        match tag {
            Some(tag) if transport_ok => {
                if tag.len() > 128 - 17 {
                    return Err(usage(format!(
                        "--output's tag {tag:?} is too long to add a generation's time to (at most 111 characters)"
                    )));
                }
                let output_ref: Option<ImageRef> = output.parse().ok();
                Ok(WatchPlan {
                    watched: output.clone(),
                    tag: tag.to_owned(),
                    registries: args.build.registry.registries(output_ref.as_ref())?,
                })
            }
            _ => Err(usage(format!(
                "--output {output:?}: bakedb watch writes to a tagged OCI layout (oci:DIR:TAG) or registry (docker://HOST/REPO:TAG); an archive would be rewritten whole for every generation"
            ))),
        }
    }

    /// The watched reference with another tag.
    fn with_tag(&self, tag: &str) -> String {
        let base = &self.watched[..self.watched.len() - self.tag.len()];
        format!("{base}{tag}")
    }
}

/// The tag of `oci:DIR:TAG` or `docker://HOST[:PORT]/REPO:TAG`: after the last ':' that
/// follows the last '/', when there is one (and no digest).
fn tag_of(reference: &str) -> Option<&str> {
    if reference.contains('@') {
        return None;
    }
    let (_, rest) = reference.split_once(':')?;
    let last = if reference.starts_with("docker://") {
        let path = rest.trim_start_matches("//");
        let name = &path[path.find('/')? + 1..];
        name.rsplit_once(':')?.1
    } else {
        rest.rsplit_once(':')?.1
    };
    (!last.is_empty() && !last.contains('/')).then_some(last)
}

/// `20261204T174502Z`: a tag-safe UTC time.
fn stamp(epoch: i64) -> String {
    bakedb_oci::time::rfc3339(epoch).replace(['-', ':'], "")
}

/// Why the watched reference could not be read at start.
enum Unread {
    /// The registry did not answer, or refused the credentials: it may later.
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

/// The watched reference when its tag exists; None only when the layout, the repository or
/// the tag is not there yet. An unreachable registry or refused credentials say nothing about
/// the tag, so they are `Unread::Retry`, never None.
fn existing(reference: &str, registries: &Registries) -> Result<Option<String>, Unread> {
    use bakedb_oci::{Error as E, RegistryFailure as F};
    let parsed: ImageRef = reference
        .parse()
        .map_err(|e| Unread::Fatal(exit::usage_error("parsing --output", format!("{e}"))))?;
    // An output that cannot be read cannot be written: exit 6 if it is fatal.
    let what = || {
        exit::Stage(
            exit::Code::Output,
            format!("reading {reference}, the tag bakedb watch moves"),
        )
    };
    let unread = |e: E| match e {
        E::Registry {
            failure: F::Unreachable | F::Unauthorized,
            ..
        } => Unread::Retry(anyhow::Error::new(e).context(what())),
        e => Unread::Fatal(anyhow::Error::new(e).context(what())),
    };
    let source = match ImageSource::open_with(&parsed, registries) {
        Ok(source) => source,
        // A layout without index.json: nothing was written there yet.
        Err(E::Invalid { .. }) if matches!(parsed, ImageRef::Oci { .. }) => return Ok(None),
        Err(e) => return Err(unread(e)),
    };
    match source.resolve() {
        Ok(_) => Ok(Some(reference.to_owned())),
        // A registry answers a missing repository as a missing tag.
        Err(E::TagNotFound { .. }) => Ok(None),
        Err(e) => Err(unread(e)),
    }
}

/// BAKEDB_DATA_DIGEST of the watched image.
fn existing_data_digest(reference: &str, registries: &Registries) -> Option<String> {
    let parsed: ImageRef = reference.parse().ok()?;
    let image = ImageSource::open_with(&parsed, registries)
        .ok()?
        .resolve()
        .ok()?;
    image.config["config"]["Env"]
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str())
        .find_map(|e| e.strip_prefix("BAKEDB_DATA_DIGEST="))
        .map(str::to_owned)
}

/// Point `to`'s tag at the image `from` names: its blobs are already in the output (or, in a
/// registry, mounted or skipped), so only the manifest and the tag are written.
fn copy_tag(from: &str, to: &str, registries: &Registries) -> Result<()> {
    let from_ref: ImageRef = from.parse().context("parsing the generation's reference")?;
    let to_ref: ImageRef = to.parse().context("parsing --output")?;
    let source = ImageSource::open_with(&from_ref, registries)?;
    let image = source.resolve()?;
    let settings = OutputSettings {
        compression: image
            .layers
            .first()
            .map_or(bakedb_oci::compress::Compression::Gzip, |l| l.compression),
        mtime: 0,
        threads: 1,
        overwrite: true,
    };
    let output = Output::open(&to_ref, settings, registries)?;
    let layers = output.reuse_layers(&source, &image)?;
    let annotations = image.manifest["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let written = output.finish(&image.config, layers, &annotations, &mut |_| {})?;
    if written.manifest_digest != image.manifest_digest {
        bail!(
            "moving {to} to {from}: the manifest written ({}) differs from the generation's ({})",
            written.manifest_digest,
            image.manifest_digest
        );
    }
    Ok(())
}

impl Generation {
    fn line(&self, watched: &str) -> String {
        format!(
            "bakedb watch: generation {} {} → {} and {}: {} new, baked and written in {:.2} s, tag moved in {:.2} s, {:.2} s after the change was seen{}",
            self.number,
            self.digest,
            self.immutable,
            watched,
            human_bytes(self.bytes_new),
            self.bake_secs,
            self.tag_secs,
            self.delay_secs,
            if self.unchanged {
                " (the data is unchanged since the image bakedb watch started from)"
            } else {
                ""
            }
        )
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn log(line: &str) {
    exit::stderr_line(line);
}

/// Sleep `total` unless a stop is asked for meanwhile.
fn pause(total: Duration, stop: &AtomicBool) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Retry delays: 1 s doubling to 60 s, reset by a generation that succeeds.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let secs = 1u64 << self.failures.min(6);
        self.failures += 1;
        Duration::from_secs(secs.min(60))
    }
}

fn failed(
    metrics: &Mutex<Metrics>,
    stage: &'static str,
    err: &anyhow::Error,
    backoff: &mut Backoff,
    stop: &AtomicBool,
) {
    metrics.lock().expect("metrics lock").error(stage);
    if stop.load(Ordering::Relaxed) {
        log(&format!(
            "bakedb watch: {stage} failed, not retried: stopping: {err:#}"
        ));
        return;
    }
    let wait = backoff.next();
    log(&format!(
        "bakedb watch: {stage} failed, retrying in {} s: {err:#}",
        wait.as_secs()
    ));
    pause(wait, stop);
}

fn run_hook(command: &str, plan: &WatchPlan, g: &Generation, metrics: &Mutex<Metrics>) {
    let pinned = match plan.watched.strip_prefix("docker://") {
        Some(rest) => {
            let repo = &rest[..rest.len() - plan.tag.len() - 1];
            format!("{repo}@{}", g.digest)
        }
        None => g.immutable.clone(),
    };
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("BAKEDB_DIGEST", &g.digest)
        .env("BAKEDB_REFERENCE", &plan.watched)
        .env("BAKEDB_IMAGE", &g.immutable)
        .env("BAKEDB_IMAGE_DIGEST", pinned)
        .env("BAKEDB_GENERATION", g.number.to_string())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            log(&format!("bakedb watch: --exec command failed ({s})"));
            metrics.lock().expect("metrics lock").error("exec");
        }
        Err(e) => {
            log(&format!(
                "bakedb watch: --exec command could not start: {e}"
            ));
            metrics.lock().expect("metrics lock").error("exec");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics.

const DELAY_BUCKETS: [f64; 9] = [0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
struct Metrics {
    generation: u64,
    generations: u64,
    bytes: u64,
    last_bake_secs: f64,
    last_tag_secs: f64,
    last_success: f64,
    delay_counts: [u64; DELAY_BUCKETS.len()],
    delay_sum: f64,
    errors: Vec<(&'static str, u64)>,
}

impl Metrics {
    fn record(&mut self, g: &Generation) {
        self.generation = g.number;
        self.generations += 1;
        self.bytes += g.bytes_new;
        self.last_bake_secs = g.bake_secs;
        self.last_tag_secs = g.tag_secs;
        self.last_success = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        for (count, bound) in self.delay_counts.iter_mut().zip(DELAY_BUCKETS) {
            if g.delay_secs <= bound {
                *count += 1;
            }
        }
        self.delay_sum += g.delay_secs;
    }

    fn error(&mut self, stage: &'static str) {
        match self.errors.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, n)) => *n += 1,
            None => self.errors.push((stage, 1)),
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "bakedb_watch_generation",
            "gauge",
            "Generations written since bakedb watch started.",
            self.generation.to_string(),
        );
        metric(
            "bakedb_watch_bytes_total",
            "counter",
            "Bytes of blobs the generations added (new layers, configs, manifests).",
            self.bytes.to_string(),
        );
        metric(
            "bakedb_watch_bake_seconds",
            "gauge",
            "Seconds the last generation took to bake and write.",
            self.last_bake_secs.to_string(),
        );
        metric(
            "bakedb_watch_tag_seconds",
            "gauge",
            "Seconds the last generation took to move the watched tag.",
            self.last_tag_secs.to_string(),
        );
        metric(
            "bakedb_watch_last_success_timestamp_seconds",
            "gauge",
            "When the watched tag last moved (Unix time).",
            self.last_success.to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP bakedb_watch_delay_seconds From a change seen on the source to the tag naming its image.\n# TYPE bakedb_watch_delay_seconds histogram"
        );
        for (count, bound) in self.delay_counts.iter().zip(DELAY_BUCKETS) {
            let _ = writeln!(
                out,
                "bakedb_watch_delay_seconds_bucket{{le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "bakedb_watch_delay_seconds_bucket{{le=\"+Inf\"}} {}\nbakedb_watch_delay_seconds_sum {}\nbakedb_watch_delay_seconds_count {}",
            self.generations, self.delay_sum, self.generations
        );
        let _ = writeln!(
            out,
            "# HELP bakedb_watch_errors_total Failures, by stage (source, build, tag: reading the watched tag at start or moving it, exec); each is retried.\n# TYPE bakedb_watch_errors_total counter"
        );
        for stage in ["source", "build", "tag", "exec"] {
            let n = self
                .errors
                .iter()
                .find(|(s, _)| *s == stage)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "bakedb_watch_errors_total{{stage=\"{stage}\"}} {n}");
        }
        out
    }
}

/// Answer `GET /metrics` on `addr` from a thread of its own (one request at a time: a
/// scraper's load).
fn serve_metrics(addr: SocketAddr, metrics: Arc<Mutex<Metrics>>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| exit::usage_error("binding --metrics-listen", format!("{addr}: {e}")))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", metrics.lock().expect("metrics lock").text())
            } else {
                ("404 Not Found", "GET /metrics\n".to_owned())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_of_layouts_and_registries() {
        assert_eq!(tag_of("oci:out:live"), Some("live"));
        assert_eq!(tag_of("oci:/a/b:c/d:live"), Some("live"));
        assert_eq!(tag_of("oci:out"), None);
        assert_eq!(
            tag_of("docker://127.0.0.1:5000/cat/alog:live"),
            Some("live")
        );
        assert_eq!(tag_of("docker://127.0.0.1:5000/catalog"), None);
        assert_eq!(tag_of("docker://r/c@sha256:ab"), None);
        assert_eq!(stamp(1_764_870_302), "20251204T174502Z");
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..8).map(|_| b.next().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn metrics_count_generations_delays_and_errors() {
        let mut m = Metrics::default();
        let g = |number, delay_secs| Generation {
            number,
            digest: "sha256:ab".into(),
            immutable: "oci:o:t-1".into(),
            bytes_new: 1000,
            bake_secs: 0.5,
            tag_secs: 0.01,
            delay_secs,
            unchanged: false,
        };
        m.record(&g(1, 0.4));
        m.record(&g(2, 4.0));
        m.error("build");
        let text = m.text();
        for line in [
            "bakedb_watch_generation 2",
            "bakedb_watch_bytes_total 2000",
            "bakedb_watch_delay_seconds_bucket{le=\"0.5\"} 1",
            "bakedb_watch_delay_seconds_bucket{le=\"5\"} 2",
            "bakedb_watch_delay_seconds_bucket{le=\"+Inf\"} 2",
            "bakedb_watch_delay_seconds_count 2",
            "bakedb_watch_errors_total{stage=\"build\"} 1",
            "bakedb_watch_errors_total{stage=\"tag\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
    }
}
