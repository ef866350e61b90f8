"""Sign-in end to end: the app served with ``--secrets.files`` naming an ``[auth]`` section
that points at a local OpenID provider (``oidc-provider-mock`` on loopback, which signs in
whatever ``sub`` is typed and makes it the e-mail claim), driven in headless Chromium."""

from __future__ import annotations

import secrets

import pytest
from e2e import browser_page, require_chromium, serve_app, wait_idle

from pages.access import REFUSED

pytestmark = pytest.mark.browser

require_chromium()
oidc_provider_mock = pytest.importorskip("oidc_provider_mock")

ACCURACY = "Accuracy (simulated"


@pytest.fixture(scope="module")
def provider():
    with oidc_provider_mock.run_server_in_thread() as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture(scope="module")
def app_url(provider, tmp_path_factory):
    path = tmp_path_factory.mktemp("elsewhere") / "team-secrets.toml"
    path.write_text(
        "[auth]\n"
        'redirect_uri = "http://localhost:{port}/oauth2callback"\n'
        f'cookie_secret = "{secrets.token_hex(32)}"\n'
        'client_id = "playground"\n'
        'client_secret = "only-for-this-test"\n'
        f'server_metadata_url = "{provider}/.well-known/openid-configuration"\n'
        "[access]\n"
        'allowed_domains = ["team.example"]\n'
    )
    with serve_app(args=["--secrets.files", str(path)]) as url:
        # the identity cookie is set for the redirect_uri's host
        yield url.replace("127.0.0.1", "localhost")


def _sign_in(page, app_url: str, provider: str, email: str) -> None:
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{provider}/**", timeout=60_000)
    page.locator('input[name="sub"]').fill(email)
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(f"{app_url}/**", timeout=60_000)


def test_signed_out_sees_only_the_sign_in_button(app_url) -> None:
    with browser_page() as page:
        page.goto(app_url, wait_until="domcontentloaded")
        page.get_by_role("button", name="Sign in").wait_for(timeout=90_000)
        wait_idle(page)
        assert page.get_by_role("button").filter(visible=True).count() == 1
        assert page.get_by_text("sign in to use it").count() == 1
        assert page.locator('[data-testid="stMetric"]').count() == 0
        assert page.locator('input[type="range"]').count() == 0
        assert page.get_by_text("Playground", exact=True).count() == 0  # no navigation
        # a page's own link leads to the same door
        page.goto(f"{app_url}/tradeoffs", wait_until="domcontentloaded")
        page.get_by_role("button", name="Sign in").wait_for(timeout=60_000)
        wait_idle(page)
        assert page.get_by_role("button", name="Run sweep").count() == 0


def test_alice_on_the_allowed_domain_reaches_the_playground(app_url, provider) -> None:
    with browser_page() as page:
        _sign_in(page, app_url, provider, "alice@team.example")
        page.locator('[data-testid="stMetric"]', has_text=ACCURACY).wait_for(timeout=90_000)
        wait_idle(page)
        assert page.get_by_text("Signed in as alice@team.example").count() == 1
        assert page.locator('input[type="range"][aria-label="Bit width"]').count() == 1
        assert page.get_by_text(REFUSED).count() == 0


def test_mallory_elsewhere_is_refused_and_can_sign_out(app_url, provider) -> None:
    with browser_page() as page:
        _sign_in(page, app_url, provider, "mallory@other.example")
        page.get_by_text(f"mallory@other.example {REFUSED}").wait_for(timeout=90_000)
        page.get_by_role("button", name="Sign out").wait_for(timeout=30_000)
        wait_idle(page)
        assert page.get_by_role("button").filter(visible=True).count() == 1
        assert page.locator('[data-testid="stMetric"]').count() == 0
        assert page.locator('input[type="range"]').count() == 0
        # signing out ends the provider's session too (it asks to confirm), then comes back
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(f"{provider}/**", timeout=60_000)
        page.get_by_role("button", name="End session").click()
        page.get_by_role("button", name="Sign in").wait_for(timeout=60_000)
        assert page.get_by_text(REFUSED).count() == 0
