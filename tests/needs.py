"""What a test needs from the machine (a binary scripts/test installs): where it is missing the
test is skipped with the reason; under CI=true it fails instead, so CI never passes without it."""

import os
import shutil
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def required_binary(name: str, installed_by: str) -> str:
    """The path of `name`; `installed_by` says what scripts/test installs it from."""
    binary = shutil.which(name)
    if binary is None:
        unavailable(f"{name} is not installed (scripts/test installs {installed_by})")
    return binary
