# Shared by postgres-base.sh and mariadb-base.sh, which source it: a base image made from this
# machine's Debian packages with umoci. The caller sets `me` (its name, for messages), `out`,
# `tag`, `busybox` and `applets` before it calls these, in this order: exit_if_built,
# check_builder, start_work (which sets work, layout, bundle, list), its own paths into
# $list, add_libraries, make_rootfs (which sets rootfs and own), its own /etc, users and
# config, and publish_layout.

die() {
    echo "$me: $*" >&2
    exit 1
}

installed() {
    [ "$(dpkg-query -W -f '${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

# Idempotent: `cargo xtask fixtures` calls this every time.
# (No `umoci ls | grep -q`: grep quits at the first match, umoci may then die of SIGPIPE
# while printing the next tag, and pipefail turns that into "no such tag".)
exit_if_built() {
    if [ -f "$out/index.json" ]; then
        local tags
        tags=$(umoci ls --layout "$out")
        if grep -qx "$tag" <<<"$tags"; then
            exit 0
        fi
        die "$out is an OCI layout without tag $tag; not touching it"
    fi
}

check_builder() {
    [ -x "$busybox" ] || die "$busybox not found (apt-get install busybox-static)"
    # The unprivileged path needs setfattr; say so now rather than after a minute of copying.
    if [ "$(id -u)" -ne 0 ] && ! command -v setfattr >/dev/null; then
        die "building as non-root needs setfattr (apt-get install attr), or run as root"
    fi
}

# Build next to OUTDIR and rename at the end, so an interrupted run never leaves an
# OUTDIR/index.json that would make the next run skip the build.
start_work() {
    local parent
    parent=$(dirname "$out")
    mkdir -p "$parent"
    work=$(mktemp -d "$parent/.${me%.sh}.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    layout="$work/layout"
    bundle="$work/bundle"
    list="$work/files"
}

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

add_libraries() {
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
}

# The root file system: umoci's bundle with every path of $list copied in, merged /usr and
# busybox. `own UID GID PATH` gives a path its owner in the layer.
make_rootfs() {
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
    # the official images have a shell: initdb needs one, `docker exec` and healthchecks use one.
    install -d -m 0755 "$rootfs/usr/bin"
    install -m 0755 "$busybox" "$rootfs/usr/bin/busybox"
    for applet in $applets; do
        ln -s busybox "$rootfs/usr/bin/$applet"
    done
}

# The layout into place, readable by every user (umoci writes index.json 0600): a build as
# another user than the one that made the fixture reads it as a base image.
publish_layout() {
    chmod -R a+rX "$layout"
    mv -T "$layout" "$out"
}
