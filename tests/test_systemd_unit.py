"""The systemd unit: it verifies cleanly, it is well sandboxed, and it says what the code expects.

Uses the real `systemd-analyze` (apt package systemd, installed by
scripts/bootstrap.sh); it works on a unit file without a running systemd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "heimdall-edge.service"
INSTALLED_EXEC = "/opt/heimdall-edge/.venv/bin/heimdall-edge"
MAX_EXPOSURE = 2.0


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: run scripts/bootstrap.sh (apt package systemd)"
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [exe, "--no-pager", *args], check=False, capture_output=True, text=True, timeout=60, env=env
    )


def unit_entries(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> every value assigned, in order (keys may repeat in unit files)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


@pytest.fixture(scope="module")
def entries() -> dict[str, list[str]]:
    return unit_entries(UNIT.read_text())


def one(entries: dict[str, list[str]], key: str) -> str:
    values = entries.get(key, [])
    assert len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a real executable, so verify has nothing to flag."""
    exe = tmp_path / "heimdall-edge"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_EXEC} ") == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={exe} "))
    return copy


def test_verify_is_clean_with_a_real_executable(tmp_path):
    result = systemd_analyze("verify", str(runnable_copy(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_verify_of_the_shipped_unit_only_misses_the_installed_executable():
    result = systemd_analyze("verify", str(UNIT))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert complaints, "expected verify to flag the not-yet-installed ExecStart"
    for line in complaints:
        assert INSTALLED_EXEC in line and "is not executable" in line, line


def test_security_exposure_is_low():
    result = systemd_analyze("security", "--offline=true", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(
        r"Overall exposure level for heimdall-edge\.service: (\d+(?:\.\d+)?)", result.stdout
    )
    assert match, result.stdout
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_security_threshold_exit_code_agrees():
    # systemd-analyze exits non-zero when the exposure (times ten) passes --threshold.
    result = systemd_analyze("security", "--offline=true", "--threshold=20", str(UNIT))
    assert result.returncode == 0, result.stdout + result.stderr


def test_key_protections_are_rated_as_set():
    result = systemd_analyze("security", "--offline=true", "--json=short", str(UNIT))
    assert result.returncode == 0, result.stderr
    checks = {item["name"]: item["set"] for item in json.loads(result.stdout)}
    for name in (
        "NoNewPrivileges=",
        "User=/DynamicUser=",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "SystemCallArchitectures=",
        "SystemCallFilter=~@privileged",
        "RestrictNamespaces=~user",
        "RestrictAddressFamilies=~AF_PACKET",
        "NotifyAccess=",
        "UMask=",
        "ProtectKernelTunables=",
        "ProtectControlGroups=",
        "LockPersonality=",
    ):
        assert checks.get(name) is True, f"{name} not rated as set"


def test_lifecycle(entries):
    assert one(entries, "Service.Type") == "notify"
    assert one(entries, "Service.NotifyAccess") == "main"
    assert one(entries, "Service.ExecStart") == f"{INSTALLED_EXEC} run"
    assert int(one(entries, "Service.WatchdogSec")) > 0
    assert one(entries, "Service.Restart") == "on-failure"
    assert int(one(entries, "Service.TimeoutStartSec")) >= 60
    assert int(one(entries, "Unit.StartLimitIntervalSec")) > 0
    assert int(one(entries, "Unit.StartLimitBurst")) > 0
    assert one(entries, "Install.WantedBy") == "multi-user.target"


def test_identity_directories_and_environment(entries):
    assert one(entries, "Service.User") == "heimdall"
    assert set(one(entries, "Service.SupplementaryGroups").split()) == {"audio", "video", "gpio"}
    assert one(entries, "Service.StateDirectory") == "heimdall-edge"
    assert one(entries, "Service.StateDirectoryMode") == "0700"
    assert one(entries, "Service.RuntimeDirectory") == "heimdall-edge"
    environment = dict(
        assignment.split("=", 1)
        for line in entries["Service.Environment"]
        for assignment in line.split()
    )
    assert environment["HEIMDALL_STATE_DIR"] == "/var/lib/heimdall-edge"
    assert environment["LG_WD"] == "/run/heimdall-edge"
    assert environment["HF_HUB_OFFLINE"] == "1"


def test_credentials_match_the_settings_and_are_optional(entries):
    from heimdall_edge.settings import SECRET_SOURCES

    loaded = dict(value.split(":", 1) for value in entries["Service.LoadCredential"])
    assert set(loaded) == set(SECRET_SOURCES), "credential IDs must match read_secrets()"
    for name, path in loaded.items():
        assert path == f"/etc/heimdall-edge/credentials/{name}"
    # A missing LoadCredential= file fails the unit unless SetCredential= gives a
    # fallback; the fallback is whitespace, which read_secrets() treats as "no key".
    fallbacks = dict(value.split(":", 1) for value in entries["Service.SetCredential"])
    assert set(fallbacks) == set(SECRET_SOURCES)
    assert all(value == r"\n" for value in fallbacks.values())


def test_devices_are_a_closed_list(entries):
    assert one(entries, "Service.DevicePolicy") == "closed"
    allowed = {value.split()[0] for value in entries["Service.DeviceAllow"]}
    assert {"char-alsa", "char-gpiochip", "char-video4linux"} <= allowed
