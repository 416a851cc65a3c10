#!/usr/bin/env bash
# Set up everything the demo and the tests need, and nothing twice:
# system packages (when root or sudo is available), .venv, Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3-venv python3-dev gcc portaudio19-dev libasound2-plugins libsndfile1 systemd faketime)

missing_apt() {
    local pkg missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    echo "${missing[@]:-}"
}

if command -v dpkg-query >/dev/null; then
    missing=$(missing_apt)
    if [ -n "$missing" ]; then
        if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO=none; fi
        if [ "$SUDO" = none ]; then
            echo "bootstrap: missing system packages: $missing" >&2
            echo "bootstrap: install them as root: apt-get install -y $missing" >&2
            exit 1
        fi
        echo "bootstrap: installing system packages: $missing"
        $SUDO apt-get update -qq
        # shellcheck disable=SC2086
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: installing Python dependencies"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
