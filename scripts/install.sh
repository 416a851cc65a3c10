#!/usr/bin/env bash
# Install (or update) Heimdall Edge on Raspberry Pi OS (bookworm) as a systemd service.
#
#   sudo scripts/install.sh
#
# Safe to run again: it installs only what is missing, refreshes the code and
# the unit, never overwrites /etc/heimdall-edge/config.toml or the credentials,
# and restarts the service so the new code runs.
#
# Also on Debian or Ubuntu without Raspberry Pi OS's archive: lgpio then comes
# from PyPI and the camera is off (said in one line). Where systemd is not
# running (a container, a chroot, an image being built) the unit is installed,
# verified and enabled for the next boot, not started. `make pi-check` runs it
# in an emulated aarch64 Debian root (docs/PI.md).
#
# Environment knobs:
#   MODELS_FROM=/path/to/models  copy models from a folder (offline install)
#                                instead of downloading what is missing
#   SKIP_START=1                 install and enable, but do not (re)start now
set -euo pipefail

APP_NAME=heimdall-edge
APP_USER=heimdall
APP_DIR=/opt/heimdall-edge
VENV="$APP_DIR/.venv"
STATE_DIR=/var/lib/heimdall-edge
MODELS_DIR="$STATE_DIR/models"
CONFIG_DIR=/etc/heimdall-edge
CONFIG_FILE="$CONFIG_DIR/config.toml"
CREDENTIALS_DIR="$CONFIG_DIR/credentials"
UNIT_FILE=/etc/systemd/system/heimdall-edge.service
DEVICE_GROUPS=(audio video gpio)
APT_PACKAGES=(python3-venv python3-dev gcc portaudio19-dev libasound2-plugins libsndfile1
    alsa-utils libcap-dev rsync)
# Only in the Raspberry Pi OS archive (not in Debian's or Ubuntu's, not in a container
# built from them): without_pi_package says what happens instead.
APT_PI_PACKAGES=(python3-picamera2 python3-lgpio)

# Debian's own Python: apt's python3-picamera2 and python3-lgpio live in its
# dist-packages, and the service user must be able to run it (not a pyenv in ~).
SYSTEM_PYTHON=/usr/bin/python3

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf '\033[33mwarning:\033[0m %s\n' "$*" >&2; }
die() {
    printf '\033[31merror:\033[0m %s\n' "$*" >&2
    exit 1
}
trap 'die "install.sh failed at line $LINENO (exit $?); fix the cause above and run it again: it is safe to re-run"' ERR

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

without_pi_package() {
    case $1 in
    python3-lgpio) note "python3-lgpio is not in this archive: lgpio comes from PyPI instead" ;;
    python3-picamera2)
        warn "camera off: python3-picamera2 is only in Raspberry Pi OS's archive; captures will hold audio only"
        ;;
    esac
}

# --- checks -----------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0"
command -v apt-get >/dev/null || die "this installer is for Raspberry Pi OS / Debian (apt-get not found)"
if [ ! -f "$REPO_DIR/pyproject.toml" ] || [ ! -d "$REPO_DIR/heimdall_edge" ]; then
    die "$REPO_DIR does not look like the heimdall-edge repository"
fi
[ -f "$REPO_DIR/systemd/heimdall-edge.service" ] || die "missing $REPO_DIR/systemd/heimdall-edge.service"

# --- system packages --------------------------------------------------------
say "System packages"
missing=()
for pkg in "${APT_PACKAGES[@]}"; do installed "$pkg" || missing+=("$pkg"); done
pi_missing=()
for pkg in "${APT_PI_PACKAGES[@]}"; do installed "$pkg" || pi_missing+=("$pkg"); done
if [ ${#missing[@]} -gt 0 ] || [ ${#pi_missing[@]} -gt 0 ]; then
    note "updating the package lists"
    apt-get update -qq
    for pkg in "${pi_missing[@]}"; do
        if apt-cache show "$pkg" >/dev/null 2>&1; then
            missing+=("$pkg")
        else
            without_pi_package "$pkg"
        fi
    done
fi
if [ ${#missing[@]} -gt 0 ]; then
    note "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    note "all present"
fi
"$SYSTEM_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "Python 3.11 or newer is needed (found $("$SYSTEM_PYTHON" -V 2>&1)); use Raspberry Pi OS bookworm"

# --- service user -----------------------------------------------------------
say "Service user '$APP_USER'"
for group in "${DEVICE_GROUPS[@]}"; do
    if ! getent group "$group" >/dev/null; then
        # systemd refuses to start a unit whose SupplementaryGroups= do not exist.
        groupadd --system "$group"
        note "created missing group $group"
    fi
done
if ! id -u "$APP_USER" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "Heimdall Edge appliance" "$APP_USER"
    note "created system user $APP_USER (no login, home $STATE_DIR)"
else
    note "exists"
fi
usermod --append --groups "$(
    IFS=,
    echo "${DEVICE_GROUPS[*]}"
)" "$APP_USER"
note "groups: $(id -nG "$APP_USER")"

# --- code -------------------------------------------------------------------
say "Code in $APP_DIR"
install -d -o root -g root -m 0755 "$APP_DIR"
if [ "$REPO_DIR" -ef "$APP_DIR" ]; then
    note "running from $APP_DIR itself: nothing to copy"
else
    # Root-owned and read-only to the service; the venv, VCS data and caches stay out.
    rsync -a --delete --chown=root:root --chmod=u+rwX,go+rX,go-w \
        --exclude=/.venv --exclude=/.git --exclude=/.state --exclude=/build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude=.ruff_cache "$REPO_DIR"/ "$APP_DIR"/
    note "copied from $REPO_DIR"
fi

# --- Python environment -----------------------------------------------------
say "Python environment $VENV"
if [ -x "$VENV/bin/python" ] &&
    [ "$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null)" != /usr ]; then
    warn "$VENV was not made from $SYSTEM_PYTHON: making it again"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    # System site-packages: picamera2 and lgpio come from apt (they need libcamera
    # and the Pi's GPIO library, which pip cannot provide).
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
    note "created (with system site-packages)"
else
    note "exists"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# apt's picamera2 uses simplejpeg built against Debian's NumPy 1.x; a NumPy 2 in
# the venv would shadow it and break `import picamera2`.
echo 'numpy<2' >"$constraints"
note "installing Python dependencies (several minutes on a Pi)"
PIP=("$VENV/bin/pip" --disable-pip-version-check --no-input --quiet)
"${PIP[@]}" install --upgrade pip
if "$VENV/bin/python" -c 'import lgpio' 2>/dev/null; then
    note "lgpio already importable (apt's python3-lgpio, or an earlier install)"
    "${PIP[@]}" install --constraint "$constraints" "$APP_DIR"
else
    "${PIP[@]}" install --constraint "$constraints" "${APP_DIR}[pi]"
fi
# Same version number, new code: make sure this very copy is what runs.
"${PIP[@]}" install --no-deps --force-reinstall "$APP_DIR"
[ -x "$VENV/bin/heimdall-edge" ] || die "$VENV/bin/heimdall-edge was not installed"
note "heimdall-edge installed"

# The compiled modules the service loads, imported now rather than at its start-up.
# apt's (picamera2's simplejpeg, lgpio, ...) are built against Debian's NumPy 1.x
# and fail to import beside a NumPy 2, which the constraint above keeps out.
modules=(numpy pyaudio soundfile lgpio ctranslate2 onnxruntime)
if installed python3-picamera2; then modules+=(picamera2); fi
if ! imported=$("$VENV/bin/python" - "${modules[@]}" 2>&1 <<'PY'
import importlib, sys
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:  # an ABI mismatch is an ImportError, a broken wheel may be anything
        failed.append(f"  {name}: {type(exc).__name__}: {exc}")
if failed:
    sys.exit("\n".join(failed))
import numpy
where = "the venv's" if numpy.__file__.startswith(sys.prefix) else "apt's"
print(f"{', '.join(sys.argv[1:])} import (numpy {numpy.__version__}, {where})")
PY
); then
    die "the service would fail at start-up: in $VENV these do not import:
$imported
  If NumPy is named, a NumPy 2 reached the venv: run this installer again (it installs NumPy 1.x)."
fi
note "$imported"

# --- configuration and credentials ------------------------------------------
say "Configuration in $CONFIG_DIR"
install -d -o root -g root -m 0755 "$CONFIG_DIR"
if [ -f "$CONFIG_FILE" ]; then
    note "keeping the existing $CONFIG_FILE"
elif [ -f "$APP_DIR/config.example.toml" ]; then
    install -o root -g root -m 0644 "$APP_DIR/config.example.toml" "$CONFIG_FILE"
    note "created $CONFIG_FILE from config.example.toml: edit it to suit"
else
    warn "no config.example.toml in the repository: the service runs on built-in defaults"
fi
install -d -o root -g root -m 0700 "$CREDENTIALS_DIR"
chmod 0700 "$CREDENTIALS_DIR"
for key in openai_api_key elevenlabs_api_key; do
    if [ -f "$CREDENTIALS_DIR/$key" ]; then
        chown root:root "$CREDENTIALS_DIR/$key"
        chmod 0600 "$CREDENTIALS_DIR/$key"
        note "credential $key: present"
    else
        note "credential $key: absent (local engines only); to add it:"
        note "  sudo install -m 0600 /dev/stdin $CREDENTIALS_DIR/$key   # paste the key, then Ctrl-D"
    fi
done

# --- state and models -------------------------------------------------------
say "Models in $MODELS_DIR"
install -d -o "$APP_USER" -g "$APP_USER" -m 0700 "$STATE_DIR"
install -d -o "$APP_USER" -g "$APP_USER" -m 0755 "$MODELS_DIR"
# The models named in the config (settings stt.model and tts.voice), else the defaults.
if ! names=$("$VENV/bin/python" - "$CONFIG_FILE" <<'PY'
import sys, tomllib
try:
    with open(sys.argv[1], "rb") as f:
        config = tomllib.load(f)
except FileNotFoundError:
    config = {}
except tomllib.TOMLDecodeError as exc:
    sys.exit(f"{sys.argv[1]} is not valid TOML: {exc}")
model = config.get("stt", {}).get("model", "tiny.en")
voice = config.get("tts", {}).get("voice", "en_US-joe-medium")
# Paths (not names) are the owner's business: nothing to fetch for them.
print(model if "/" not in model else "-", voice if "/" not in voice and not voice.endswith(".onnx") else "-")
PY
); then
    die "cannot read the model names from $CONFIG_FILE: fix it and run this again"
fi
read -r whisper voice <<<"$names"
if [ "$whisper" = "-" ]; then
    note "stt.model is a path: not fetching a faster-whisper model"
    whisper=""
fi
if [ "$voice" = "-" ]; then
    note "tts.voice is a path: not fetching a Piper voice"
    voice=""
fi
if [ -n "${MODELS_FROM:-}" ]; then
    [ -d "$MODELS_FROM" ] || die "MODELS_FROM=$MODELS_FROM is not a folder"
    rsync -a --ignore-existing --chmod=u+rwX,go+rX "$MODELS_FROM"/ "$MODELS_DIR"/
    note "copied what was missing from $MODELS_FROM"
fi
if ! "$VENV/bin/python" "$APP_DIR/scripts/fetch-models" --dest "$MODELS_DIR" \
    --whisper "$whisper" --voice "$voice"; then
    die "the speech models are not in place. Connect the Pi to the internet and run this again, or copy a models folder over and run: sudo MODELS_FROM=/path/to/models $0"
fi
chown -R "$APP_USER:$APP_USER" "$STATE_DIR"

# --- systemd ----------------------------------------------------------------
say "systemd unit $UNIT_FILE"
install -o root -g root -m 0644 "$APP_DIR/systemd/heimdall-edge.service" "$UNIT_FILE"
if ! command -v systemd-analyze >/dev/null; then
    warn "systemd-analyze not found: $UNIT_FILE is not verified"
elif systemd-analyze verify "$UNIT_FILE"; then
    note "verified (systemd-analyze verify)"
else
    warn "systemd-analyze verify complained about $UNIT_FILE (see above)"
fi
if [ ! -d /run/systemd/system ]; then
    # A container, a chroot or an image being built: systemctl works on the files
    # alone, so the unit can be enabled for the next boot, but nothing can start it.
    if command -v systemctl >/dev/null; then
        systemctl enable --quiet "$APP_NAME"
        note "systemd is not running here (a container or chroot?): enabled for the next boot, not started"
    else
        warn "neither systemd nor systemctl here (a container?): the unit is installed, not enabled or started"
    fi
else
    systemctl daemon-reload
    systemctl reset-failed "$APP_NAME" 2>/dev/null || true
    if [ "${SKIP_START:-0}" = 1 ]; then
        systemctl enable "$APP_NAME"
        note "enabled; not started (SKIP_START=1)"
    elif systemctl is-active --quiet "$APP_NAME"; then
        systemctl enable "$APP_NAME"
        systemctl restart "$APP_NAME"
        note "enabled and restarted with the new code"
    else
        systemctl enable --now "$APP_NAME"
        note "enabled and started"
    fi
fi

say "Done"
note "status:  systemctl status $APP_NAME"
note "logs:    journalctl -u $APP_NAME -f"
note "config:  $CONFIG_FILE (then: sudo systemctl restart $APP_NAME)"
note "check:   sudo -u $APP_USER $VENV/bin/heimdall-edge doctor   (API keys show as unset outside the service)"
