#!/usr/bin/env bash
# Build the user-code image of deploy/Dockerfile on a machine with no image registry (opt-in, slow):
# a Debian 12 base made with debootstrap, imported into podman, then `podman build` with that base and
# a CPU torch wheel from a local folder. The CUDA base stays the Dockerfile's default for real clusters.
#
#   deploy/build_local_image.sh            # -> localhost/rag-clean:local
#
# Env: IMAGE (tag to build), BASE (base image tag), BASE_ROOTFS (reuse a debootstrapped folder),
#      TORCH_WHEEL (a CPU torch wheel for Python 3.11; default: the newest under /opt/wheels),
#      WORK (scratch folder, default /var/tmp/rag_clean-k8s).
# Needs root, debootstrap, podman and runc (Debian: apt-get install -y debootstrap podman runc; podman
# alone brings crun, which fails on hybrid cgroups). pip inside the build trusts the host CA bundle
# (CA_BUNDLE, mounted only while building) for machines behind a TLS-intercepting proxy.
# docs/scaling.md, "Checked without a cluster".
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-localhost/rag-clean:local}"
BASE="${BASE:-localhost/debian-bookworm-minbase:local}"
WORK="${WORK:-/var/tmp/rag_clean-k8s}"
BASE_ROOTFS="${BASE_ROOTFS:-$WORK/rootfs}"
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || { echo "build_local_image.sh: $tool not found (apt-get install -y debootstrap podman runc)" >&2; exit 2; }
done
if [[ -z "${TORCH_WHEEL:-}" ]]; then
  TORCH_WHEEL="$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -1 || true)"
fi
[[ -f "${TORCH_WHEEL:-}" ]] || { echo "build_local_image.sh: TORCH_WHEEL=${TORCH_WHEEL:-} is not a file (a CPU torch wheel for cp311)" >&2; exit 2; }
wheel_name="$(basename "$TORCH_WHEEL")"
torch_version="$(echo "$wheel_name" | cut -d- -f2)"   # torch-2.13.0+cpu-cp311-... -> 2.13.0+cpu

mkdir -p "$WORK"
t0=$(date +%s)
if ! "${PODMAN[@]}" image exists "$BASE"; then
  if [[ ! -x "$BASE_ROOTFS/bin/sh" ]]; then
    echo "== debootstrap --variant=minbase bookworm $BASE_ROOTFS"
    debootstrap --variant=minbase bookworm "$BASE_ROOTFS" http://deb.debian.org/debian
  fi
  echo "== import $BASE_ROOTFS as $BASE"
  tar -C "$BASE_ROOTFS" -c . | "${PODMAN[@]}" import - "$BASE"
fi
t1=$(date +%s)

# The wheel folder (and the host's CA bundle, which pip needs where a proxy re-signs TLS) are mounted
# only while building: neither lands in the image or the build context.
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
echo "== podman build $IMAGE from $BASE, torch $torch_version"
"${PODMAN[@]}" build "${LIMITS[@]}" -f "$REPO/deploy/Dockerfile" -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_VERSION="$torch_version" --build-arg PIP_FIND_LINKS=/wheels \
  --build-arg PIP_CERT=/host-ca/ca-certificates.crt \
  -v "$(dirname "$TORCH_WHEEL")":/wheels:ro -v "$(dirname "$CA_BUNDLE")":/host-ca:ro "$REPO"
t2=$(date +%s)
echo "== built $IMAGE: base $((t1 - t0)) s, image $((t2 - t1)) s"
"${PODMAN[@]}" image ls "$IMAGE"
