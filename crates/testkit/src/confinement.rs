//! What the kernel says about a running process's confinement (/proc/PID/status and
//! mountinfo, read from the host): its user, capabilities, no_new_privs, seccomp, and which
//! mounts are writable. Lets a test check what a runtime applied rather than what it was
//! asked for.

/// A field of /proc/PID/status (e.g. "Uid"), its whitespace collapsed to single spaces.
pub fn proc_status(pid: u32, field: &str) -> String {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {path}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// (mount point, mount options) of every mount process `pid` sees, in mount order.
pub fn mounts(pid: u32) -> Vec<(String, String)> {
    let path = format!("/proc/{pid}/mountinfo");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            (fields[4].to_owned(), fields[5].to_owned())
        })
        .collect()
}

/// The confinement of a Kubernetes pod with `runAsUser`/`runAsGroup`, `capabilities: drop:
/// [ALL]`, `allowPrivilegeEscalation: false`, `seccompProfile: RuntimeDefault` and
/// `readOnlyRootFilesystem: true`, and the writable mounts it has (its emptyDirs); the same
/// as `docker run --user --cap-drop ALL --security-opt no-new-privileges --read-only
/// --tmpfs`.
pub struct Confinement<'a> {
    pub uid: u32,
    pub gid: u32,
    pub writable: &'a [&'a str],
}

impl Confinement<'_> {
    /// Panics, naming `what`, unless process `pid` runs as uid:gid (real, effective, saved
    /// and filesystem ids), holds no capability at all, cannot gain privileges, has a
    /// seccomp filter, sees its root read-only and each of `writable` mounted read-write.
    pub fn assert_holds(&self, pid: u32, what: &str) {
        let ids = |id: u32| format!("{id} {id} {id} {id}");
        assert_eq!(proc_status(pid, "Uid"), ids(self.uid), "{what}: uid");
        assert_eq!(proc_status(pid, "Gid"), ids(self.gid), "{what}: gid");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(proc_status(pid, caps), "0000000000000000", "{what}: {caps}");
        }
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "{what}: NoNewPrivs");
        // 2: SECCOMP_MODE_FILTER, the runtime's default profile.
        assert_eq!(
            proc_status(pid, "Seccomp"),
            "2",
            "{what}: no seccomp filter"
        );
        let mounts = mounts(pid);
        // The last mount at a point is the one the process sees.
        let options = |point: &str| {
            mounts
                .iter()
                .rev()
                .find(|(p, _)| p == point)
                .map(|(_, o)| o.split(',').map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_else(|| panic!("{what}: nothing mounted at {point}: {mounts:?}"))
        };
        assert!(
            options("/").iter().any(|o| o == "ro"),
            "{what}: the root is not read-only: {mounts:?}"
        );
        for point in self.writable {
            assert!(
                options(point).iter().any(|o| o == "rw"),
                "{what}: {point} is not writable: {mounts:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_read_as_the_kernel_sees_it() {
        let pid = std::process::id();
        let uid = crate::tools::effective_uid();
        assert_eq!(
            proc_status(pid, "Uid").split(' ').nth(1),
            Some(uid.to_string().as_str())
        );
        assert!(mounts(pid).iter().any(|(point, _)| point == "/"));
    }

    #[test]
    fn an_unconfined_process_fails_the_check_naming_what() {
        // The test runner is not a confined container process: a uid it does not have, or
        // (as root) capabilities, or a writable root fail the check.
        let pid = std::process::id();
        let other = crate::tools::effective_uid().wrapping_add(1);
        let failed = std::panic::catch_unwind(|| {
            Confinement {
                uid: other,
                gid: other,
                writable: &[],
            }
            .assert_holds(pid, "the test runner")
        });
        let message = failed.expect_err("an unconfined process passed");
        let message = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(message.contains("the test runner: uid"), "{message}");
    }
}
