#!/usr/bin/env bash
# Prints the Debian mirror to debootstrap from: $LUNA_DEBIAN_MIRROR, else the first Debian mirror
# of apt's sources (deb822 `URIs:` or one-line `deb` entries). Exits 1 with a message if none.
# Used by scripts/build-debian-image.sh and tests/tests/deb_package.rs.
set -euo pipefail
if [ -n "${LUNA_DEBIAN_MIRROR:-}" ]; then
    printf '%s\n' "$LUNA_DEBIAN_MIRROR"
    exit 0
fi
mirror="$(for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}
         /^deb / {for (i = 2; i <= NF; i++) if ($i ~ /^http/) print $i}' "$f"
done | sed 's#/*$##' | grep -m1 '/debian$' || true)"
if [ -z "$mirror" ]; then
    printf 'debian-mirror: no Debian mirror in /etc/apt/sources.list*; set LUNA_DEBIAN_MIRROR\n' >&2
    exit 1
fi
printf '%s\n' "$mirror"
