//! bakedb-copyup-shim: an LD_PRELOAD library that keeps PostgreSQL from copying every
//! relation file it reads up into a container's writable overlayfs layer.
//!
//! PostgreSQL opens relation files (`base/<db>/<relfilenode>`, `global/<relfilenode>`)
//! O_RDWR even to read them, and overlayfs copies a lower-layer file up whole on its first
//! open for writing. A read-only replica of a baked image therefore copies up most of its
//! data, in every container. With this library preloaded:
//!
//! - **open**: an open of a qualifying path (relative `base/…` or `global/…`, more
//!   directories with BAKEDB_COPYUP_SHIM_DIRS, absolute ones under BAKEDB_COPYUP_SHIM_DATA)
//!   with O_RDWR and without O_CREAT, O_TRUNC, O_EXCL, O_DIRECTORY or O_PATH is done
//!   O_RDONLY instead. If that open succeeds on a regular file, the descriptor is recorded
//!   with the file's device and inode in a fixed table indexed by descriptor number;
//!   otherwise (a directory, a descriptor beyond the table, any failure other than ENOENT,
//!   a file system where a read-only descriptor can go stale across a copy-up: FUSE, so
//!   fuse-overlayfs, aufs, and kernel overlayfs before Linux 4.19) the original open is
//!   done unchanged, so results and errors are the ones PostgreSQL would get without the
//!   shim.
//! - **first write-like call** on a recorded descriptor (`write`, `writev`, `pwrite`,
//!   `pwritev`, `pwritev2`, their 64 variants, `ftruncate`, `fallocate`, `posix_fallocate`,
//!   a shared writable `mmap`, a write lock with `fcntl`, `copy_file_range`/`sendfile`/
//!   `splice` into it): the descriptor is "promoted" before the call: the same file is
//!   reopened O_RDWR through `/proc/self/fd/N` (this is when overlayfs copies it up), with
//!   the old descriptor's status flags (O_APPEND, O_DSYNC, O_DIRECT...), positioned at the
//!   old descriptor's file offset, and `dup3`'d over the same descriptor number, keeping its
//!   close-on-exec flag; the temporary descriptor is closed and the record forgotten. Then
//!   the call runs as usual. Reopening through /proc rather than a remembered path needs
//!   no per-descriptor memory and can only ever reopen the file the descriptor refers to,
//!   whatever was renamed, unlinked or chdir'd since. Before promoting, the descriptor is
//!   checked to still be a read-only regular file with the recorded device and inode; a
//!   stale record (a descriptor closed behind the shim's back and reused) is dropped and the
//!   call runs untouched.
//! - **if the promotion fails** (the copy-up hits ENOSPC or EROFS, /proc is gone...), the
//!   call is not made: it returns -1 with the promotion's errno (posix_fallocate returns the
//!   error number), the descriptor stays read-only and recorded, and the next write-like
//!   call tries again. Without the shim the same failure would have made the open fail.
//! - **close**, `close_range`, `closefrom` forget; `dup`, `dup2`, `dup3` and
//!   `fcntl(F_DUPFD*)` record the new descriptor like the old one (it shares the read-only
//!   open file description, and is promoted on its own first write); `dup2`/`dup3` over a
//!   recorded descriptor forget it first. `fcntl(F_GETFL)` on a recorded descriptor reports
//!   O_RDWR, the access mode the program asked for.
//!
//! Reads, `fsync`, `fdatasync`, `sync_file_range`, `lseek`, `fstat`, `posix_fadvise` work on
//! the read-only descriptor as they did on the read-write one, and do not promote.
//!
//! Configuration, read from the environment once, when the library is loaded:
//! - `BAKEDB_COPYUP_SHIM`: `off` (`0`, `false`, `no`) turns the shim into a pass-through;
//!   unset, empty or `on` (`1`, `true`, `yes`) enables it; any other value disables it with
//!   a warning on stderr.
//! - `BAKEDB_COPYUP_SHIM_DIRS`: the data directory's subdirectories covered, comma-separated
//!   among `base`, `global`, `pg_xact`, `pg_multixact`, `pg_subtrans`, `pg_commit_ts`,
//!   `pg_serial`, `pg_notify`, `pg_wal` and `slru` (all of the SLRU ones); default
//!   `base,global`. An unknown name disables the shim with a warning.
//! - `BAKEDB_COPYUP_SHIM_DATA`: an absolute data directory whose files also qualify when
//!   opened by absolute path (PostgreSQL itself uses relative paths).
//! - `BAKEDB_COPYUP_SHIM_LOG`: `1` writes a line to stderr for every promotion (and every
//!   failed one).
//!
//! The shim also turns itself off when `/proc/self/fd` is not there, since it could not
//! promote.
//!
//! Async-signal safety: the checks on every `write`/`close`/`mmap` are a bounds check and
//! an atomic load on a static table (PostgreSQL writes from signal handlers, to its
//! self-pipe and stderr). Nothing allocates; the real functions are resolved with
//! `dlsym(RTLD_NEXT)` when the library is loaded, before any handler can run. errno is
//! saved and restored around the shim's own system calls, so a call that succeeds leaves it
//! as the real function would, and one that fails sets it to the real reason.
//!
//! Only x86_64 and aarch64 Linux with glibc: the variadic `open`/`openat`/`fcntl` are
//! defined with a fixed third argument, which matches how callers pass variadic integer
//! and pointer arguments on those ABIs (stable Rust cannot define C-variadic functions).
//!
//! `bakedb_copyup_shim_state(fd)` is exported for tests: -1 when the shim is off, else 1 when
//! `fd` is recorded (read-only, not yet promoted) and 0 when it is not.

#[cfg(not(all(
    target_os = "linux",
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
compile_error!("bakedb-copyup-shim supports x86_64 and aarch64 Linux with glibc only");

mod rules;

// The interposers would replace the unit-test harness's own open, write and close.
#[cfg(not(test))]
mod shim;
