"""scripts/pi-check's bad input: what is missing is named with the fix, and no broken cache stays.

Each test runs the real script with a PATH of its own (only the commands it names)
and a cache under tmp_path, and stops it before anything is built: with no
debootstrap, proot or qemu on that PATH and no apt-get to install them, with `df`
reporting a full disk, or with a debootstrap that fails half-way. The build itself
(tens of minutes) is `make pi-check`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pi-check"
# What the script runs before it needs the emulation tools.
# (`id` and `df` are fakes: the user and the free space are the test's to choose.)
HOST_COMMANDS = [
    "bash",
    "env",
    "dirname",
    "sed",
    "awk",
    "mkdir",
    "rm",
    "flock",
    "sort",
    "tr",
    "python3",
    "mktemp",
    "nproc",
    "tail",
]


def fake(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.unlink(missing_ok=True)  # a link to the real command: never write through it
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


@pytest.fixture
def host(tmp_path: Path, models_dir: Path, speech_dir: Path):
    """Run pi-check on a machine with only HOST_COMMANDS, as root with 100 GB free unless told."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in HOST_COMMANDS:
        found = shutil.which(name)
        assert found, f"{name} is needed on this machine for the test"
        (bin_dir / name).symlink_to(found)
    cache = tmp_path / "cache"

    def run(*args: str, uid: int = 0, free_gb: int = 100, **env: str):
        fake(bin_dir, "id", f'[ "$1" = -u ] && echo {uid}')
        # df -Pk: the fourth column is what is available, in KiB.
        kb = free_gb * 1024**2
        fake(bin_dir, "df", f'echo "Filesystem 1024-blocks Used Available"; echo "x 0 0 {kb}"')
        environment = {
            "PATH": str(bin_dir),
            "HOME": str(tmp_path),
            "PI_CHECK_CACHE": str(cache),
            "HEIMDALL_MODELS_DIR": str(models_dir),
            "HEIMDALL_SPEECH_DIR": str(speech_dir),
            **env,
        }
        return subprocess.run(
            ["/bin/bash", str(SCRIPT), *args],
            env=environment,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    run.cache = cache
    return run


def old_root(cache: Path, stamp: str | None) -> Path:
    root = cache / "pi-root"
    (root / "usr" / "bin").mkdir(parents=True)
    if stamp is not None:
        (root / ".pi-check-stamp").write_text(stamp)
    return root


def test_it_needs_root(host) -> None:
    done = host(uid=1000)
    assert done.returncode == 1
    assert "run as root: sudo make pi-check" in done.stderr


def test_no_emulation_tools_and_no_apt_names_the_packages(host) -> None:
    done = host()
    assert done.returncode == 1
    assert (
        "missing Debian packages: debootstrap proot qemu-user-static; "
        "install them (apt-get install debootstrap proot qemu-user-static)"
    ) in done.stderr
    assert not (host.cache / "pi-root").exists()


def test_missing_models_name_the_variable(host, tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    done = host(HEIMDALL_MODELS_DIR=str(nowhere))
    assert done.returncode == 1
    assert f"no faster-whisper-tiny.en in {nowhere}: set HEIMDALL_MODELS_DIR" in done.stderr


def test_not_enough_space_is_said_before_anything_is_installed(host) -> None:
    done = host(free_gb=1)
    assert done.returncode == 1
    assert "only 1 GB free under" in done.stderr and "needs 4 GB" in done.stderr
    assert "PI_CHECK_CACHE" in done.stderr
    assert "missing Debian packages" not in done.stderr


def test_a_root_from_an_older_recipe_is_thrown_away(host) -> None:
    root = old_root(host.cache, "recipe=0\n")
    done = host()
    assert "was built by recipe 0, this is recipe 1: building it again" in done.stdout
    assert not root.exists()


def test_a_root_without_a_stamp_is_thrown_away(host) -> None:
    root = old_root(host.cache, None)
    done = host()
    assert "has no stamp (not built by pi-check, or damaged): building it again" in done.stdout
    assert not root.exists()


def test_a_current_root_is_kept(host) -> None:
    root = old_root(host.cache, "recipe=1\n")
    host()
    assert (root / ".pi-check-stamp").exists()


def test_rebuild_throws_a_current_root_away(host) -> None:
    root = old_root(host.cache, "recipe=1\n")
    done = host("--rebuild")
    assert "--rebuild: removing the cached root" in done.stdout
    assert not root.exists()


def test_a_build_cut_short_is_removed(host) -> None:
    half_built = host.cache / "pi-root.building-Ab12Cd"
    (half_built / "debootstrap").mkdir(parents=True)
    done = host()
    assert f"removing {half_built}, left by a build that was interrupted" in done.stdout
    assert not half_built.exists()


def test_a_download_failing_half_way_leaves_no_root(host) -> None:
    bin_dir = host.cache.parent / "bin"
    # debootstrap's first stage, failing after it has begun to fill its target
    # (the argument before the mirror).
    fake(
        bin_dir,
        "debootstrap",
        'eval "target=\\${$(($# - 1))}"; mkdir -p "$target/var/cache/apt/archives"\n'
        'echo "E: Couldn\'t download http://mirror.invalid/debian/pool/main/g/glibc/libc6.deb" >&2\n'
        "exit 1",
    )
    for name in ("proot", "qemu-aarch64-static"):
        fake(bin_dir, name, "exit 1")
    done = host(PI_CHECK_MIRROR="http://mirror.invalid/debian")
    assert done.returncode == 1
    assert "Couldn't download http://mirror.invalid" in done.stderr
    assert "Root: debootstrap, first stage (downloads) failed" in done.stderr
    assert "The half-built root is removed, so the next run starts clean" in done.stderr
    assert [p.name for p in host.cache.iterdir() if p.name.startswith("pi-root")] == []


def test_two_runs_never_share_the_cache(host) -> None:
    host.cache.mkdir()
    with open(host.cache / "pi-check.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = host()
    assert done.returncode == 1
    assert "another pi-check is using" in done.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--fast"], {}, "unknown argument '--fast' (the only one is --rebuild)"),
        ([], {"PI_CHECK_CPU": "cortex-a9"}, "PI_CHECK_CPU=cortex-a9: use cortex-a72 (Pi 4)"),
    ],
)
def test_bad_arguments(host, args: list[str], env: dict[str, str], message: str) -> None:
    done = host(*args, **env)
    assert done.returncode == 1
    assert message in done.stderr


# --- scripts/proot-compat: the seccomp filter proot runs under ---------------------------------

PROOT_COMPAT = [sys.executable, str(REPO / "scripts" / "proot-compat")]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


MOUNT_CALLS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
target = os.environ["TARGET"].encode()
print(libc.mount(b"none", target, b"tmpfs", 0, None), libc.umount2(target, 0))
print(os.path.ismount(os.environ["TARGET"]))
"""


def test_proot_compat_makes_mount_and_umount_no_ops_that_succeed(tmp_path: Path) -> None:
    """What runs in the root (as real root) may not mount or unmount the host's file systems:
    the calls return 0 and change nothing. Without the filter they fail here (no such target)."""
    env = {**os.environ, "TARGET": str(tmp_path / "no-such-folder")}
    calls = [sys.executable, "-c", MOUNT_CALLS]
    plain = run(calls, env=env)
    assert plain.stdout.split() == ["-1", "-1", "False"], plain.stderr
    filtered = run([*PROOT_COMPAT, *calls], env=env)
    assert filtered.stdout.split() == ["0", "0", "False"], filtered.stderr


def test_proot_compat_refuses_the_calls_proot_does_not_translate_and_callers_fall_back(
    tmp_path: Path,
) -> None:
    """statx and faccessat2 answer ENOSYS; stat(1) and test -x then use the older calls."""
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    script = f"test -x {tool} && stat -c %s {tool}"
    done = run([*PROOT_COMPAT, "sh", "-c", script])
    assert (done.returncode, done.stdout.strip()) == (0, "10"), done.stderr
    probe = "import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
    probe += "print(libc.syscall(332, -100, b'/', 0, 0, None), ctypes.get_errno())"  # statx
    done = run([*PROOT_COMPAT, sys.executable, "-c", probe])
    assert done.stdout.split() == ["-1", "38"], done.stderr  # ENOSYS
