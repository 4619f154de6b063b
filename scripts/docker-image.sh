#!/usr/bin/env bash
# Build the foldmesh image with no registry: a Debian base made locally (debootstrap, imported
# into Docker once and cached), the binaries built by cargo on this host, copied in by the
# Dockerfile's `prebuilt` stage. Same image as `docker build -t foldmesh .` (docs/DEPLOY.md).
#
#   scripts/docker-image.sh                    release binaries (cargo build --release)
#   scripts/docker-image.sh --bin-dir DIR      binaries already built in DIR (e.g. target/debug)
#
# Tags: foldmesh:latest (docker-compose.yml) and foldmesh:<appVersion> (the Helm chart's image).
# Environment: FOLDMESH_CACHE (default /var/cache/foldmesh) keeps the debootstrap tarball between
# runs; FOLDMESH_BASE (default foldmesh-base:bookworm) names the imported base image;
# DEBIAN_MIRROR picks debootstrap's mirror. Needs a running Docker engine; debootstrap needs root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FOLDMESH_CACHE:-/var/cache/foldmesh}"
BASE="${FOLDMESH_BASE:-foldmesh-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
say() { printf '==> %s\n' "$*" >&2; }

bin_dir=""
while (($#)); do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

docker info >/dev/null 2>&1 || { echo "no Docker engine answers (docker info failed); start dockerd first" >&2; exit 1; }

# The base image: imported already, or from the cached tarball, or made by debootstrap.
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  tarball="$CACHE/bookworm-minbase.tar"
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "debootstrap is not installed (scripts/install-test-tools.sh installs it)" >&2; exit 1; }
    [ "$(id -u)" -eq 0 ] || { echo "debootstrap needs root" >&2; exit 1; }
    say "debootstrap --variant=minbase bookworm (about a minute; cached in $tarball)"
    mkdir -p "$CACHE"
    rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  say "docker import $tarball as $BASE"
  docker import "$tarball" "$BASE" >/dev/null
fi

if [ -z "$bin_dir" ]; then
  say "cargo build --release (fold-node, p2p-sidecar, foldctl)"
  (cd "$ROOT" && cargo build --release --locked -p fold-node -p p2p-sidecar -p foldctl)
  bin_dir="$ROOT/target/release"
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin"
for b in fold-node p2p-sidecar foldctl; do
  [ -x "$bin_dir/$b" ] || { echo "$bin_dir/$b is missing: build it first (cargo build --bins)" >&2; exit 1; }
  # Debug information is for the build host; the image gets the code only.
  if command -v strip >/dev/null; then
    strip --strip-debug -o "$ctx/bin/$b" "$bin_dir/$b"
  else
    cp "$bin_dir/$b" "$ctx/bin/$b"
  fi
done

version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/helm/fold-node/Chart.yaml")"
[ -n "$version" ] || { echo "no appVersion in helm/fold-node/Chart.yaml" >&2; exit 1; }
say "docker build --target prebuilt (foldmesh:latest, foldmesh:$version)"
docker build -q --target prebuilt --build-arg "BASE=$BASE" -f "$ROOT/Dockerfile" \
  -t foldmesh:latest -t "foldmesh:$version" "$ctx" >/dev/null
say "image foldmesh:latest = foldmesh:$version built"
