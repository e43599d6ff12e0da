"""The install callback's refusals are counted with a bounded reason, not only logged.

The callback (agi_bitrix/bitrix/install.py) knows no metrics: it reports each refusal to the
`count_refusal` callable it is given; the Application passes `Metrics.count_install_refused`. The
portal and its token server are the emulator's (agi_bitrix/testing/portal_oauth.py).
"""

from __future__ import annotations

from agi_bitrix.bitrix.install import INSTALL_REFUSALS, InstallCallback
from agi_bitrix.monitoring import Metrics
from tests.test_oauth import client, emulator, logged_in, oauth_portal, session  # noqa: F401  (fixtures)

PEER = "203.0.113.9"


async def test_each_refused_install_is_reported_once_with_its_reason(oauth_portal, session, tmp_path):  # noqa: F811
    token_path = tmp_path / "oauth.json"  # no token file yet: the first install
    portal = client(oauth_portal, token_path, session)
    refused: list[str] = []
    # A clock that stands still: the allowance of portal questions is not refilled during the test.
    callback = InstallCallback(lambda: portal, session, clock=lambda: 1000.0, count_refusal=refused.append)

    async def answer(form: dict[str, str]) -> int:
        return (await callback.handle(form, PEER))[0]

    genuine = oauth_portal.install_event()
    without_proof = {key: value for key, value in genuine.items() if "application_token" not in key}
    assert await answer({"auth[domain]": "portal.example"}) == 400
    assert await answer(without_proof) == 400
    assert await answer({**genuine, "auth[client_endpoint]": "https://evil.example/rest/"}) == 403
    assert await answer({**genuine, "auth[access_token]": "access-planted-secret"}) == 403
    assert await answer(oauth_portal.install_event(client_id="local.0ther0app000.87654321")) == 403
    assert refused == ["no_tokens", "no_application_token", "other_portal", "portal_rejected_token",
                       "other_application"]
    assert await answer(genuine) == 200 and len(refused) == 5  # a success is no refusal
    later = oauth_portal.install_event()
    assert await answer({**later, "auth[application_token]": "0" * 32}) == 403
    logged_in(oauth_portal, token_path)  # a token file without application_token, as `oauth login` writes
    assert await answer(later) == 403
    token_path.unlink()
    # Three questions to the portal were asked above (planted, another application's, genuine): spent.
    assert await answer(oauth_portal.install_event()) == 429
    assert refused[5:] == ["application_token_mismatch", "tokens_already_stored", "allowance_spent"]
    assert set(refused) <= set(INSTALL_REFUSALS)


def test_metrics_count_install_refusals_by_reason():
    metrics = Metrics()
    metrics.count_install_refused("allowance_spent")
    metrics.count_install_refused("allowance_spent")
    metrics.count_install_refused("other_portal")
    lines = metrics.exposition().decode().splitlines()
    assert 'agi_bitrix_install_refused_total{reason="allowance_spent"} 2.0' in lines
    assert 'agi_bitrix_install_refused_total{reason="other_portal"} 1.0' in lines

