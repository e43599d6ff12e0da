"""Real file systems that fail the way a server's disk does: full, read-only, another user.

They need root (mount, setuid). Elsewhere the requesting test is skipped with the reason; under
CI=true it fails instead, like the Asterisk tests, so CI never passes without them.
"""

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534  # the uid of `nobody` on Debian: a local user with no rights of its own


def require_root(what: str) -> None:
    if os.geteuid() == 0:
        return
    reason = f"{what} needs root"
    if os.environ.get("CI") == "true":
        pytest.fail(f"this test must run under CI=true, but {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (made if missing), unmounted afterwards."""
    require_root("mounting a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0700" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path}: {result.stderr.strip()}", pytrace=False)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, read_only: bool) -> None:
    subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its file system is full; the file, to delete for space."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler
