#!/usr/bin/env bash
# Build the PostgreSQL base image fixture: an OCI image layout at OUTDIR, tags `latest` and
# the major version (e.g. `15`), standing in for the official `postgres:15` image, which the
# tests cannot pull (no registry is reachable).
#
# Usage: postgres-base.sh OUTDIR
#
# Environment:
#   PG_MAJOR            major version to package (default: the newest installed
#                       postgresql-N Debian package)
#   PG_JIT=0            leave out the LLVM JIT provider (llvmjit.so and its bitcode), and
#                       with it libLLVM and libz3: a 38 MB instead of a 99 MB layer; the
#                       server then runs without JIT, as when the provider fails to load
#   BUSYBOX             static busybox to install (default /bin/busybox, busybox-static)
#   SOURCE_DATE_EPOCH   mtime of every file and the created timestamps (default 0)
#
# The image is made from this machine's Debian packages postgresql-N and postgresql-client-N,
# not downloaded: everything they install under /usr/lib/postgresql/N and
# /usr/share/postgresql/N, the shared libraries those ELF files load (found with ldd), the
# dynamic loader, the time zone data and the C.UTF-8 locale (Debian builds PostgreSQL with
# --with-system-tzdata and initdb must be able to set the locale), busybox as /bin/sh
# (initdb runs the server through popen(), i.e. /bin/sh), and the users, directories and
# config (Env, Cmd, StopSignal, ExposedPorts, Volume) of the official image.
#
# Like busybox-base.sh only umoci builds the image, beside OUTDIR, renamed into place at the
# end. As root the layer gets its ownership from real chown (the postgres directories are
# 999:999). As any other user it runs umoci --rootless (which records the caller as 0) and
# gives the 999-owned directories the user.rootlesscontainers xattr that umoci reads for
# ownership instead (needs setfattr from the `attr` package and user xattrs on the file
# system). Either way the layer is the same.
#
# Reproducible for given Debian packages, umoci version and SOURCE_DATE_EPOCH: all mtimes
# and the created timestamps are pinned, umoci writes tar entries in lexical order and
# leaves user and group names out of them.
set -euo pipefail
# Modes of the directories tar and install create must not depend on the caller's umask.
umask 022

out=${1:?usage: postgres-base.sh OUTDIR}
tag=latest
epoch=${SOURCE_DATE_EPOCH:-0}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
busybox=${BUSYBOX:-/bin/busybox}
jit=${PG_JIT:-1}
# sh for initdb's popen() and `docker run IMAGE sh -c`; the rest for tests poking around.
applets="sh cat ls id sleep echo test"
# The official image's postgres user and group.
pg_uid=999
pg_gid=999

# Shared with mariadb-base.sh: the steps of a base image made from Debian packages.
me=postgres-base.sh
# shellcheck source=base-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/base-lib.sh"

exit_if_built

# --- what to package -----------------------------------------------------------------------
if [ -z "${PG_MAJOR:-}" ]; then
    # postgresql-15, not postgresql-15-foo or the unversioned postgresql metapackage.
    PG_MAJOR=$(dpkg-query -W -f '${db:Status-Abbrev}|${Package}\n' 'postgresql-[0-9]*' 2>/dev/null |
        sed -n 's/^ii |postgresql-\([0-9][0-9]*\)$/\1/p' | sort -n | tail -n1)
    [ -n "$PG_MAJOR" ] || die "no postgresql-N package installed (apt-get install postgresql-15)"
fi
major=$PG_MAJOR
server_pkg=postgresql-$major
client_pkg=postgresql-client-$major
for pkg in "$server_pkg" "$client_pkg"; do
    installed "$pkg" || die "Debian package $pkg is not installed"
done
pg_version=$(dpkg-query -W -f '${Version}' "$server_pkg")
check_builder

start_work

# Paths are collected in $list (absolute, no symlinked directory on the way) and copied in
# one tar pipe at the end, which keeps symlinks as symlinks and modes as they are.

# The package files under the version directories: bin, lib (server modules, llvmjit and
# its bitcode, pgxs) and share (postgres.bki, extension SQL, timezonesets, tsearch_data).
# Not the man pages under share, nor /usr/share/locale (message catalogues: the image runs
# in C.UTF-8, where the server speaks English) or /usr/share/doc.
dpkg -L "$server_pkg" "$client_pkg" |
    grep -E "^/usr/(lib|share)/postgresql/$major(/|$)" |
    grep -vE "^/usr/share/postgresql/$major/man(/|$)" |
    if [ "$jit" = 0 ]; then
        grep -vE "^/usr/lib/postgresql/$major/lib/(llvmjit\.so|llvmjit_types\.bc|bitcode)(/|$)"
    else
        cat
    fi >"$list"
grep -qx "/usr/lib/postgresql/$major/bin/postgres" "$list" ||
    die "$server_pkg has no /usr/lib/postgresql/$major/bin/postgres"
# locale(1) from libc-bin: initdb's pg_import_system_collations() runs `locale -a` to create
# the libc collations (here C.utf8); without it initdb warns "no usable system locales were
# found". The official image has it too.
locale_bin=$(command -v locale) || die "locale(1) not found (Debian package libc-bin)"
realpath -e "$locale_bin" >>"$list"

add_libraries

# Time zones (--with-system-tzdata: the server reads /usr/share/zoneinfo at run time, initdb
# matches /etc/localtime against it) and the C.UTF-8 locale (LANG=C.UTF-8 makes it initdb's
# default; Debian's libc-bin ships it as a directory, not in locale-archive).
for d in /usr/share/zoneinfo /usr/lib/locale/C.utf8; do
    [ "$(realpath -e "$d")" = "$d" ] || die "$d is missing or not a real directory"
    find "$d" >>"$list"
done

# --- the root file system ----------------------------------------------------------------------
make_rootfs

install -d -m 0755 "$rootfs/etc"
# Users and groups of the official image (Debian's postgres package there makes them with
# fixed ids 999:999); the server and initdb look their user up by uid.
cat >"$rootfs/etc/passwd" <<EOF
root:x:0:0:root:/root:/bin/sh
postgres:x:$pg_uid:$pg_gid:PostgreSQL administrator:/var/lib/postgresql:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$rootfs/etc/group" <<EOF
root:x:0:
postgres:x:$pg_gid:
nogroup:x:65534:
EOF
# Spelled out rather than left to glibc's built-in default, which has changed over time.
cat >"$rootfs/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
shadow: files
hosts: files dns
EOF
# listen_addresses defaults to localhost: the server resolves it and refuses to start if it
# cannot. Docker and podman mount their own /etc/hosts; a plain runc bundle or chroot needs
# this one.
cat >"$rootfs/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
EOF
chmod 0644 "$rootfs"/etc/{passwd,group,nsswitch.conf,hosts}
# UTC as in Debian images: initdb sets the cluster's timezone from it.
ln -s /usr/share/zoneinfo/Etc/UTC "$rootfs/etc/localtime"

install -d -m 0700 "$rootfs/root"
install -d -m 1777 "$rootfs/tmp"
# Empty mount points, as in Debian's own images: runtimes mount over them, and a chroot into
# the unpacked image can bind-mount /dev (initdb's sh redirects to /dev/null).
install -d -m 0755 "$rootfs/dev" "$rootfs/proc" "$rootfs/sys"
# Debian: /var/run -> /run. Debian's server puts its unix socket in /var/run/postgresql (its
# DEFAULT_PGSOCKET_DIR), which the official image makes 3777 so any --user can use it.
install -d -m 0755 "$rootfs/run" "$rootfs/var" "$rootfs/var/lib"
ln -s /run "$rootfs/var/run"
install -d "$rootfs/run/postgresql" "$rootfs/var/lib/postgresql" "$rootfs/var/lib/postgresql/data"
own "$pg_uid" "$pg_gid" "$rootfs/run/postgresql"
own "$pg_uid" "$pg_gid" "$rootfs/var/lib/postgresql"
own "$pg_uid" "$pg_gid" "$rootfs/var/lib/postgresql/data"
# chmod after chown: chown clears the set-gid bit.
chmod 3777 "$rootfs/run/postgresql"
chmod 0755 "$rootfs/var/lib/postgresql"
# initdb and the server insist on 0700 (or 0750) for PGDATA.
chmod 0700 "$rootfs/var/lib/postgresql/data"

# umoci copies mtimes into the tar headers; pin them so the layer digest is stable.
find "$rootfs" -exec touch -h -d "@$epoch" {} +

# --- the image -----------------------------------------------------------------------------------
# awk reads to the end: `| head -n1` would let busybox die of SIGPIPE in the middle of its
# usage text (hundreds of writes), which pipefail and set -e turn into a silent exit.
busybox_version=$("$busybox" 2>&1 | awk 'NR == 1 { print $2 }')
jit_note=
[ "$jit" != 0 ] || jit_note=", without JIT"
# repack takes --rootless (and the id maps) from the bundle unpack wrote.
umoci repack --image "$layout:$tag" \
    --history.created "$created" \
    --history.created_by "postgres-base.sh ($server_pkg $pg_version$jit_note, busybox-static $busybox_version, from Debian packages)" \
    "$bundle"
pg_bin=/usr/lib/postgresql/$major/bin
umoci config --image "$layout:$tag" --no-history \
    --created "$created" \
    --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$pg_bin" \
    --config.env "PG_MAJOR=$major" \
    --config.env "PG_VERSION=$pg_version" \
    --config.env PGDATA=/var/lib/postgresql/data \
    --config.env LANG=C.UTF-8 \
    --config.cmd postgres \
    --config.stopsignal SIGINT \
    --config.exposedports 5432/tcp \
    --config.volume /var/lib/postgresql/data
umoci tag --image "$layout:$tag" "$major"
# Each umoci step above wrote a new config and manifest; drop the unreferenced ones.
umoci gc --layout "$layout"

publish_layout
