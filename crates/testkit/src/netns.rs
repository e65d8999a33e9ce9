//! Network namespaces: a test's own (`ip netns add`), commands and threads run inside one,
//! and a container's or pod's, entered from the host (as root). Lets a test reach a port a
//! container listens on without publishing it on the host, where fixed ports would collide.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::dirs::unique_name;
use crate::process::run_ok;

/// A network namespace of the test's own with its loopback up, deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let netns = Netns {
            name: unique_name("bakedb-test"),
        };
        run_ok(Command::new("ip").args(["netns", "add", &netns.name]));
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &netns.name,
            "ip",
            "link",
            "set",
            "lo",
            "up",
        ]));
        netns
    }

    /// The namespace's file, for `nsenter --net=` or `setns`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// `cmd` (its program, arguments, directory and environment) run through `nsenter
/// --net=NETNS`: inside the network namespace whose file is `netns`.
pub fn in_netns(netns: &Path, cmd: &Command) -> Command {
    let mut wrapped = Command::new("nsenter");
    wrapped
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    wrapped
}

/// `cmd` run in the network namespace of process `pid` (a container's first process).
pub fn in_netns_of_pid(pid: u32, cmd: &Command) -> Command {
    in_netns(&PathBuf::from(format!("/proc/{pid}/ns/net")), cmd)
}

/// Run `f` on a thread that joined the network namespace of process `pid`, so that
/// 127.0.0.1 is that container's loopback (the kit's HTTP client works there as on the
/// host). Only that thread changes namespace; it ends with `f`.
pub fn on_thread_in_netns_of_pid<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/proc/{pid}/ns/net");
    let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a valid descriptor of a network namespace; setns changes only the
            // calling thread, which ends when `f` returns.
            let done = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(done, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_keeps_its_program_arguments_directory_and_environment_in_a_netns() {
        let mut cmd = Command::new("/usr/bin/podman");
        cmd.args(["kube", "play", "m.yaml"])
            .current_dir("/tmp")
            .env("CONTAINERS_CONF", "/x/containers.conf")
            .env_remove("PGPASSWORD");
        let wrapped = in_netns(Path::new("/run/netns/n"), &cmd);
        assert_eq!(wrapped.get_program(), "nsenter");
        let args: Vec<_> = wrapped.get_args().collect();
        assert_eq!(
            args,
            [
                "--net=/run/netns/n",
                "--",
                "/usr/bin/podman",
                "kube",
                "play",
                "m.yaml"
            ]
        );
        assert_eq!(wrapped.get_current_dir(), Some(Path::new("/tmp")));
        let envs: Vec<_> = wrapped.get_envs().collect();
        assert!(envs.contains(&(
            "CONTAINERS_CONF".as_ref(),
            Some("/x/containers.conf".as_ref())
        )));
        assert!(envs.contains(&("PGPASSWORD".as_ref(), None)));
        let of_pid = in_netns_of_pid(42, &cmd);
        assert_eq!(
            of_pid.get_args().next(),
            Some("--net=/proc/42/ns/net".as_ref())
        );
    }
}
