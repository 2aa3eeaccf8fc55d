#!/bin/sh
# Makes debian:bookworm-slim locally, for engines that cannot pull it (no registry on the network).
# `make base-image` runs this; it does nothing when the engine already has the image, so a user whose
# engine can pull keeps the official image.
#
# What it builds matches the official slim image: mmdebstrap's minbase variant (essential packages and
# apt), merged /usr, dpkg path filters that leave out documentation, manual pages and translations
# (copyright files stay), and apt keeping neither downloaded packages nor its binary caches. Packages come from the archive the host's apt uses, so an image built on a
# closed network reaches what the host reaches. Two host settings go into the image when the host has
# them, because builds need them on such networks:
#   - apt's Acquire::Check-Valid-Until "false" (a dated archive snapshot has expired Release files);
#   - the host's CA bundle, named in /etc/pip.conf, for an index reached through a TLS-inspecting proxy
#     (pip in the image trusts its own certifi bundle otherwise).
#
# With SOURCE_DATE_EPOCH set (mmdebstrap honours it), the same archive gives the same image byte for byte (two
# builds gave one tar), so machines can compare their base layers; without it every build differs.
#
# Usage: deploy/base-image.sh [docker|podman]     (default: docker; DOCKER=... also works)
set -eu

engine=${1:-${DOCKER:-docker}}
image=debian:bookworm-slim
suite=bookworm

if "$engine" image inspect "$image" >/dev/null 2>&1; then
    echo "$image: already in $engine"
    exit 0
fi
for tool in mmdebstrap "$engine"; do
    command -v "$tool" >/dev/null || { echo "base-image: $tool is missing (make base-image installs it)" >&2; exit 1; }
done
# Before anything is built (mmdebstrap takes half a minute, minutes on a busy machine): an engine that answers.
# Installing docker.io starts the daemon only where systemd runs.
# The reason: Debian's docker 20.10 writes it to stdout ("ERROR: Cannot connect to the Docker daemon at ...") and only
# "errors pretty printing info" to stderr; Docker's newer CLI and podman write it to stderr. So the first line that
# names an error, of both.
if ! said=$("$engine" info 2>&1); then
    why=$(printf '%s\n' "$said" | grep -v '^errors pretty printing info$' | grep -m 1 -iE 'error|cannot|denied' ||
        printf '%s\n' "$said" | tail -n 1)
    echo "base-image: $engine does not answer (${why#ERROR: }): start it first:" \
        "\`systemctl start docker\`, or without systemd, as root, \`dockerd --host=unix:///var/run/docker.sock &\`" \
        "(docs/containers.md)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The host's Debian sources, when it has them in deb822 form; else mmdebstrap's default mirror.
mirror=
for sources in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$sources" ]; then mirror=$sources; break; fi
done

set --
eval "$(apt-config shell valid_until Acquire::Check-Valid-Until)"
if [ "${valid_until:-}" = "false" ]; then
    set -- "$@" --aptopt='Acquire::Check-Valid-Until "false"'
fi
bundle=/etc/ssl/certs/ca-certificates.crt
if [ -s "$bundle" ]; then
    cp "$bundle" "$work/host-ca-bundle.pem"
    printf '[global]\ncert = /etc/ssl/host-ca-bundle.pem\n' > "$work/pip.conf"
    set -- "$@" --customize-hook="mkdir -p \"\$1/etc/ssl\" && cp $work/host-ca-bundle.pem \"\$1/etc/ssl/\" && cp $work/pip.conf \"\$1/etc/\""
fi

# As the official image's apt configuration does: a package install leaves no downloaded .deb and no binary
# cache in the layer it makes (without it every image kept 81-108 MB of /var/cache/apt). In the image only:
# mmdebstrap's own apt needs the packages it downloads (so not --aptopt).
printf '%s\n' '// deploy/base-image.sh: no downloaded package nor binary cache left in an image layer' \
    'APT::Keep-Downloaded-Packages "false";' 'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' \
    > "$work/zz-kcd-no-cache"
set -- "$@" --customize-hook="cp $work/zz-kcd-no-cache \"\$1/etc/apt/apt.conf.d/\""

# The official slim image's dpkg filters: no docs (but copyrights), no man, info, groff, lintian, locales.
for filter in \
    'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
    'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/groff/*' 'path-exclude=/usr/share/info/*' \
    'path-exclude=/usr/share/lintian/*' 'path-exclude=/usr/share/linda/*' 'path-exclude=/usr/share/locale/*'; do
    set -- "$@" --dpkgopt="$filter"
done

echo "$image: building it with mmdebstrap from ${mirror:-the default mirror}"
mmdebstrap --variant=minbase --mode=root --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$@" "$suite" "$work/rootfs.tar" ${mirror:+"$mirror"}
# Without ENV PATH an imported image has no PATH at all, and a Dockerfile's `ENV PATH=/opt/x/bin:$PATH`
# then leaves out /usr/sbin (useradd, slapd).
"$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    "$work/rootfs.tar" "$image"
echo "$image: imported"
