"""A real Asterisk (22, and 20 LTS beside it) for the real-Asterisk tests and the Asterisk benchmark.

scripts/provision-asterisk.sh builds (once, then cached) a Debian sid root file system that
contains Debian's Asterisk 22; scripts/provision-asterisk20.sh adds a prebuilt Asterisk 20 under
/opt/asterisk20 in the same root. Here we give every test run its own configuration directory
inside that root, start the chosen Asterisk in it with chroot, and stop it again. Asterisk shares the machine's
loopback network, so it reaches FastAGI servers the tests start on 127.0.0.1, and the tests
reach its AMI port. An Asterisk given a resolver of its own (`resolv_conf`: a DNS server the test
runs, for hagi:// and its SRV records) sees it as /etc/resolv.conf through a bind mount in a mount
namespace of its own, so the root's file, shared by every Asterisk and every test run, is never
changed.

It works only from a source checkout of agi-bitrix (an editable install): the provisioning
script and asterisk-samples/ are not part of the installed package. Elsewhere it says so.
"""

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# The checkout this file lies in: agi_bitrix/testing/pbx_harness.py.
REPO = Path(__file__).resolve().parents[2]
PROVISION_SCRIPT = REPO / "scripts" / "provision-asterisk.sh"
PROVISION_20_SCRIPT = REPO / "scripts" / "provision-asterisk20.sh"
SAMPLES_DIR = REPO / "asterisk-samples"

# Only what the tests use. res_speech comes first: res_agi needs its symbols. Local channels,
# the manager (AMI) and MSet are built into Asterisk 20 and 22; app_queue is for the sample
# dialplan, func_version for its choice of Queue() arguments, func_db and app_playtones for the
# FreePBX stand-ins, app_playback and format_sln for the callback sample's announcement (a file the
# test writes: Asterisk 20's build has no sounds).
MODULES = (
    "res_speech", "res_agi", "pbx_config", "app_verbose", "app_userevent", "app_dial",
    "app_queue", "app_stack", "app_exec", "func_callerid", "func_channel", "func_strings", "func_logic",
    "func_global", "func_base64", "func_timeout", "func_version", "func_db", "app_playtones", "res_clioriginate",
    "bridge_simple", "bridge_native_rtp", "bridge_builtin_features", "chan_bridge_media", "app_playback",
    "format_sln",
)


@dataclass(frozen=True)
class AsteriskBuild:
    """Where one Asterisk version lies inside the root (paths as seen in the chroot)."""
    name: str  # asterisk20, asterisk22: the tests' ids
    major: int
    binary: str
    modules: str
    data: str  # XML docs and sounds
    sbin: str
    how_to_get: str  # for the message when it is missing


ASTERISK_22 = AsteriskBuild(
    "asterisk22", 22, "/usr/sbin/asterisk", "/usr/lib/x86_64-linux-gnu/asterisk/modules", "/usr/share/asterisk",
    "/usr/sbin", f"{PROVISION_SCRIPT} provisions it (scripts/test runs it)")
# The prefix its tarball was built for (the RUNPATH of its libraries): /opt/asterisk20.
ASTERISK_20 = AsteriskBuild(
    "asterisk20", 20, "/opt/asterisk20/sbin/asterisk", "/opt/asterisk20/lib/asterisk/modules",
    "/opt/asterisk20/var/lib/asterisk", "/opt/asterisk20/sbin",
    f"scripts/test installs it from ../shared/asterisk/ with {PROVISION_20_SCRIPT}; without that folder, "
    "build it from an Asterisk 20 source tarball with scripts/build-asterisk20.sh")
BUILDS = (ASTERISK_20, ASTERISK_22)


def check_build(root: Path, build: AsteriskBuild) -> str:
    """The version `asterisk -V` prints for this build in the root; AsteriskUnavailable if it
    is not installed there or does not run."""
    if not (root / build.binary.lstrip("/")).exists():
        raise AsteriskUnavailable(f"Asterisk {build.major} is not installed in {root}: {build.how_to_get}")
    run = subprocess.run(["chroot", str(root), build.binary, "-V"], capture_output=True, text=True,
                         timeout=30, check=False)
    version = run.stdout.strip()
    if run.returncode != 0 or not version.startswith(f"Asterisk {build.major}."):
        raise AsteriskUnavailable(
            f"{build.binary} in {root} is not a working Asterisk {build.major}: {version}{run.stderr.strip()}")
    return version


class AsteriskUnavailable(Exception):
    """Asterisk could not be provisioned or started here; the message says why."""


def _from_checkout(path: Path) -> Path:
    if not path.exists():
        raise AsteriskUnavailable(
            f"{path} is missing: the Asterisk harness runs only from a source checkout of agi-bitrix"
            " (pip install -e .), not from an installed package")
    return path


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def provision_root() -> Path:
    """Runs the provisioning script (fast when the cached root is fine); returns the root."""
    if os.geteuid() != 0:
        raise AsteriskUnavailable("the Asterisk tests need root (Asterisk runs in a chroot)")
    for tool in ("chroot", "flock"):
        if shutil.which(tool) is None:
            raise AsteriskUnavailable(f"'{tool}' is not installed")
    try:
        run = subprocess.run([str(_from_checkout(PROVISION_SCRIPT))], capture_output=True, text=True,
                             timeout=1200, check=False)
    except subprocess.TimeoutExpired:
        raise AsteriskUnavailable(f"{PROVISION_SCRIPT} did not finish within 20 minutes") from None
    if run.returncode != 0:
        last_lines = "\n".join(run.stderr.strip().splitlines()[-12:])
        raise AsteriskUnavailable(f"{PROVISION_SCRIPT} failed (exit {run.returncode}):\n{last_lines}")
    print(run.stderr, end="")
    return Path(run.stdout.strip().splitlines()[-1])


class AsteriskPbx:
    """One Asterisk process with a configuration of its own inside the provisioned root."""

    def __init__(self, root: Path, name: str, build: AsteriskBuild = ASTERISK_22, resolv_conf: str | None = None):
        """`resolv_conf`: the text of the /etc/resolv.conf this Asterisk sees (default: the root's)."""
        self.root = root
        self.build = build
        self.resolv_conf = resolv_conf
        # Paths as Asterisk sees them (inside the chroot) and as the tests see them.
        self.home = f"/tmp/agi-bitrix-test-{os.getpid()}-{name}-{build.name}"
        self.host_home = root / self.home.lstrip("/")
        self.ami_port = free_tcp_port()
        self.ami_username = "agi-bitrix-test"
        self.ami_secret = secrets.token_hex(12)
        # A second AMI user with only what the server's own calls need (docs/ami.md): Originate to
        # a context, and the call events its outcome comes in.
        self.ami_originate_username = "agi-bitrix-originate"
        self.ami_originate_secret = secrets.token_hex(12)
        self.process: subprocess.Popen | None = None

    @property
    def etc(self) -> Path:
        return self.host_home / "etc"

    def write_config(self, extensions: str, queues: str = "") -> None:
        """Writes asterisk.conf & co.; extensions.conf and queues.conf come from the caller.

        The sample dialplans are copied unchanged to etc/asterisk-samples/, so that the
        caller's extensions.conf can #include them as they are shipped."""
        if self.host_home.exists():
            shutil.rmtree(self.host_home)
        for sub in ("etc", "run", "log", "lib", "spool", "db", "keys"):
            (self.host_home / sub).mkdir(parents=True)
        shutil.copytree(_from_checkout(SAMPLES_DIR), self.etc / "asterisk-samples")
        home = self.home
        files = {
            "asterisk.conf": f"""\
[directories]
astetcdir => {home}/etc
astmoddir => {self.build.modules}
astvarlibdir => {home}/lib
astdbdir => {home}/db
astkeydir => {home}/keys
astdatadir => {self.build.data}
astagidir => {home}/lib
astspooldir => {home}/spool
astrundir => {home}/run
astlogdir => {home}/log
astcachedir => {home}/lib
astsbindir => {self.build.sbin}
[options]
documentation_language = en_US
""",
            "modules.conf": "[modules]\nautoload = no\n"
                            + "".join(f"load => {name}.so\n" for name in MODULES),
            "logger.conf": "[general]\n[logfiles]\nmessages.log => notice,warning,error,verbose(3)\n",
            # channelvars: every channel event (UserEvent, QueueCallerJoin, ...) names the
            # test call it belongs to.
            "manager.conf": f"""\
[general]
enabled = yes
bindaddr = 127.0.0.1
port = {self.ami_port}
channelvars = TEST_CALL_ID
""" + _manager_user(self.ami_username, self.ami_secret, read="all", write="all")
                + _manager_user(self.ami_originate_username, self.ami_originate_secret, read="call",
                                write="originate", extra="displayconnects = no\n"),
            "extensions.conf": extensions,
            # Asterisk 20's app_queue declines to load without a [general] section.
            "queues.conf": queues or "[general]\n",
        }
        for name, text in files.items():
            (self.etc / name).write_text(text)
        if self.resolv_conf is not None:
            (self.host_home / "resolv.conf").write_text(self.resolv_conf)

    def _asterisk(self, *args: str) -> list[str]:
        return ["chroot", str(self.root), self.build.binary, "-C", f"{self.home}/etc/asterisk.conf", *args]

    def cli(self, command: str, timeout: float = 30) -> str:
        """Runs one CLI command through Asterisk's control socket; returns its output."""
        run = subprocess.run(self._asterisk("-rx", command), capture_output=True, text=True,
                             timeout=timeout, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"asterisk -rx {command!r} failed: {run.stdout}{run.stderr}")
        return run.stdout

    def _own_resolver(self, command: list[str]) -> list[str]:
        """`command` in a private mount namespace where the root's /etc/resolv.conf is this
        Asterisk's own file: the bind mount dies with the process, and nothing else sees it."""
        target = self.root / "etc" / "resolv.conf"
        if target.is_symlink() or not target.is_file():
            raise AsteriskUnavailable(f"{target} is not a plain file: cannot give this Asterisk a resolver of its own")
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                str(self.host_home / "resolv.conf"), str(target), *command]

    def start(self, timeout: float = 60) -> None:
        command = self._asterisk("-f", "-n")
        if self.resolv_conf is not None:
            command = self._own_resolver(command)
        with open(self.host_home / "log" / "stdout.log", "wb") as out:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        # The control socket appears a moment after start; until then -rx fails.
        while True:
            if self.process.poll() is not None:
                raise AsteriskUnavailable(
                    f"Asterisk exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.cli("core waitfullybooted", timeout=max(1.0, deadline - time.monotonic()))
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    self.stop()
                    raise AsteriskUnavailable(
                        f"Asterisk did not boot within {timeout} s:\n{self.log_tail()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Stops Asterisk (gracefully, then by force) and removes its configuration."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.cli("core stop now", timeout=10)
                self.process.wait(timeout=10)
            except (RuntimeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        shutil.rmtree(self.host_home, ignore_errors=True)

    def kill(self) -> None:
        """Kills Asterisk at once (SIGKILL), keeping its configuration: start() brings it back
        on the same ports, as a crashed and restarted Asterisk."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 80) -> str:
        text = ""
        for name in ("stdout.log", "messages.log"):
            path = self.host_home / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                text += f"--- {name} ---\n" + "\n".join(tail) + "\n"
        return text


def _manager_user(name: str, secret: str, *, read: str, write: str, extra: str = "") -> str:
    """One [user] of manager.conf, reachable from this host only."""
    return (f"\n[{name}]\nsecret = {secret}\ndeny = 0.0.0.0/0.0.0.0\npermit = 127.0.0.1/255.255.255.255\n"
            f"read = {read}\nwrite = {write}\n{extra}")
