//! The decisions of the shim as pure functions (no system calls), unit-tested on their own:
//! which opens qualify for a read-only open, with which flags a descriptor is reopened, and
//! the run-time configuration from the environment.

use std::ffi::c_int;

/// The directories of a data directory whose files the shim may open read-only, one bit
/// each. `base` and `global` hold the relation files (tables, indexes, their forks); the
/// others are PostgreSQL's SLRUs and the WAL, which are opened read-write too but are
/// usually written anyway (see the crate docs), so they are off by default.
pub const BASE: u16 = 1 << 0;
pub const GLOBAL: u16 = 1 << 1;
pub const PG_XACT: u16 = 1 << 2;
pub const PG_MULTIXACT: u16 = 1 << 3;
pub const PG_SUBTRANS: u16 = 1 << 4;
pub const PG_COMMIT_TS: u16 = 1 << 5;
pub const PG_SERIAL: u16 = 1 << 6;
pub const PG_NOTIFY: u16 = 1 << 7;
pub const PG_WAL: u16 = 1 << 8;

/// The relation files: what the shim covers when BAKEDB_COPYUP_SHIM_DIRS is not set.
pub const DEFAULT_DIRS: u16 = BASE | GLOBAL;
/// Every SLRU directory, the `slru` alias in BAKEDB_COPYUP_SHIM_DIRS.
pub const SLRU: u16 = PG_XACT | PG_MULTIXACT | PG_SUBTRANS | PG_COMMIT_TS | PG_SERIAL | PG_NOTIFY;

const DIRS: [(&[u8], u16); 9] = [
    (b"base", BASE),
    (b"global", GLOBAL),
    (b"pg_xact", PG_XACT),
    (b"pg_multixact", PG_MULTIXACT),
    (b"pg_subtrans", PG_SUBTRANS),
    (b"pg_commit_ts", PG_COMMIT_TS),
    (b"pg_serial", PG_SERIAL),
    (b"pg_notify", PG_NOTIFY),
    (b"pg_wal", PG_WAL),
];

/// BAKEDB_COPYUP_SHIM: the run-time switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    On,
    Off,
    /// A value that is neither: the shim stays off (off is always correct, only slower)
    /// and says so on stderr.
    Invalid,
}

/// Unset, empty, `on`, `1`, `true`, `yes`: on; `off`, `0`, `false`, `no`: off (ASCII case
/// ignored); anything else: Invalid.
pub fn parse_switch(value: Option<&[u8]>) -> Switch {
    let Some(v) = value else {
        return Switch::On;
    };
    let is = |words: &[&[u8]]| words.iter().any(|w| v.eq_ignore_ascii_case(w));
    if v.is_empty() || is(&[b"on", b"1", b"true", b"yes"]) {
        Switch::On
    } else if is(&[b"off", b"0", b"false", b"no"]) {
        Switch::Off
    } else {
        Switch::Invalid
    }
}

/// BAKEDB_COPYUP_SHIM_DIRS: a comma-separated list of directory names of `DIRS` and `slru`
/// (empty items ignored). Unset or empty: DEFAULT_DIRS. An unknown name is an error (the
/// caller turns the shim off), so a typo cannot silently cover less or more than meant.
pub fn parse_dirs(value: Option<&[u8]>) -> Result<u16, ()> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_DIRS);
    };
    let mut mask = 0;
    for item in v.split(|&b| b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() {
            continue;
        }
        if item == b"slru" {
            mask |= SLRU;
            continue;
        }
        match DIRS.iter().find(|(name, _)| *name == item) {
            Some((_, bit)) => mask |= bit,
            None => return Err(()),
        }
    }
    if mask == 0 { Err(()) } else { Ok(mask) }
}

/// Whether an open with these flags is one the shim may turn read-only: read-write, and
/// neither creating, truncating nor anything but a plain open of an existing file (O_PATH,
/// O_DIRECTORY and O_TMPFILE, which contains O_DIRECTORY's bit).
pub fn flags_qualify(flags: c_int) -> bool {
    flags & libc::O_ACCMODE == libc::O_RDWR
        && flags & (libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_PATH | libc::O_DIRECTORY)
            == 0
}

/// The flags of the read-only open that replaces a qualifying one: the same, O_RDONLY.
pub fn read_only(flags: c_int) -> c_int {
    (flags & !libc::O_ACCMODE) | libc::O_RDONLY
}

/// The file status flags (F_GETFL) a reopened descriptor keeps. Everything else F_GETFL can
/// report is either the access mode (replaced by O_RDWR), meaningless for a reopen
/// (O_CREAT...), or harmful: O_NOFOLLOW would refuse the /proc/self/fd magic link.
const KEPT_STATUS_FLAGS: c_int = libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_DIRECT
    | libc::O_NOATIME
    | libc::O_LARGEFILE;

/// The flags of the read-write reopen of a descriptor whose F_GETFL is `status`. O_CLOEXEC
/// because the new descriptor is temporary: it is dup3'd over the old one with that one's
/// own close-on-exec flag, then closed.
pub fn reopen_flags(status: c_int) -> c_int {
    (status & KEPT_STATUS_FLAGS) | libc::O_RDWR | libc::O_CLOEXEC
}

/// Whether `path` names a file in one of the directories in `dirs` of the data directory:
/// a relative path (PostgreSQL chdirs into its data directory and opens relation files as
/// `base/5/1259`), or an absolute one under `data_dir` when that is set (non-empty,
/// absolute, no trailing slash). `./` prefixes and repeated slashes are allowed; a `..`
/// component anywhere is not (it could leave the directory). The file itself must be below
/// the directory (`base/` alone is not a file in it).
pub fn path_qualifies(path: &[u8], dirs: u16, data_dir: &[u8]) -> bool {
    let mut rest = path;
    if rest.first() == Some(&b'/') {
        if data_dir.is_empty() {
            return false;
        }
        let Some(after) = rest.strip_prefix(data_dir) else {
            return false;
        };
        if after.first() != Some(&b'/') {
            return false;
        }
        rest = after;
    }
    // Leading slashes (after the data directory) and `./` components.
    loop {
        if let Some(r) = rest.strip_prefix(b"/") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix(b"./") {
            rest = r;
        } else {
            break;
        }
    }
    let Some(slash) = rest.iter().position(|&b| b == b'/') else {
        return false;
    };
    let (first, below) = (&rest[..slash], &rest[slash + 1..]);
    let covered = DIRS
        .iter()
        .any(|(name, bit)| dirs & bit != 0 && *name == first);
    covered
        && below
            .split(|&b| b == b'/')
            .any(|c| !c.is_empty() && c != b".")
        && !below.split(|&b| b == b'/').any(|c| c == b"..")
}

/// statfs f_type values of the union file systems the shim knows about.
pub const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
pub const AUFS_SUPER_MAGIC: i64 = 0x6175_6673;

/// Whether a file on a file system of type `f_type` may be opened read-only in place of
/// read-write. The shim relies on a read-only descriptor opened before a copy-up (by
/// another process, or another descriptor) reading the copy afterwards: a backend keeps its
/// read-only descriptor while the checkpointer promotes its own and writes pages to the
/// upper copy, and must later read those pages back. Kernel overlayfs does so since Linux
/// 4.19 (`overlay_follows_copy_up`); before, such a descriptor keeps reading the lower file.
/// fuse-overlayfs (1.10, tested) is worse: once a read-only descriptor was open across the
/// copy-up, every descriptor of the file reads the lower file's data after the page cache
/// dropped it. aufs is treated like the old overlayfs. Any other file system has no layers
/// and nothing to go stale.
pub fn fs_allows_lazy(f_type: i64, overlay_follows_copy_up: bool) -> bool {
    match f_type {
        FUSE_SUPER_MAGIC | AUFS_SUPER_MAGIC => false,
        OVERLAYFS_SUPER_MAGIC => overlay_follows_copy_up,
        _ => true,
    }
}

/// Whether the kernel release `release` (uname -r: "6.1.0-18-amd64", "4.19.0") is at least
/// `major.minor`. An unparsable release is not.
pub fn kernel_at_least(release: &[u8], major: u32, minor: u32) -> bool {
    let mut parts = release.split(|&b| b == b'.').map(|p| {
        let digits = p.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&p[..digits])
            .ok()
            .and_then(|d| d.parse::<u32>().ok())
    });
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(ma), Some(mi)) => (ma, mi) >= (major, minor),
        _ => false,
    }
}

/// A line for stderr built on the stack: the shim must not allocate in a write() that may
/// run in a signal handler. Longer text is cut at the capacity.
pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    pub const fn new() -> Line {
        Line {
            buf: [0; 512],
            len: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> &mut Line {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    pub fn num(&mut self, n: i64) -> &mut Line {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..])
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_values() {
        for on in [
            None,
            Some(&b""[..]),
            Some(b"on"),
            Some(b"ON"),
            Some(b"1"),
            Some(b"true"),
        ] {
            assert_eq!(parse_switch(on), Switch::On, "{on:?}");
        }
        for off in [&b"off"[..], b"Off", b"0", b"false", b"no"] {
            assert_eq!(parse_switch(Some(off)), Switch::Off);
        }
        for bad in [&b"of"[..], b"disable", b" off", b"2"] {
            assert_eq!(parse_switch(Some(bad)), Switch::Invalid);
        }
    }

    #[test]
    fn dirs_values() {
        assert_eq!(parse_dirs(None), Ok(BASE | GLOBAL));
        assert_eq!(parse_dirs(Some(b"")), Ok(BASE | GLOBAL));
        assert_eq!(parse_dirs(Some(b"base")), Ok(BASE));
        assert_eq!(
            parse_dirs(Some(b"base, global,,slru")),
            Ok(BASE | GLOBAL | SLRU)
        );
        assert_eq!(parse_dirs(Some(b"pg_wal,pg_xact")), Ok(PG_WAL | PG_XACT));
        assert_eq!(parse_dirs(Some(b"base,pg_log")), Err(()));
        assert_eq!(parse_dirs(Some(b"BASE")), Err(()));
        assert_eq!(parse_dirs(Some(b",")), Err(()));
    }

    #[test]
    fn only_plain_read_write_opens_qualify() {
        use libc::*;
        assert!(flags_qualify(O_RDWR));
        assert!(flags_qualify(
            O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_DSYNC | O_DIRECT
        ));
        for no in [
            O_RDONLY,
            O_WRONLY,
            O_RDWR | O_CREAT,
            O_RDWR | O_TRUNC,
            O_RDWR | O_CREAT | O_EXCL,
            O_RDWR | O_EXCL,
            O_RDWR | O_TMPFILE,
            O_RDWR | O_DIRECTORY,
            O_RDWR | O_PATH,
            O_WRONLY | O_APPEND,
        ] {
            assert!(!flags_qualify(no), "{no:#o}");
        }
    }

    #[test]
    fn read_only_and_reopen_flags() {
        use libc::*;
        assert_eq!(read_only(O_RDWR), O_RDONLY);
        assert_eq!(
            read_only(O_RDWR | O_CLOEXEC | O_DSYNC),
            O_RDONLY | O_CLOEXEC | O_DSYNC
        );
        // What F_GETFL reports for an O_RDONLY|O_NOFOLLOW|O_APPEND open on x86_64.
        let status = O_RDONLY | O_NOFOLLOW | O_APPEND | O_LARGEFILE | 0o100000;
        let f = reopen_flags(status);
        assert_eq!(f & O_ACCMODE, O_RDWR);
        assert_eq!(f & O_NOFOLLOW, 0, "O_NOFOLLOW refuses /proc/self/fd/N");
        assert_ne!(f & O_APPEND, 0);
        assert_ne!(f & O_CLOEXEC, 0);
        assert_eq!(f & (O_CREAT | O_TRUNC | O_EXCL | O_DIRECTORY | O_PATH), 0);
        assert_eq!(reopen_flags(O_RDONLY | O_DIRECT) & O_DIRECT, O_DIRECT);
        assert_eq!(reopen_flags(O_RDONLY | O_SYNC) & O_SYNC, O_SYNC);
    }

    #[test]
    fn relative_relation_paths() {
        let d = DEFAULT_DIRS;
        for yes in [
            &b"base/5/1259"[..],
            b"base/5/1259_fsm",
            b"base/5/16384.1",
            b"global/1262",
            b"global/pg_control",
            b"./base/5/1259",
            b"base//5/1259",
            b"base/./5/1259",
        ] {
            assert!(path_qualifies(yes, d, b""), "{}", yes.escape_ascii());
        }
        for no in [
            &b""[..],
            b"base",
            b"base/",
            b"base//",
            b"base/.",
            b"basement/1",
            b"bas/1",
            b"pg_wal/000000010000000000000001",
            b"pg_xact/0000",
            b"postmaster.pid",
            b"base/../postmaster.pid",
            b"base/5/../../pg_hba.conf",
            b"../base/5/1259",
            b"/base/5/1259",
            b"/var/lib/bakedb/pgdata/base/5/1259",
        ] {
            assert!(!path_qualifies(no, d, b""), "{}", no.escape_ascii());
        }
    }

    #[test]
    fn more_directories_on_request() {
        assert!(path_qualifies(b"pg_xact/0000", SLRU, b""));
        assert!(path_qualifies(b"pg_multixact/offsets/0000", SLRU, b""));
        assert!(!path_qualifies(b"base/5/1259", SLRU, b""));
        assert!(path_qualifies(
            b"pg_wal/000000010000000000000001",
            PG_WAL,
            b""
        ));
        assert!(!path_qualifies(
            b"pg_wal/000000010000000000000001",
            SLRU,
            b""
        ));
    }

    #[test]
    fn absolute_paths_under_the_data_dir_only() {
        let data = b"/var/lib/bakedb/pgdata";
        let d = DEFAULT_DIRS;
        assert!(path_qualifies(
            b"/var/lib/bakedb/pgdata/base/5/1259",
            d,
            data
        ));
        assert!(path_qualifies(
            b"/var/lib/bakedb/pgdata//global/1262",
            d,
            data
        ));
        assert!(path_qualifies(b"base/5/1259", d, data));
        for no in [
            &b"/var/lib/bakedb/pgdata2/base/5/1259"[..],
            b"/var/lib/bakedb/pgdata",
            b"/var/lib/bakedb/pgdata/",
            b"/var/lib/bakedb/pgdata/base",
            b"/var/lib/bakedb/pgdata/pg_wal/000000010000000000000001",
            b"/var/lib/bakedb/pgdata/base/../../etc/passwd",
            b"/var/lib/bakedb/base/5/1259",
            b"/tmp/base/5/1259",
        ] {
            assert!(!path_qualifies(no, d, data), "{}", no.escape_ascii());
        }
    }

    #[test]
    fn union_file_systems_that_keep_stale_descriptors_are_refused() {
        assert!(fs_allows_lazy(OVERLAYFS_SUPER_MAGIC, true));
        assert!(!fs_allows_lazy(OVERLAYFS_SUPER_MAGIC, false));
        for refused in [FUSE_SUPER_MAGIC, AUFS_SUPER_MAGIC] {
            assert!(!fs_allows_lazy(refused, true));
        }
        // ext4, xfs, tmpfs, btrfs: no layers.
        for plain in [0xEF53, 0x5846_5342, 0x0102_1994, 0x9123_683E] {
            assert!(fs_allows_lazy(plain, false));
        }
    }

    #[test]
    fn kernel_releases() {
        for (release, ok) in [
            (&b"4.19.0"[..], true),
            (b"4.19", true),
            (b"4.18.0-553.el8_10.x86_64", false),
            (b"3.10.0-1160.el7.x86_64", false),
            (b"5.4.0-150-generic", true),
            (b"6.1.0-18-amd64", true),
            (b"6.18.44-fc-v1147", true),
            (b"10.0", true),
            (b"4", false),
            (b"", false),
            (b"x.y", false),
        ] {
            assert_eq!(
                kernel_at_least(release, 4, 19),
                ok,
                "{}",
                release.escape_ascii()
            );
        }
    }

    #[test]
    fn line_formatting() {
        let mut l = Line::new();
        l.push(b"fd ").num(0).push(b" ").num(42).push(b" ").num(-7);
        l.push(b" ").num(i64::MIN).push(b" ").num(i64::MAX);
        assert_eq!(
            l.bytes(),
            b"fd 0 42 -7 -9223372036854775808 9223372036854775807"
        );
        let mut long = Line::new();
        for _ in 0..100 {
            long.push(b"0123456789");
        }
        assert_eq!(long.bytes().len(), 512);
    }
}
