"""The agi-bitrix server as Asterisk meets it in production: `python -m agi_bitrix serve` in a
process of its own, with the shipped config/agi-bitrix.yaml (its rules unchanged) and the portal
emulator's webhook URL in AGI_BITRIX_WEBHOOK_URL."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from agi_bitrix.testing.pbx_harness import REPO, free_tcp_port

SHIPPED_CONFIG = REPO / "config" / "agi-bitrix.yaml"


class ProductServer:
    def __init__(self, webhook_url: str, workdir: Path, deadline: float, fallback_queue: str | None = None,
                 first_rules: Sequence[dict] = ()):
        """`fallback_queue` replaces the shipped one; `first_rules` go before the shipped rules."""
        self.webhook_url = webhook_url
        self.port = free_tcp_port()
        self.deadline = deadline
        self.fallback_queue = fallback_queue
        self.first_rules = list(first_rules)
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"agi-bitrix-{self.port}.yaml"
        self.log_path = workdir / f"agi-bitrix-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"agi://127.0.0.1:{self.port}/route"

    def _write_config(self) -> None:
        config = yaml.safe_load(SHIPPED_CONFIG.read_text())
        bitrix = config.setdefault("bitrix", {})
        bitrix["deadline"] = self.deadline
        # The emulator has no request limit, and the failure tests must not open the breaker
        # for the tests after them: both protections are the unit tests' subject.
        bitrix["rate_limit"] = {"per_second": 10000, "burst": 100000}
        bitrix["breaker"] = {"failures": 1000}
        # Several servers run at once in this suite; none needs an HTTP port.
        config["http"] = {"listen": "off"}
        if self.fallback_queue is not None:
            config["routing"]["fallback_queue"] = self.fallback_queue
        config["routing"]["rules"] = self.first_rules + config["routing"]["rules"]
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, timeout: float = 30) -> "ProductServer":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agi_bitrix", "serve", "-c", str(self.config_path),
                 "--listen", f"127.0.0.1:{self.port}"],
                env={**os.environ, "AGI_BITRIX_WEBHOOK_URL": self.webhook_url},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agi-bitrix serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                # A client that connects and leaves at once: the server must shrug it off.
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"agi-bitrix serve did not listen within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """A clean stop (SIGTERM), as an admin's service manager does it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def crash(self) -> None:
        """Dies at once, like a process killed by the kernel: open sessions just drop."""
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""
