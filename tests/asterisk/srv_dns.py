"""A DNS server for hagi:// tests: Debian's dnsmasq (scripts/test installs it) answering the SRV
records `_agi._tcp.NAME` and their targets' addresses, and nothing else (no upstream, no hosts
file).

A resolv.conf cannot name a port, so it listens on port 53 of an address of its own in
127.0.0.0/8 (all of it is the loopback interface's on Linux), picked at random per run: two test
runs at once never answer each other's Asterisk. Binding port 53 needs root, as the Asterisk
tests do anyway.
"""

import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class DnsUnavailable(Exception):
    """dnsmasq is missing or would not start; the message says why."""


# Every SRV target is this name, which resolves to 127.0.0.1: the servers differ by port.
TARGET_HOST = "agi.agi-bitrix.test"


@dataclass(frozen=True)
class SrvTarget:
    port: int
    priority: int  # lower first
    weight: int  # share among targets of one priority


class SrvDns:
    def __init__(self, records: dict[str, list[SrvTarget]], logfile: Path):
        """`records`: for each NAME, the targets of `_agi._tcp.NAME`."""
        self.records = records
        self.logfile = logfile
        self.address = ""
        self.process: subprocess.Popen | None = None

    @property
    def resolv_conf(self) -> str:
        return f"nameserver {self.address}\noptions timeout:1 attempts:2\n"

    def start(self) -> "SrvDns":
        binary = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None)
        if binary is None:
            raise DnsUnavailable("dnsmasq is not installed (scripts/test installs Debian's dnsmasq-base)")
        records = [f"--srv-host=_agi._tcp.{name},{TARGET_HOST},{target.port},{target.priority},{target.weight}"
                   for name, targets in self.records.items() for target in targets]
        records.append(f"--host-record={TARGET_HOST},127.0.0.1")
        for _ in range(5):
            self.address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
            log = open(self.logfile, "wb")  # noqa: SIM115 -- closed in stop() with the process
            self.process = subprocess.Popen(
                [binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                 "--bind-interfaces", f"--listen-address={self.address}", "--port=53", "--pid-file=",
                 "--log-facility=-", "--log-queries", *records],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self._log = log
            # It binds before it logs "started"; a taken address makes it exit at once.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if b"started, version" in self.logfile.read_bytes():
                    return self
                time.sleep(0.05)
            self.stop()
        raise DnsUnavailable(f"dnsmasq did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                self.process.wait(timeout=10)
            self._log.close()
            self.process = None

    def queries(self, name: str) -> int:
        """SRV questions for `_agi._tcp.NAME` asked so far (dnsmasq logs each)."""
        return self.logfile.read_text(errors="replace").count(f"query[SRV] _agi._tcp.{name} ")

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")[-4000:] if self.logfile.exists() else ""
