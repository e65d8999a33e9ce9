#!/usr/bin/env bash
# Build the busybox base image fixture: an OCI image layout at OUTDIR, tag `latest`.
#
# Usage: busybox-base.sh OUTDIR
#
# Only umoci is used (no daemon, no registry, no root needed) so that the fixture can be
# built anywhere the tests run. Busybox comes from Debian's busybox-static (/bin/busybox):
# a static binary runs in an image that has no libc.
#
# Reproducible for a given busybox binary, umoci version and SOURCE_DATE_EPOCH: all mtimes
# and the created timestamps are pinned, umoci writes tar entries in lexical order.
set -euo pipefail

out=${1:?usage: busybox-base.sh OUTDIR}
tag=latest
epoch=${SOURCE_DATE_EPOCH:-0}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
busybox=${BUSYBOX:-/bin/busybox}
# The applets the tests call, plus `false` (the login shell of the system users below).
applets="sh sha256sum cat ls stat id sleep echo test wc find false"

# Idempotent: `cargo xtask fixtures` calls this every time.
if [ -f "$out/index.json" ]; then
    if umoci ls --layout "$out" | grep -qx "$tag"; then
        exit 0
    fi
    echo "busybox-base.sh: $out is an OCI layout without tag $tag; not touching it" >&2
    exit 1
fi

# Build next to OUTDIR and rename at the end, so an interrupted run never leaves an
# OUTDIR/index.json that would make the next run skip the build.
parent=$(dirname "$out")
mkdir -p "$parent"
work=$(mktemp -d "$parent/.busybox-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
layout="$work/layout"
bundle="$work/bundle"

umoci init --layout "$layout"
umoci new --image "$layout:$tag"
# --rootless maps the caller's uid to 0, so the layer says root:root whoever runs this.
umoci unpack --rootless --image "$layout:$tag" "$bundle"

rootfs="$bundle/rootfs"
install -d -m 0755 "$rootfs/bin" "$rootfs/etc"
install -d -m 0700 "$rootfs/root"
# bakedb-init and the engines keep their runtime files in /tmp; a missing /tmp is not
# created by every runtime (runc does not).
install -d -m 1777 "$rootfs/tmp"
install -m 0755 "$busybox" "$rootfs/bin/busybox"
for applet in $applets; do
    ln -s busybox "$rootfs/bin/$applet"
done
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
bakedb:x:65532:65532:bakedb:/nonexistent:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
bakedb:x:65532:
nogroup:x:65534:
EOF
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
# umoci copies mtimes into the tar headers; pin them so the layer digest is stable.
find "$rootfs" -exec touch -h -d "@$epoch" {} +

umoci repack --image "$layout:$tag" \
    --history.created "$created" \
    --history.created_by "busybox-base.sh (busybox-static $("$busybox" 2>&1 | awk 'NR==1 {print $2}'))" \
    "$bundle"
umoci config --image "$layout:$tag" --no-history \
    --created "$created" \
    --config.cmd /bin/sh \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Each umoci step above wrote a new config and manifest; drop the unreferenced ones.
umoci gc --layout "$layout"

mv -T "$layout" "$out"
