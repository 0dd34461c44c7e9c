#!/usr/bin/env bash
# Everything the kubelet tests need on this machine, built once and cached (run as root):
#   - Debian's containerd, runc, CNI plugins, buildah, mmdebstrap (apt, when missing);
#   - kubelet $KUBELET_VERSION from the Go module proxy, cached by version;
#   - the control plane at the kubelet's version (kube-apiserver, kube-controller-manager,
#     kube-scheduler, kube-proxy, kubectl) and etcd $ETCD_VERSION, cached by both versions
#     (tests/harness/cluster.py starts them; build-controlplane.sh, ~8 min at low CPU priority);
#   - image archives (docker-archive tars, imported into containerd by tests/harness/node.py):
#       base   Debian bookworm + python3 (mmdebstrap), keyed on its package list;
#       agent  docker/Dockerfile built with buildah FROM base, keyed on base + the files it copies;
#       java   Debian bookworm + a headless JRE, keyed on its package list (jars are mounted);
#       pause  the base with `sleep infinity` as its command (the pod sandbox).
# Prints KEY=VALUE lines (KUBELET, AGENT_IMAGE, ...) that tests/harness/node.py reads. Idempotent: a
# warm machine only hashes files. Nothing here goes into the repository.
set -euo pipefail
KUBELET_VERSION=${KUBELET_VERSION:-v1.34.2}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
CACHE=${PRESTOP_KUBE_CACHE:-/var/cache/prestop-agent/kube}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/tests/kube"
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
JAVA_PACKAGES=openjdk-17-jre-headless
# Image names as containerd will know them; tests override manifests' images with these.
AGENT_NAME=localhost/prestop-agent:kube-test
JAVA_NAME=localhost/prestop-java:kube-test
PAUSE_NAME=localhost/prestop-pause:kube-test

log() { echo "prepare: $*" >&2; }
[ "$(id -u)" = 0 ] || { echo "prepare.sh needs root" >&2; exit 2; }
mkdir -p "$CACHE"
# One preparation at a time on this machine (two pytest runs would build the same things).
exec 9>"$CACHE/.lock"
flock 9

# --- Debian packages ------------------------------------------------------------------------
need=()
for tool in containerd:containerd runc:runc ctr:containerd /usr/lib/cni/bridge:containernetworking-plugins \
            buildah:buildah mmdebstrap:mmdebstrap ip:iproute2 openssl:openssl \
            iptables-save:iptables conntrack:conntrack; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    started=$SECONDS
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
    log "apt-get install ${need[*]}: $((SECONDS - started)) s"
fi

# --- kubelet --------------------------------------------------------------------------------
kubelet="$CACHE/kubelet/kubelet-$KUBELET_VERSION"
if [ ! -x "$kubelet" ]; then
    command -v go >/dev/null || { echo "go is needed to build the kubelet" >&2; exit 2; }
    mkdir -p "$CACHE/kubelet"
    started=$SECONDS
    "$HERE/build-kubelet.sh" "$KUBELET_VERSION" "$kubelet"
    log "kubelet $KUBELET_VERSION built in $((SECONDS - started)) s"
fi

# --- control plane (the cluster's; same version as the kubelet) ------------------------------
controlplane="$CACHE/controlplane/$KUBELET_VERSION-etcd-$ETCD_VERSION"
if [ ! -x "$controlplane/kube-apiserver" ]; then
    command -v go >/dev/null || { echo "go is needed to build the control plane" >&2; exit 2; }
    mkdir -p "$CACHE/controlplane"
    started=$SECONDS
    # Its own lock too: a build started by hand (e.g. while writing a test) is waited for.
    flock "$CACHE/.controlplane.lock" bash -c '[ -x "$1/kube-apiserver" ] || nice -n 19 "$2" "$3" "$4" "$1"' \
        _ "$controlplane" "$HERE/build-controlplane.sh" "$KUBELET_VERSION" "$ETCD_VERSION"
    log "control plane $KUBELET_VERSION, etcd $ETCD_VERSION ready in $((SECONDS - started)) s"
fi

# --- images ---------------------------------------------------------------------------------
# buildah with its own storage under the cache (vfs: works on any filesystem, no fuse).
BUILDAH=(buildah --root "$CACHE/buildah/storage" --runroot "$CACHE/buildah/run" --storage-driver vfs)
mkdir -p "$CACHE/images"

hash_of() { sha256sum | cut -c1-16; }

# A Debian rootfs with $2 as a one-layer image named $1 in buildah's storage.
rootfs_image() {
    local name=$1 packages=$2 tar="$CACHE/images/rootfs-$$.tar"
    local started=$SECONDS
    trap "rm -f '$tar'" EXIT  # expanded now: $tar is local
    mmdebstrap --quiet --variant=minbase --include="$packages" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        "$SUITE" "$tar" >&2
    "${BUILDAH[@]}" rmi -f "$name" >/dev/null 2>&1 || true
    local ctr
    ctr=$("${BUILDAH[@]}" from scratch)
    "${BUILDAH[@]}" add "$ctr" "$tar" / >/dev/null
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash "$ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$name" >/dev/null
    rm -f "$tar"
    log "$name ($packages) built in $((SECONDS - started)) s"
}

# Export image $1 as a docker-archive named $2 into $3 (atomically).
export_image() {
    rm -f "$3.tmp"
    "${BUILDAH[@]}" push --quiet "$1" "docker-archive:$3.tmp:$2" >/dev/null
    mv "$3.tmp" "$3"
}

base_key=$(printf '%s %s v1' "$SUITE" "$BASE_PACKAGES" | hash_of)
base_name="localhost/prestop-base:$base_key"
"${BUILDAH[@]}" inspect --type image "$base_name" >/dev/null 2>&1 || rootfs_image "$base_name" "$BASE_PACKAGES"

pause_tar="$CACHE/images/pause-$base_key.tar"
if [ ! -f "$pause_tar" ]; then
    ctr=$("${BUILDAH[@]}" from "$base_name")
    "${BUILDAH[@]}" config --cmd '["/bin/sleep","infinity"]' "$ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$PAUSE_NAME" >/dev/null
    export_image "$PAUSE_NAME" "$PAUSE_NAME" "$pause_tar"
fi

# The agent image: the Dockerfile and every file it may copy (a .dockerignore included).
inputs=(docker agent pyproject.toml README.md)
[ -e "$ROOT/.dockerignore" ] && inputs+=(.dockerignore)
agent_key=$( (echo "$base_key"; cd "$ROOT" && find "${inputs[@]}" -type f ! -name '*.pyc' \
    | LC_ALL=C sort | xargs sha256sum) | hash_of)
agent_tar="$CACHE/images/agent-$agent_key.tar"
if [ ! -f "$agent_tar" ]; then
    started=$SECONDS
    # pip in the build reaches PyPI the way this machine does: through its CA bundle (a
    # TLS-inspecting proxy may sign the answers). Mounted for the RUN steps only, not in the image.
    mounts=()
    host_ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
    if [ -f "$host_ca" ]; then
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$CACHE/build-pip.conf"
        mounts=(--volume "$host_ca:/etc/ssl/certs/ca-certificates.crt:ro"
                --volume "$CACHE/build-pip.conf:/etc/pip.conf:ro")
    fi
    "${BUILDAH[@]}" bud --quiet --isolation chroot --network host --layers=false "${mounts[@]}" \
        --build-arg "BASE_IMAGE=$base_name" -f "$ROOT/docker/Dockerfile" -t "$AGENT_NAME" "$ROOT" >&2
    export_image "$AGENT_NAME" "$AGENT_NAME" "$agent_tar"
    find "$CACHE/images" -name 'agent-*.tar' ! -name "agent-$agent_key.tar" -delete
    "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
    log "agent image built from docker/Dockerfile in $((SECONDS - started)) s"
fi

java_key=$(printf '%s %s v1' "$SUITE" "$JAVA_PACKAGES,$BASE_PACKAGES" | hash_of)
java_tar="$CACHE/images/java-$java_key.tar"
if [ ! -f "$java_tar" ]; then
    rootfs_image "localhost/prestop-java-rootfs:$java_key" "$BASE_PACKAGES,$JAVA_PACKAGES"
    export_image "localhost/prestop-java-rootfs:$java_key" "$JAVA_NAME" "$java_tar"
    # Only the archive is used from here on: nothing is built FROM this image.
    "${BUILDAH[@]}" rmi "localhost/prestop-java-rootfs:$java_key" >/dev/null
fi

echo "KUBELET=$kubelet"
echo "CONTROLPLANE=$controlplane"
echo "PAUSE_IMAGE=$PAUSE_NAME"
echo "AGENT_IMAGE=$AGENT_NAME"
echo "JAVA_IMAGE=$JAVA_NAME"
echo "IMAGE_ARCHIVES=$pause_tar $agent_tar $java_tar"
