"""`agi-bitrix oauth login`: a local application's first tokens, by the full OAuth protocol.

As bitrix24/b24restdocs describe it (settings/oauth/index.md; settings/app-installation/local-apps/
installation-callback.md, "Obtaining the first token pair via full OAuth"): the admin opens
https://PORTAL/oauth/authorize/?client_id=...&state=... in a browser; the portal sends the browser
to the application's handler path (its redirect URI) with `code` and `state`; the code works once
and for 30 seconds, so it is exchanged at once at the token server (grant_type=authorization_code)
for the pair that goes into the token file. The redirect arrives either on a listener on
127.0.0.1 (the browser runs on this machine and the handler path is http://127.0.0.1:PORT/...) or
as the address pasted from the browser.

Nothing printed here holds a token or the client secret.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from dataclasses import replace
from typing import TextIO
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web

from agi_bitrix.bitrix.client import make_session
from agi_bitrix.bitrix.errors import BitrixError, OAuthClientRejected, OAuthCodeRejected, TokenFileError
from agi_bitrix.bitrix.oauth import LOCK_SLACK, OAUTH_DOCS, authorize_url, request_tokens, same_portal
from agi_bitrix.bitrix.tokenfile import TokenFile, Tokens
from agi_bitrix.config import Config

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class LoginFailed(Exception):
    """Why no tokens were stored, in words for the admin."""


async def login(config: Config, *, listen_port: int | None, wait: float, stdin: TextIO, out: TextIO,
                err: TextIO) -> int:
    oauth = config.bitrix.oauth
    if oauth is None:
        print(f"{config.path}: bitrix.oauth is not set; `oauth login` is for an OAuth application"
              f" ({OAUTH_DOCS})", file=err)
        return EXIT_CONFIG
    state = secrets.token_urlsafe(16)
    print("1. Open this address in a browser where you are logged in to the portal as an administrator:",
          file=out)
    print(f"   {authorize_url(oauth, state)}", file=out)
    try:
        if listen_port is not None:
            redirect = await _receive(listen_port, wait, out)
        else:
            print("2. The portal then sends the browser to the application's handler path. Copy the whole address"
                  " from the browser's address bar (it holds code= and state=) and paste it here, within 30"
                  " seconds:", file=out, flush=True)
            redirect = await _read_pasted(stdin, wait)
        code = _check(redirect, state)
        async with make_session() as session:
            tokens = await request_tokens(oauth, session, {"grant_type": "authorization_code", "code": code})
        tokens = await _save(TokenFile(oauth.token_file), tokens)
    except LoginFailed as error:
        print(f"oauth login: {error}; nothing was stored", file=err)
        return EXIT_FAILED
    except BitrixError as error:
        print(f"oauth login: {_explain(error)}; nothing was stored", file=err)
        return EXIT_FAILED
    _report(config, tokens, redirect, out, err)
    return EXIT_OK


async def _save(token_file: TokenFile, tokens: Tokens) -> Tokens:
    """Write the new pair in turn with a running server's refreshes (the file's lock)."""
    try:
        async with token_file.locked(wait=10.0 + LOCK_SLACK):
            previous = token_file.load_if_present()
            # The install event's application_token stays: it still proves the portal's later calls.
            tokens = replace(tokens, application_token=previous.application_token if previous else "")
            token_file.save(tokens)
    except TokenFileError as error:
        raise LoginFailed(error.detail) from None
    except OSError as error:
        raise LoginFailed(f"cannot write {token_file.path}: {error.strerror}") from None
    return tokens


async def _receive(port: int, wait: float, out: TextIO) -> dict[str, str]:
    """The redirect's query, from the browser on this machine, at any path of 127.0.0.1:PORT."""
    arrived: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    async def redirect(request: web.Request) -> web.Response:
        if "code" not in request.query:
            return web.Response(status=404, text="agi-bitrix oauth login: waiting for the portal's redirect")
        if not arrived.done():
            arrived.set_result(dict(request.query))
        return web.Response(text="agi-bitrix oauth login: the portal's answer arrived; you can close this tab."
                            " The terminal says how it went.")

    app = web.Application()
    app.router.add_get("/{path:.*}", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
        except OSError as error:
            raise LoginFailed(f"cannot listen on 127.0.0.1:{port}: {error.strerror}") from None
        print(f"2. The portal then sends the browser to the application's handler path, which must be"
              f" http://127.0.0.1:{port}/ (any path) on this machine. Waiting up to {wait:g} s...",
              file=out, flush=True)
        try:
            return await asyncio.wait_for(arrived, wait)
        except TimeoutError:
            raise LoginFailed(f"no redirect arrived on 127.0.0.1:{port} within {wait:g} s") from None
    finally:
        await runner.cleanup()


async def _read_pasted(stdin: TextIO, wait: float) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    try:
        line = await asyncio.wait_for(loop.run_in_executor(None, stdin.readline), wait)
    except TimeoutError:
        raise LoginFailed(f"nothing was pasted within {wait:g} s") from None
    text = line.strip()
    query = urlsplit(text).query if "://" in text else text.lstrip("?")
    return dict(parse_qsl(query, keep_blank_values=True))


def _check(redirect: dict[str, str], state: str) -> str:
    code = redirect.get("code", "")
    if not code:
        raise LoginFailed("the address holds no code= (paste the whole address the portal sent the browser to)")
    if not hmac.compare_digest(redirect.get("state", "").encode(), state.encode()):
        raise LoginFailed("the address's state= is not this login's: it belongs to another attempt; run the"
                          " command again and use the address it prints")
    return code


def _explain(error: BitrixError) -> str:
    if isinstance(error, OAuthCodeRejected):
        return (f"the token server refused the code ({error.detail}): a code works once and for 30 seconds;"
                " run the command again and paste the address at once")
    if isinstance(error, OAuthClientRejected):
        return (f"the token server refused the application ({error.detail}): check bitrix.oauth.client_id and"
                " client_secret, and that the application is installed on the portal")
    return f"no tokens from the token server: {error.reason}: {error.detail}"


def _report(config: Config, tokens: Tokens, redirect: dict[str, str], out: TextIO, err: TextIO) -> None:
    oauth = config.bitrix.oauth
    assert oauth is not None
    portal = redirect.get("domain") or urlsplit(tokens.client_endpoint).netloc or oauth.portal_url
    scopes = [scope for scope in tokens.scope.replace(" ", ",").split(",") if scope]
    print(f"Tokens for portal {portal} (member_id {tokens.member_id or '-'}, scopes {','.join(scopes) or '-'})"
          f" saved in {oauth.token_file} (mode 0600).", file=out)
    needed = ["telephony"] + (["user"] if config.users.refresh > 0 else [])
    missing = [scope for scope in needed if scope not in scopes]
    if missing:
        print(f"warning: the application lacks the scope(s) {', '.join(missing)}; add them in the application's"
              f" settings on the portal and run `agi-bitrix oauth login` again", file=err)
    if tokens.client_endpoint and not same_portal(tokens.client_endpoint, oauth.portal_url):
        print(f"warning: the token server names {tokens.client_endpoint} as the portal's REST address, but"
              f" bitrix.oauth.portal_url is {oauth.portal_url}; the server sends requests to portal_url",
              file=err)
    print("A running server takes them at its next refresh (or at once, if it had stopped on rejected tokens);"
          " `agi-bitrix route` uses them now.", file=out)
