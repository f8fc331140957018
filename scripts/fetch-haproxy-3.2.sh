#!/usr/bin/env bash
# Fetch HAProxy 3.2+ (the mux-spop SPOE engine) from Debian sid and unpack it beside the tests.
#
# Debian bookworm only ships HAProxy 2.6 (the old SPOE engine); the integration tests also need
# a 3.1+ build because its SPOP behaviour differs (no fragmentation, per-connection stream ids,
# RST instead of DISCONNECT). sid's binary needs a newer glibc/OpenSSL than this machine has, so
# its libraries are unpacked next to it and it runs through the unpacked dynamic loader: no
# chroot, no root-level install, and the machine's own apt state is never touched.
#
# Usage: scripts/fetch-haproxy-3.2.sh [DEST]
#   DEST defaults to ${SPOE_AGENT_CACHE:-<repo>/.cache}/haproxy-sid
# Result: DEST/haproxy, an executable wrapper for the unpacked binary.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${SPOE_AGENT_CACHE:-$REPO/.cache}/haproxy-sid}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
WRAPPER="$DEST/haproxy"

# Libraries sid's haproxy (and its libraries) need at run time. Names are resolved against sid
# on every run, never pinned: sid moves.
BASE_PACKAGES=(haproxy libc6 libssl3t64 liblua5.4-0 libjemalloc2 libpcre2-8-0 libcrypt1
    libopentracing-c-wrapper0t64 libopentracing1 libstdc++6 libgcc-s1 zlib1g libzstd1)

fail() {
    {
        echo
        echo "############################################################################"
        echo "#"
        echo "#  HAProxy 3.2 could not be fetched: $*"
        echo "#  the 3.2 integration tests will be reported as skipped"
        echo "#"
        echo "#  (destination: $DEST)"
        echo "#"
        echo "############################################################################"
        echo
    } >&2
    exit 1
}
trap 'fail "unexpected error at line $LINENO (exit status $?)"' ERR

wrapper_works() {
    # The output is read whole before grep looks at it: "grep -q" stops at the first line, and
    # haproxy writing the next one then dies of SIGPIPE, which pipefail takes as a failure (seen
    # with 3.2.26, whose -v prints three lines).
    local out
    [ -x "$WRAPPER" ] && out="$("$WRAPPER" -v 2>/dev/null)" &&
        grep -Eq '^HAProxy version (3\.([1-9]|[1-9][0-9])|[4-9])\.' <<<"$out"
}

if wrapper_works; then
    echo "HAProxy from sid already present at $WRAPPER (delete $DEST to re-fetch)"
    "$WRAPPER" -v
    exit 0
fi

command -v apt-get >/dev/null || fail "apt-get is not available on this machine"
command -v dpkg >/dev/null || fail "dpkg is not available on this machine"

# The mirror host the machine already uses: first non-security Debian URI in its sources.
mirror_uri() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        while read -r uri; do
            case "$uri" in *security*) continue ;; */debian | */debian/) echo "${uri%/}"; return ;; esac
        done < <(sed -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n')
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri="$(sed -E -n 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([a-z]+:\/\/[^[:space:]]+\/debian)\/?[[:space:]].*/\2/p' "$f" \
            | grep -v security | head -n1 || true)"
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    echo "http://deb.debian.org/debian"
}
MIRROR="$(mirror_uri)"
ARCH="$(dpkg --print-architecture)"
echo "Fetching haproxy and its libraries from $MIRROR sid ($ARCH) into $DEST"

APTDIR="$DEST/apt"
rm -rf "$APTDIR" "$DEST/root" "$DEST/debs"
mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$DEST/debs"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [ -f "$KEYRING" ]; then
    echo "deb [signed-by=$KEYRING] $MIRROR sid main" >"$APTDIR/sources.list"
else
    echo "deb $MIRROR sid main" >"$APTDIR/sources.list"
fi
APT=(-o "Dir::Etc::SourceList=$APTDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::State::Status=$APTDIR/status"
    -o "Dir::Cache=$APTDIR/cache" -o "APT::Architecture=$ARCH" -o Debug::NoLocking=1
    -o APT::Sandbox::User=root)
touch "$APTDIR/status"

apt-get "${APT[@]}" -q update >"$APTDIR/update.log" 2>&1 \
    || fail "apt-get update against $MIRROR sid failed: $(tail -n 3 "$APTDIR/update.log" | tr '\n' ' ')"

apt-cache "${APT[@]}" show haproxy >/dev/null 2>&1 || fail "sid has no 'haproxy' package on $MIRROR"

# Whatever sid's haproxy depends on today (libraries only), on top of the known list, so a
# library soname bump in sid does not silently leave a hole.
mapfile -t DEPS < <(apt-cache "${APT[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances haproxy 2>/dev/null \
    | sed -n -E 's/^[[:space:]]*(Pre)?Depends:[[:space:]]+([a-z0-9][a-z0-9.+-]*)$/\2/p; s/^([a-z0-9][a-z0-9.+-]*)$/\1/p' \
    | grep -E '^(lib|zlib1g$)' | sort -u)
mapfile -t PACKAGES < <(printf '%s\n' "${BASE_PACKAGES[@]}" "${DEPS[@]}" | sort -u)

cd "$DEST/debs"
if ! apt-get "${APT[@]}" -q download "${PACKAGES[@]}" >"$APTDIR/download.log" 2>&1; then
    # One unknown name fails the whole batch: retry one by one and only insist on haproxy.
    for pkg in "${PACKAGES[@]}"; do
        if ! apt-get "${APT[@]}" -q download "$pkg" >>"$APTDIR/download.log" 2>&1; then
            [ "$pkg" = haproxy ] && fail "could not download sid's haproxy package (see $APTDIR/download.log)"
            echo "warning: sid has no package '$pkg', continuing without it" >&2
        fi
    done
fi
ls ./haproxy_*.deb >/dev/null 2>&1 || fail "no haproxy .deb was downloaded (see $APTDIR/download.log)"

for deb in ./*.deb; do
    dpkg -x "$deb" "$DEST/root"
done

MULTIARCH="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"
LIBDIR="$DEST/root/usr/lib/$MULTIARCH"
# The loader must be the unpacked one: usr/lib64's entry is a symlink that may be absolute and
# so point at the host's older loader, which cannot run sid's glibc.
LOADER=""
for cand in "$LIBDIR"/ld-linux*.so.* "$DEST/root/usr/lib64"/ld-linux*.so.* "$DEST/root/lib64"/ld-linux*.so.*; do
    if [ -f "$cand" ] && [ ! -L "$cand" ]; then LOADER="$cand"; break; fi
done
[ -n "$LOADER" ] || fail "no dynamic loader found in the unpacked libc6 under $DEST/root"
[ -x "$DEST/root/usr/sbin/haproxy" ] || fail "the unpacked haproxy package has no usr/sbin/haproxy"

cat >"$WRAPPER.tmp" <<WRAP
#!/bin/sh
# Generated by scripts/fetch-haproxy-3.2.sh: run sid's haproxy through its own unpacked loader.
exec "$LOADER" --library-path "$LIBDIR" "$DEST/root/usr/sbin/haproxy" "\$@"
WRAP
chmod +x "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

if ! wrapper_works; then
    missing="$("$LOADER" --library-path "$LIBDIR" --list "$DEST/root/usr/sbin/haproxy" 2>&1 | grep 'not found' | tr '\n' ' ' || true)"
    out="$("$WRAPPER" -v 2>&1 | head -n 3 | tr '\n' ' ' || true)"
    fail "the unpacked haproxy does not run as 3.1+: ${missing:-$out}"
fi
cd "$DEST"
# Keep only the logs of the private apt state: the sid package lists are ~20 MB.
rm -rf "$DEST/debs" "$APTDIR/cache" "$APTDIR/lists"
trap - ERR
"$WRAPPER" -v
