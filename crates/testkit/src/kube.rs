//! `podman kube play` of a Kubernetes manifest, in the test's own podman storage and its own
//! network namespace; the pods, their containers and volumes removed when dropped.
//!
//! podman 4.3 (Debian 12) turns every containerPort into a port published on the host, and
//! refuses `--network none` with ports; a network namespace of the test's own keeps those
//! ports off the host (two tests may play manifests with the same ports at once). The
//! images are pulled before, on the host's network, where the test registry listens.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::containers::{Container, podman_in};
use crate::netns::{Netns, in_netns};
use crate::process::{run_ok, stdout};

/// A podman kube play and the guard that takes it down.
pub struct KubePlay {
    podman: PathBuf,
    dir: PathBuf,
    file: PathBuf,
    conf: PathBuf,
    // Dropped after `drop` took the pods down.
    netns: Netns,
}

impl KubePlay {
    /// Pull `images` into podman's storage under `dir`, then play `yaml` (written to
    /// `dir/manifest.yaml`) in a new network namespace.
    pub fn start(podman: &Path, dir: &Path, yaml: &str, images: &[&str]) -> KubePlay {
        // podman's default limits of descriptors and processes are more than this kind of
        // machine lets a container set (runc: "error setting rlimits"): the values the
        // other tests pass to `podman run --ulimit`, for every container of the play.
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n",
        )
        .unwrap();
        let file = dir.join("manifest.yaml");
        std::fs::write(&file, yaml).unwrap();
        let play = KubePlay {
            podman: podman.to_owned(),
            dir: dir.to_owned(),
            file,
            conf,
            netns: Netns::new(),
        };
        for image in images {
            run_ok(&mut play.host_podman(&["pull", "--quiet", "--tls-verify=false", image]));
        }
        let out = run_ok(play.podman(&["kube", "play"]).arg(&play.file));
        eprintln!("podman kube play: {}", stdout(&out).trim());
        play
    }

    /// podman in the test's storage, on the host's network.
    fn host_podman(&self, args: &[&str]) -> Command {
        let mut cmd = podman_in(&self.podman, &self.dir);
        cmd.env("CONTAINERS_CONF", &self.conf)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// podman in the test's storage and the play's network namespace, with `args`.
    pub fn podman(&self, args: &[&str]) -> Command {
        in_netns(&self.netns.path(), &self.host_podman(args))
    }

    /// A container of the play by name (podman names them POD-CONTAINER, the pod of a
    /// Deployment DEPLOYMENT-pod-N): reached through the play's podman. Dropping it removes
    /// the container, as the play's own guard would.
    pub fn container(&self, name: &str) -> Container<Box<dyn Fn() -> Command>> {
        let (podman, dir, netns, conf) = (
            self.podman.clone(),
            self.dir.clone(),
            self.netns.path(),
            self.conf.clone(),
        );
        Container::new(
            Box::new(move || {
                let mut cmd = podman_in(&podman, &dir);
                cmd.env("CONTAINERS_CONF", &conf);
                in_netns(&netns, &cmd)
            }),
            name.to_owned(),
        )
    }
}

impl Drop for KubePlay {
    fn drop(&mut self) {
        let _ = self.podman(&["kube", "down"]).arg(&self.file).output();
        let _ = self.podman(&["pod", "rm", "--force", "--all"]).output();
        let _ = self.podman(&["volume", "rm", "--force", "--all"]).output();
    }
}
