#!/usr/bin/env bash
# Build the MariaDB base image fixture: an OCI image layout at OUTDIR, tags `latest` and the
# release series (e.g. `10.11`), standing in for the official `mariadb` image, which the
# tests cannot pull (no registry is reachable).
#
# Usage: mariadb-base.sh OUTDIR
#
# Environment:
#   BUSYBOX             static busybox to install (default /bin/busybox, busybox-static)
#   SOURCE_DATE_EPOCH   mtime of every file and the created timestamps (default 0)
#
# The image is made from this machine's Debian packages mariadb-server, mariadb-server-core,
# mariadb-client, mariadb-client-core, mariadb-common and mysql-common, not downloaded: the
# server (/usr/sbin/mariadbd), the clients and tools in /usr/bin, the plugins in
# /usr/lib/mysql/plugin, the share files (error messages, character sets, the system table
# scripts) in /usr/share/mysql and /usr/share/mariadb, /etc/mysql, the shared libraries all
# those ELF files load (found with ldd), the dynamic loader, the time zone data, busybox as
# /bin/sh, the `mysql` user and group 999:999 with /var/lib/mysql and /run/mysqld owned by
# it, and the config (Env MARIADB_VERSION, Cmd, StopSignal, ExposedPorts, Volume) of the
# official image. mariadb-backup is not in it: bakedb runs it at build time, on the source's
# machine. The Perl scripts (mariadb-install-db and friends) are in it but Perl is not: the
# image serves a baked data directory, it never initialises one.
#
# Like postgres-base.sh only umoci builds the image, beside OUTDIR, renamed into place at the
# end; as root the layer gets its ownership from real chown, otherwise from umoci --rootless
# and the user.rootlesscontainers xattr. Reproducible for given Debian packages, umoci
# version and SOURCE_DATE_EPOCH.
set -euo pipefail
# Modes of the directories tar and install create must not depend on the caller's umask.
umask 022

out=${1:?usage: mariadb-base.sh OUTDIR}
tag=latest
epoch=${SOURCE_DATE_EPOCH:-0}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
busybox=${BUSYBOX:-/bin/busybox}
# sh for `docker run IMAGE sh -c`; the rest for tests poking around.
applets="sh cat ls id sleep echo test"
# The official image's mysql user and group.
my_uid=999
my_gid=999

die() {
    echo "mariadb-base.sh: $*" >&2
    exit 1
}

# Idempotent: `cargo xtask fixtures` calls this every time.
# (No `umoci ls | grep -q`: grep quits at the first match, umoci may then die of SIGPIPE
# while printing the next tag, and pipefail turns that into "no such tag".)
if [ -f "$out/index.json" ]; then
    tags=$(umoci ls --layout "$out")
    if grep -qx "$tag" <<<"$tags"; then
        exit 0
    fi
    die "$out is an OCI layout without tag $tag; not touching it"
fi

# --- what to package -----------------------------------------------------------------------
installed() {
    [ "$(dpkg-query -W -f '${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}
pkgs=(mariadb-server mariadb-server-core mariadb-client mariadb-client-core mariadb-common mysql-common)
for pkg in "${pkgs[@]}"; do
    installed "$pkg" || die "Debian package $pkg is not installed (apt-get install mariadb-server mariadb-client)"
done
# "1:10.11.19-0+deb12u1": the official image's MARIADB_VERSION has the same shape.
my_version=$(dpkg-query -W -f '${Version}' mariadb-server)
series=$(sed -E 's/^[0-9]+://; s/^([0-9]+\.[0-9]+).*/\1/' <<<"$my_version")
[ -x "$busybox" ] || die "$busybox not found (apt-get install busybox-static)"
if [ "$(id -u)" -ne 0 ] && ! command -v setfattr >/dev/null; then
    die "building as non-root needs setfattr (apt-get install attr), or run as root"
fi

# Build next to OUTDIR and rename at the end, so an interrupted run never leaves an
# OUTDIR/index.json that would make the next run skip the build.
parent=$(dirname "$out")
mkdir -p "$parent"
work=$(mktemp -d "$parent/.mariadb-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
layout="$work/layout"
bundle="$work/bundle"
list="$work/files"

# The packages' files but not documentation, man pages, systemd units, logrotate or logcheck
# files: the server, the clients, the plugins, the share files and /etc/mysql. dpkg -L lists
# directories too; only files and links are taken (mysql -> mariadb stays a link).
dpkg -L "${pkgs[@]}" |
    grep -E '^/(usr/(s?bin|lib/mysql|share/mysql|share/mariadb)|etc/mysql)(/|$)' |
    while read -r p; do
        if [ -L "$p" ] || [ -f "$p" ]; then echo "$p"; fi
    done >"$list"
grep -qx /usr/sbin/mariadbd "$list" || die "mariadb-server-core has no /usr/sbin/mariadbd"

# Add path $1 and, if it is a symlink, what it points to, until a real file: the loader finds
# libraries by SONAME (libssl.so.3), which Debian ships as a link to the real file; the ELF
# interpreter /lib64/ld-linux-x86-64.so.2 is /usr/lib64/... -> /lib/x86_64-linux-gnu/....
# Directories are canonicalised (/lib -> /usr/lib on merged /usr): the image gets the
# top-level links themselves further down, as Debian has them.
add_with_links() {
    local p=$1 dir
    while :; do
        dir=$(realpath -e "$(dirname "$p")")
        p="$dir/$(basename "$p")"
        echo "$p" >>"$list"
        [ -L "$p" ] || break
        case $(readlink "$p") in
        /*) p=$(readlink "$p") ;;
        *) p="$dir/$(readlink "$p")" ;;
        esac
    done
    [ -e "$p" ] || die "dangling link at $p"
}

is_elf() {
    [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]
}

# Every library any ELF file in bin and lib loads: the programs, and the modules the server
# dlopen()s (llvmjit.so brings libLLVM, the PL and contrib modules libxml2, libxslt, ...).
# ldd lists the whole closure, the interpreter included; libraries the programs dlopen()
# themselves are not in it (see the hand-picked ones below).
deps="$work/deps"
: >"$deps"
while read -r f; do
    if [ ! -f "$f" ] || [ -L "$f" ] || ! is_elf "$f"; then
        continue
    fi
    # A static ELF here would make ldd fail: fail with it, none is expected.
    ldd_out=$(ldd "$f") || die "ldd $f failed: $ldd_out"
    if grep -q 'not found' <<<"$ldd_out"; then
        die "$f needs a library that is not installed:"$'\n'"$ldd_out"
    fi
    # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" and
    # "/lib64/ld-linux-x86-64.so.2 (0x...)"; not linux-vdso.so.1, which the kernel provides.
    awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }' <<<"$ldd_out" >>"$deps"
done <"$list"
libc=$(grep -m1 '/libc\.so\.6$' "$deps") || die "no libc.so.6 among the libraries"
libdir=$(realpath -e "$(dirname "$libc")")
# dlopen()ed, so invisible to ldd: glibc loads libgcc_s when a thread is cancelled or exits
# (pthread_exit unwinds through it); today libstdc++ (for ICU) already brings it in.
# NSS needs nothing: since glibc 2.34 the files and dns modules are part of libc.so.6.
echo "$libdir/libgcc_s.so.1" >>"$deps"
sort -u "$deps" | while read -r lib; do
    add_with_links "$lib"
    # The image has no /etc/ld.so.cache (ldconfig -r needs root), so the loader only looks
    # in its built-in directories; a library that ldd found elsewhere through this
    # machine's ld.so.conf would be missing at run time.
    [ "$(dirname "$(realpath -e "$lib")")" = "$libdir" ] ||
        die "$lib is not in $libdir: the loader in the image would not find it"
done

# Time zones: CONVERT_TZ with named zones and mariadb-tzinfo-to-sql read /usr/share/zoneinfo.
for d in /usr/share/zoneinfo; do
    [ "$(realpath -e "$d")" = "$d" ] || die "$d is missing or not a real directory"
    find "$d" >>"$list"
done

# --- the root file system ----------------------------------------------------------------------
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
if [ "$(id -u)" -eq 0 ]; then
    rootless=()
    # Real ownership: without --rootless umoci records uid and gid from stat().
    own() { chown "$1:$2" "$3"; }
else
    # --rootless maps the caller's uid to 0; other owners come from this xattr, a protobuf
    # message (rootlesscontainers.com): field 1 uid and field 2 gid, varint-encoded.
    rootless=(--rootless)
    varint() {
        local n=$1 hex=
        while [ "$n" -ge 128 ]; do
            hex+=$(printf '%02x' $(((n & 127) | 128)))
            n=$((n >> 7))
        done
        printf '%s%02x' "$hex" "$n"
    }
    own() { setfattr -n user.rootlesscontainers -v "0x08$(varint "$1")10$(varint "$2")" "$3"; }
fi
umoci unpack "${rootless[@]}" --image "$layout:$tag" "$bundle"
rootfs="$bundle/rootfs"

# --no-same-owner: files belong to the builder (root, or mapped to root by --rootless), not
# to whoever owns them on this machine. GNU tar copies no xattrs unless told to.
sed 's|^/||' "$list" | sort -u |
    tar -C / --no-recursion --verbatim-files-from -T - -cf - |
    tar -C "$rootfs" --no-same-owner -xpf -

# Merged /usr as on Debian 12: /bin, /sbin, /lib, /lib64 are links into /usr, so the ELF
# interpreter path /lib64/ld-linux-x86-64.so.2 and /bin/sh resolve. Only the links this
# machine has (no /lib64 on arm64).
for d in bin sbin lib lib64; do
    if [ -L "/$d" ]; then
        target=$(readlink "/$d")
        install -d -m 0755 "$rootfs/${target#/}"
        ln -s "$target" "$rootfs/$d"
    fi
done

# busybox in /usr/bin as on Debian (busybox-static installs /bin/busybox, i.e. /usr/bin);
# the official image has a shell, and `docker exec` and healthchecks use one.
install -d -m 0755 "$rootfs/usr/bin"
install -m 0755 "$busybox" "$rootfs/usr/bin/busybox"
for applet in $applets; do
    ln -s busybox "$rootfs/usr/bin/$applet"
done

install -d -m 0755 "$rootfs/etc"
# Users and groups of the official image (its mariadb package makes them with fixed ids
# 999:999); the server and the healthcheck look the user up by name.
cat >"$rootfs/etc/passwd" <<EOF
root:x:0:0:root:/root:/bin/sh
mysql:x:$my_uid:$my_gid:MariaDB Server:/nonexistent:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$rootfs/etc/group" <<EOF
root:x:0:
mysql:x:$my_gid:
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
ln -s /usr/share/zoneinfo/Etc/UTC "$rootfs/etc/localtime"

install -d -m 0700 "$rootfs/root"
install -d -m 1777 "$rootfs/tmp"
install -d -m 0755 "$rootfs/dev" "$rootfs/proc" "$rootfs/sys"
# Debian: /var/run -> /run. The server's compiled-in socket is /run/mysqld/mysqld.sock and
# the official image's datadir /var/lib/mysql, both owned by mysql.
install -d -m 0755 "$rootfs/run" "$rootfs/var" "$rootfs/var/lib"
ln -s /run "$rootfs/var/run"
install -d "$rootfs/run/mysqld" "$rootfs/var/lib/mysql"
own "$my_uid" "$my_gid" "$rootfs/run/mysqld"
own "$my_uid" "$my_gid" "$rootfs/var/lib/mysql"
chmod 0755 "$rootfs/run/mysqld" "$rootfs/var/lib/mysql"

# umoci copies mtimes into the tar headers; pin them so the layer digest is stable.
find "$rootfs" -exec touch -h -d "@$epoch" {} +

# --- the image -----------------------------------------------------------------------------------
# awk reads to the end (see postgres-base.sh: no `| head -n1` under pipefail).
busybox_version=$("$busybox" 2>&1 | awk 'NR == 1 { print $2 }')
umoci repack --image "$layout:$tag" \
    --history.created "$created" \
    --history.created_by "mariadb-base.sh (mariadb-server $my_version, busybox-static $busybox_version, from Debian packages)" \
    "$bundle"
umoci config --image "$layout:$tag" --no-history \
    --created "$created" \
    --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --config.env "MARIADB_VERSION=$my_version" \
    --config.env LANG=C.UTF-8 \
    --config.cmd mariadbd \
    --config.stopsignal SIGTERM \
    --config.exposedports 3306/tcp \
    --config.volume /var/lib/mysql
umoci tag --image "$layout:$tag" "$series"
# Each umoci step above wrote a new config and manifest; drop the unreferenced ones.
umoci gc --layout "$layout"

mv -T "$layout" "$out"
