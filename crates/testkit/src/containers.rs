//! Containers and images of docker, podman and runc, each removed when its guard is dropped,
//! however the test or bench ends.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::process::{run, run_ok, stderr, stdout};
use crate::tools::{require_root, skip, tool};

/// How to reach a container engine: `docker`, or podman with the flags of its own storage.
pub type Cli = Box<dyn Fn() -> Command + Send + Sync>;

pub fn docker_cli(docker: &Path) -> Cli {
    let docker = docker.to_owned();
    Box::new(move || Command::new(&docker))
}

/// podman in its own storage under `dir` (see [`podman_in`]).
pub fn podman_cli(podman: &Path, dir: &Path) -> Cli {
    let (podman, dir) = (podman.to_owned(), dir.to_owned());
    Box::new(move || podman_in(&podman, &dir))
}

/// podman and runc, the runtime `podman_in` gives it: podman's path, or None (the test is
/// skipped) locally; under CI a missing one fails the test.
pub fn podman() -> Option<PathBuf> {
    let podman = tool("podman")?;
    tool("runc")?;
    Some(podman)
}

/// podman in its own storage under `dir` (nothing shared with other tests or the machine's
/// images), with the flags that work as root on this kind of machine.
pub fn podman_in(podman: &Path, dir: &Path) -> Command {
    let state = dir.join("podman-state");
    let mut cmd = Command::new(podman);
    cmd.current_dir(dir)
        .arg("--root")
        .arg(state.join("root"))
        .arg("--runroot")
        .arg(state.join("run"))
        .arg("--tmpdir")
        .arg(state.join("tmp"))
        .args([
            "--storage-driver",
            "vfs",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]);
    cmd
}

/// Debian's docker client (BAKEDB_TEST_DOCKER, else /usr/bin/docker: /usr/local/bin/docker may
/// be a newer client than the daemon speaks) when a daemon answers it. No daemon skips locally
/// and fails under CI, like a missing tool: .ci/run starts one.
pub fn docker() -> Option<PathBuf> {
    let docker = std::env::var_os("BAKEDB_TEST_DOCKER")
        .map_or_else(|| PathBuf::from("/usr/bin/docker"), PathBuf::from);
    if !docker.is_file() {
        skip(
            &format!("{} is not installed", docker.display()),
            ".ci/run must install docker.io",
        );
        return None;
    }
    // `docker version` fails when no daemon answers; `docker info` exits 0 on some versions.
    let out = run(Command::new(&docker).args(["version", "--format", "{{.Server.Version}}"]));
    if !out.status.success() {
        skip(
            &format!("no Docker daemon answers {}", docker.display()),
            &format!(".ci/run must start dockerd\n{}", stderr(&out)),
        );
        return None;
    }
    Some(docker)
}

/// A docker image loaded for one test or bench, removed (`rmi --force`) when dropped.
pub struct DockerImage {
    pub docker: PathBuf,
    pub name: String,
}

impl Drop for DockerImage {
    fn drop(&mut self) {
        let _ = Command::new(&self.docker)
            .args(["rmi", "--force", &self.name])
            .output();
    }
}

/// A container of docker or podman (`cli` makes the command), removed with its anonymous
/// volumes (`rm --force --volumes`, killed if need be) when dropped. Reached by name.
pub struct Container<C: Fn() -> Command = Cli> {
    cli: C,
    pub name: String,
}

impl<C: Fn() -> Command> Drop for Container<C> {
    fn drop(&mut self) {
        let _ = (self.cli)()
            .args(["rm", "--force", "--volumes", &self.name])
            .output();
    }
}

impl<C: Fn() -> Command> Container<C> {
    /// The guard of the container `name`, which the caller creates (`run`, `create`).
    pub fn new(cli: C, name: String) -> Self {
        Container { cli, name }
    }

    /// The engine's command with `args`, stdin closed.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = (self.cli)();
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    /// `inspect --format FORMAT`, trimmed; panics if it fails.
    pub fn inspect(&self, format: &str) -> String {
        stdout(&run_ok(
            &mut self.cmd(&["inspect", "--format", format, &self.name]),
        ))
        .trim()
        .to_owned()
    }

    pub fn running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    pub fn exit_code(&self) -> i64 {
        let code = self.inspect("{{.State.ExitCode}}");
        code.parse()
            .unwrap_or_else(|e| panic!("exit code {code:?}: {e}"))
    }

    /// The host PID of the container's first process.
    pub fn pid(&self) -> u32 {
        let pid = self.inspect("{{.State.Pid}}");
        pid.parse().unwrap_or_else(|e| panic!("pid {pid:?}: {e}"))
    }

    /// `logs`, both streams as they are; panics if it fails.
    pub fn logs_output(&self) -> Output {
        run_ok(&mut self.cmd(&["logs", &self.name]))
    }

    /// Both streams of the container's output, stdout first (empty if `logs` fails).
    pub fn logs(&self) -> String {
        let out = run(&mut self.cmd(&["logs", &self.name]));
        format!("{}{}", stdout(&out), stderr(&out))
    }

    /// `cp` a host file into the container.
    pub fn copy_in(&self, host: &Path, path: &str) {
        run_ok(
            self.cmd(&["cp"])
                .arg(host)
                .arg(format!("{}:{path}", self.name)),
        );
    }

    /// `cp` a file of the container to the host.
    pub fn copy_out(&self, path: &str, host: &Path) {
        run_ok(
            self.cmd(&["cp", &format!("{}:{path}", self.name)])
                .arg(host),
        );
    }

    /// `start --attach`: the container's output and exit code.
    pub fn start_attached(&self) -> Output {
        run(&mut self.cmd(&["start", "--attach", &self.name]))
    }

    /// Poll `ready` until it says yes (Ok); panic with the container's log when the
    /// container stops first or `patience` runs out. `what` names the condition.
    pub fn wait_until(
        &self,
        what: &str,
        patience: Duration,
        ready: &dyn Fn() -> Result<(), String>,
    ) {
        let started = Instant::now();
        loop {
            let last = match ready() {
                Ok(()) => return,
                Err(e) => e,
            };
            assert!(
                self.running(),
                "{} stopped ({}) before {what} ({last}):\n{}",
                self.name,
                self.exit_code(),
                self.logs()
            );
            assert!(
                started.elapsed() < patience,
                "{}: not {what} after {patience:?} ({last}):\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Until the container has stopped (`patience` at most); its exit code.
    pub fn wait_stopped(&self, patience: Duration) -> i64 {
        let started = Instant::now();
        while self.running() {
            assert!(
                started.elapsed() < patience,
                "{} still runs after {patience:?}:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.exit_code()
    }

    /// What `diff` lists: every path added, changed or deleted in the writable layer.
    pub fn diff(&self) -> Vec<String> {
        let out = run_ok(&mut self.cmd(&["diff", &self.name]));
        stdout(&out).lines().map(str::to_owned).collect()
    }
}

/// runc and umoci, for a test that unpacks an image as root (real ownership in the bundle)
/// and runs it with runc (not rootless): None skips the test locally; under CI a missing tool,
/// or not being root, fails it.
pub fn runc_and_umoci_as_root() -> Option<(PathBuf, PathBuf)> {
    let runc = tool("runc")?;
    let umoci = tool("umoci")?;
    require_root().then_some((runc, umoci))
}

/// runc with its state under a directory of the test's (`runc --root STATE`).
pub struct Runc {
    pub program: PathBuf,
    pub state: PathBuf,
}

impl Runc {
    pub fn new(program: &Path, state: &Path) -> Runc {
        Runc {
            program: program.to_owned(),
            state: state.to_owned(),
        }
    }

    /// `runc --root STATE ARGS`, stdin closed.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--root")
            .arg(&self.state)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }
}

/// `runc run` of a bundle in the background, a child of this process whose exit status is the
/// container's; its output collected. Killed and deleted when dropped.
pub struct RuncContainer {
    runc: Runc,
    pub name: String,
    child: Mutex<Child>,
    log: Arc<Mutex<String>>,
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if child.try_wait().ok().flatten().is_none() {
            let _ = self.runc.cmd(&["kill", &self.name, "KILL"]).output();
            let _ = child.wait();
        }
        drop(child);
        let _ = self.runc.cmd(&["delete", "--force", &self.name]).output();
    }
}

impl RuncContainer {
    pub fn start(runc: Runc, bundle: &Path, name: String) -> RuncContainer {
        let mut child = runc
            .cmd(&["run", "--bundle"])
            .arg(bundle)
            .arg(&name)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("runc run: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        RuncContainer {
            runc,
            name,
            child: Mutex::new(child),
            log,
        }
    }

    /// `runc --root STATE ARGS` for this container's runc.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.runc.cmd(args)
    }

    pub fn running(&self) -> bool {
        self.child.lock().unwrap().try_wait().unwrap().is_none()
    }

    /// What the container printed so far, both streams.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The host PID of the container's first process, from `runc state`.
    pub fn pid(&self) -> u32 {
        let out = run_ok(&mut self.cmd(&["state", &self.name]));
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        state["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("runc state: {state}")) as u32
    }

    /// Wait for `runc run` to end (`patience` at most): the container's exit status.
    pub fn wait(&self, patience: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.lock().unwrap().try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < patience,
                "the container has not exited {patience:?} after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
