#!/usr/bin/env bash
# Make a Docker engine answer on this machine, for the image build and the container tests.
#
#     scripts/ensure_dockerd.sh
#
# Idempotent: an engine that already answers `docker info` is left alone. Otherwise it installs
# Debian's docker.io when dockerd is missing and starts dockerd in the background (these machines
# have no systemd), then polls until the engine answers. The daemon log goes to build/dockerd.log.
# Needs root for the install and the start.
set -euo pipefail

cd "$(dirname "$0")/.."
wait_s=${DOCKERD_WAIT_S:-60}

if docker info >/dev/null 2>&1; then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "no Docker engine answers and starting one needs root: run 'sudo $0', or start Docker yourself" >&2
    exit 1
fi

if ! command -v dockerd >/dev/null 2>&1; then
    echo "dockerd missing: installing Debian's docker.io" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi

mkdir -p build
# Default networking on purpose: `--bridge=none` would delete the docker0 bridge other engines use.
nohup dockerd >build/dockerd.log 2>&1 &
echo "started dockerd (pid $!), log in build/dockerd.log; waiting up to ${wait_s}s for it to answer" >&2

deadline=$((SECONDS + wait_s))
until docker info >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
        echo "dockerd did not answer within ${wait_s}s; read build/dockerd.log" >&2
        exit 1
    fi
    sleep 0.5
done
