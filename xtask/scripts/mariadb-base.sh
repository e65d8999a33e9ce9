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

# Shared with postgres-base.sh: the steps of a base image made from Debian packages.
me=mariadb-base.sh
# shellcheck source=base-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/base-lib.sh"

exit_if_built

# --- what to package -----------------------------------------------------------------------
pkgs=(mariadb-server mariadb-server-core mariadb-client mariadb-client-core mariadb-common mysql-common)
for pkg in "${pkgs[@]}"; do
    installed "$pkg" || die "Debian package $pkg is not installed (apt-get install mariadb-server mariadb-client)"
done
# "1:10.11.19-0+deb12u1": the official image's MARIADB_VERSION has the same shape.
my_version=$(dpkg-query -W -f '${Version}' mariadb-server)
series=$(sed -E 's/^[0-9]+://; s/^([0-9]+\.[0-9]+).*/\1/' <<<"$my_version")
check_builder

start_work

# The packages' files but not documentation, man pages, systemd units, logrotate or logcheck
# files: the server, the clients, the plugins, the share files and /etc/mysql. dpkg -L lists
# directories too; only files and links are taken (mysql -> mariadb stays a link).
dpkg -L "${pkgs[@]}" |
    grep -E '^/(usr/(s?bin|lib/mysql|share/mysql|share/mariadb)|etc/mysql)(/|$)' |
    while read -r p; do
        if [ -L "$p" ] || [ -f "$p" ]; then echo "$p"; fi
    done >"$list"
grep -qx /usr/sbin/mariadbd "$list" || die "mariadb-server-core has no /usr/sbin/mariadbd"

add_libraries

# Time zones: CONVERT_TZ with named zones and mariadb-tzinfo-to-sql read /usr/share/zoneinfo.
for d in /usr/share/zoneinfo; do
    [ "$(realpath -e "$d")" = "$d" ] || die "$d is missing or not a real directory"
    find "$d" >>"$list"
done

# --- the root file system ----------------------------------------------------------------------
make_rootfs

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

publish_layout
