"""The `agi-bitrix` command: serve, check, route, test, demo, oauth login, events."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from agi_bitrix import __version__
from agi_bitrix.checking import ConfigError, quoted
from agi_bitrix.config import Config, load_config, parse_listen

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_MISMATCH = 1


class _Parser(argparse.ArgumentParser):
    """Bad arguments are answered like a bad config: one line saying what is wrong, exit 2. (argparse
    prints the whole usage first; the line points to --help instead.) Subcommands' parsers are of
    this class too: add_subparsers makes them with the parser's own class."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def _listen_address(text: str) -> tuple[str, int]:
    """--listen HOST:PORT, checked as the parser reads it: a typo never reaches the event loop."""
    try:
        return parse_listen(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {quoted(text)}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {quoted(text)}")
    return seconds


def _record_file(text: str) -> str:
    """route --record FILE: a file that can be written where it is named, checked before the
    portal is asked (a traceback after the lookup would lose its explanation too)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{quoted(text)} is a folder; name the file to write")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{quoted(text)}: there is no folder {quoted(str(path.parent))}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="agi-bitrix",
        description="FastAGI server that routes incoming Asterisk calls to the Bitrix24 owner of the caller.",
    )
    parser.add_argument("--version", action="version", version=f"agi-bitrix {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the FastAGI server")
    serve.add_argument("-c", "--config", required=True, metavar="FILE")
    serve.add_argument("--listen", type=_listen_address, metavar="HOST:PORT",
                       help="override server.listen from the config")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    check = commands.add_parser("check", help="check a config file; exit 0 when it is valid")
    check.add_argument("-c", "--config", required=True, metavar="FILE")

    route = commands.add_parser("route", help="dry run: look a number up and explain the routing")
    route.add_argument("-c", "--config", required=True, metavar="FILE")
    route.add_argument("phone", metavar="PHONE")
    route.add_argument("--did", default="", metavar="NUMBER", help="the dialled number (DID)")
    route.add_argument("--record", type=_record_file, metavar="FILE",
                       help="save the portal's answer to FILE, for a case of `agi-bitrix test` (crm_file)")

    test = commands.add_parser("test", help="run example calls through the rules; exit 1 on a mismatch")
    test.add_argument("-c", "--config", required=True, metavar="FILE")
    test.add_argument("cases", metavar="CASES.yaml")

    oauth = commands.add_parser("oauth", help="an OAuth application's tokens")
    oauth_actions = oauth.add_subparsers(dest="oauth_action", required=True, metavar="ACTION")
    login = oauth_actions.add_parser(
        "login", help="get the application's first tokens through the browser and store them in the token file")
    login.add_argument("-c", "--config", required=True, metavar="FILE")
    login.add_argument("--listen", type=_port, metavar="PORT",
                       help="receive the portal's redirect on 127.0.0.1:PORT (the application's handler path must"
                            " be http://127.0.0.1:PORT/...); without it, paste the redirect's address")
    login.add_argument("--wait", type=_seconds, default=300.0, metavar="SECONDS",
                       help="how long to wait for the redirect (default 300)")

    _add_events(commands)
    lines = commands.add_parser("lines", help="the configured lines as Bitrix24 external lines")
    lines_actions = lines.add_subparsers(dest="lines_action", required=True, metavar="ACTION")
    lines_sync = lines_actions.add_parser(
        "sync", help="add the missing lines to the portal and rename the changed ones (never deletes); exit 1 on a"
                     " failure")
    lines_sync.add_argument("-c", "--config", required=True, metavar="FILE")

    demo = commands.add_parser(
        "demo", help="run the server against a built-in Bitrix24 emulator with sample CRM data")
    demo.add_argument("--listen", type=_listen_address, default="127.0.0.1:4573", metavar="HOST:PORT")
    demo.add_argument("--once", action="store_true", help="show the sample calls and exit")
    return parser


def _add_events(commands: argparse._SubParsersAction[_Parser]) -> None:
    events = commands.add_parser("events",
                                 help="click-to-call's events from Bitrix24: subscribe, or see the subscription")
    events_actions = events.add_subparsers(dest="events_action", required=True, metavar="ACTION")
    for action, text in (("bind", "subscribe to ONEXTERNALCALLSTART and ONEXTERNALCALLBACKSTART in events.mode"),
                         ("status", "whether the portal sends those events the way events.mode needs; exit 1 if not")):
        events_actions.add_parser(action, help=text).add_argument("-c", "--config", required=True, metavar="FILE")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    if args.command == "serve":
        return _serve(args)
    if args.command == "route":
        return _route(args)
    if args.command == "test":
        return _test(args)
    if args.command == "oauth":
        return _oauth_login(args)
    if args.command == "events":
        return _events(args)
    if args.command == "lines":
        return _lines_sync(args.config)
    if args.command == "demo":
        from agi_bitrix.demo import run_demo

        host, port = args.listen
        return asyncio.run(run_demo(host, port, once=args.once))
    raise AssertionError(args.command)


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: {error.count} problem(s); nothing was started", file=sys.stderr)
        return None


def _check(path: str) -> int:
    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    print(f"{path}: OK ({len(config.policy.rules)} rules, fallback queue {config.policy.fallback_queue},"
          f" listen {config.server.host}:{config.server.port})")
    for note in config.deprecated:
        print(f"warning: {note}", file=sys.stderr)
    if config.bitrix.is_placeholder:
        print(f"{path}: note: bitrix.webhook_url is still the shipped example; set yours there or in"
              " AGI_BITRIX_WEBHOOK_URL", file=sys.stderr)
    _check_auth(path, config)
    _check_users(path, config)
    _check_events(path, config)
    _check_lines(path, config)
    if config.clicktocall.enabled:
        from agi_bitrix.dialpolicy import describe, dial_policy

        policy = dial_policy(config.clicktocall, config.policy.default_country)
        print(f"{path}: click-to-call: rings {config.clicktocall.channel}, then {describe(policy)}")
    return EXIT_OK


def _check_events(path: str, config: Config) -> None:
    events = config.events
    if events.mode == "handler":
        print(f"{path}: events: handler on {events.handler_path}, the portal POSTs to {events.public_url}"
              f" (`agi-bitrix events status -c {path}` asks the portal whether it is subscribed)")
    elif events.mode == "offline":
        print(f"{path}: events: offline, the portal's queue polled every {events.poll_interval:g} s"
              f" (`agi-bitrix events status -c {path}` asks the portal whether it is subscribed)")
    else:
        print(f"{path}: events: off (no click-to-call)")


def _events(args: argparse.Namespace) -> int:
    from agi_bitrix.eventscli import events_command

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if config.events.mode == "off":
        print(f"agi-bitrix events: events.mode is off in {args.config}; set handler or offline", file=sys.stderr)
        return EXIT_CONFIG
    complete = asyncio.run(events_command(config, args.events_action, out=sys.stdout, err=sys.stderr))
    return EXIT_OK if complete else EXIT_MISMATCH


def _check_auth(path: str, config: Config) -> None:
    """Which credentials the server will use, and whether the call card can rely on them."""
    from agi_bitrix.bitrix.oauth import OAUTH_DOCS, TokenFile

    oauth = config.bitrix.oauth
    if oauth is None:
        print(f"{path}: auth: inbound webhook")
        if config.callcard.enabled:
            print(f"{path}: warning: the call card uses telephony.externalcall.register and .finish, which Bitrix24's"
                  " REST docs say work only in the context of an application (through a webhook the portal may"
                  f" answer WRONG_AUTH_TYPE); use a local application in bitrix.oauth: {OAUTH_DOCS}", file=sys.stderr)
        return
    present = TokenFile(oauth.token_file).load_if_present() is not None
    print(f"{path}: auth: OAuth application {oauth.client_id}, token file {oauth.token_file}"
          f" {'present' if present else 'missing'}")
    if not present:
        print(f"{path}: note: no tokens in {oauth.token_file} yet; run `agi-bitrix oauth login -c {path}`",
              file=sys.stderr)


def _check_users(path: str, config: Config) -> None:
    """Whether routing will skip deactivated owners (their calls must not ring a fired owner's mobile)."""
    from agi_bitrix.bitrix.oauth import TokenFile

    if not config.users.automatic:
        state = "skipped (users section)" if config.users.refresh > 0 else "NOT skipped (users.refresh is 0)"
        print(f"{path}: deactivated owners: {state}")
        return
    oauth = config.bitrix.oauth
    saved = TokenFile(oauth.token_file).load_if_present() if oauth is not None else None
    scopes = saved.scope.replace(" ", ",").split(",") if saved is not None else []
    if not any(scopes):
        print(f"{path}: note: deactivated owners: skipped only if the credentials carry the user scope, which"
              " cannot be known here; serve asks the portal's scope method at start and says so in /healthz"
              " (users.deactivated_owners)", file=sys.stderr)
    elif "user" in scopes:
        print(f"{path}: deactivated owners: skipped (the token file's scopes include user)")
    else:
        print(f"{path}: warning: deactivated owners are NOT skipped: the token file's scopes lack user, so a"
              " fired owner's calls still ring his phones; add the user scope to the application and run"
              " `agi-bitrix oauth login` again", file=sys.stderr)


def _check_lines(path: str, config: Config) -> None:
    """The lines' sync needs an application: say so before `serve` finds out."""
    from agi_bitrix.bitrix.lines import WEBHOOK_REFUSAL

    if config.lines and config.bitrix.oauth is None:
        print(f"{path}: warning: lines: {WEBHOOK_REFUSAL}", file=sys.stderr)


def _lines_sync(path: str) -> int:
    from agi_bitrix.bitrix.lines import WEBHOOK_REFUSAL, sync_once

    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    if not config.lines:
        print(f"{path}: no lines configured; nothing to sync")
        return EXIT_OK
    _check_lines(path, config)
    result = asyncio.run(sync_once(config.bitrix, config.lines, config.policy.default_country))
    for change in result.changes:
        print(f"{path}: lines: {change}")
    if result.wrong_auth_type:
        print(f"{path}: error: lines: {WEBHOOK_REFUSAL}", file=sys.stderr)
    print(f"{path}: lines: {result.summary(len(config.lines))}", file=sys.stdout if result.ok else sys.stderr)
    return EXIT_OK if result.ok else EXIT_MISMATCH


def _oauth_login(args: argparse.Namespace) -> int:
    from agi_bitrix.oauthlogin import login

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return asyncio.run(login(config, listen_port=args.listen, wait=args.wait, stdin=sys.stdin, out=sys.stdout,
                             err=sys.stderr))


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    for note in config.deprecated:
        logging.getLogger("agi_bitrix").warning("%s", note)
    host, port = args.listen or (config.server.host, config.server.port)
    _raise_open_files_limit()
    return asyncio.run(_run_server(config, host, port))


def _raise_open_files_limit() -> None:
    """Each session is a socket; the usual soft limit of 1024 files is below server.max_sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _run_server(config: Config, host: str, port: int) -> int:
    from agi_bitrix.app import Application, until_stopped
    from agi_bitrix.callcard.outbox import OutboxInUse

    log = logging.getLogger("agi_bitrix")
    app = Application(config)
    try:
        await app.start(host, port)
    except OutboxInUse as error:  # an outbox that cannot be used otherwise only takes the call card down
        log.error("%s; nothing was started", error)
        return 1
    except OSError as error:
        log.error("cannot listen on %s:%s: %s", host, port, error.strerror)
        return 1
    await until_stopped(on_sighup=app.reload_soon)
    log.info("stopping: no new calls; finishing the calls in flight")
    await app.stop()
    log.info("stopped")
    return 0


def _route(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from agi_bitrix.explain import explain_call

    try:
        print(asyncio.run(explain_call(config, args.phone, args.did, record=args.record)))
    except OSError as error:
        if args.record is None or error.filename != args.record:
            raise
        print(f"agi-bitrix route: --record: cannot write {args.record}: {error.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _test(args: argparse.Namespace) -> int:
    from agi_bitrix.ruletest import load_cases, report, run_cases

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        cases = load_cases(args.cases, config)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    outcomes = asyncio.run(run_cases(cases, config))
    print(report(outcomes, args.cases))
    return EXIT_OK if all(o.passed for o in outcomes) else EXIT_MISMATCH
