"""Sign-in and the allow-list (pages/access.py): the rule, and the app through AppTest as a
signed-out, an allowed and a refused user (the browser test drives a real provider)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from pages.access import REFUSED, allowed

APP = str(Path(__file__).resolve().parent.parent / "app.py")
AUTH = {
    "redirect_uri": "http://localhost:{port}/oauth2callback",
    "cookie_secret": "x" * 32,
    "client_id": "playground",
    "client_secret": "not-a-secret",
    "server_metadata_url": "http://localhost:1/.well-known/openid-configuration",
}


@pytest.mark.parametrize(
    ("email", "emails", "domains", "expected"),
    [
        ("alice@team.example", None, ["team.example"], True),
        ("ALICE@Team.Example ", None, ["team.example"], True),  # case and spaces
        ("alice@team.example", None, ["@team.example"], True),  # a leading @ is forgiven
        ("eve@evil.team.example", None, ["team.example"], False),  # no subdomains
        ("eve@team.example.evil", None, ["team.example"], False),
        ("mallory@other.example", None, ["team.example"], False),
        ("bob@other.example", ["bob@other.example"], ["team.example"], True),
        ("bob@other.example", ["Bob@Other.Example"], None, True),
        ("bob2@other.example", ["bob@other.example"], None, False),
        ("anyone@anywhere.example", None, None, True),  # no lists: every signed-in user
        ("anyone@anywhere.example", [], [], True),
        (None, None, None, False),  # the provider gave no e-mail
        ("not-an-email", None, ["team.example"], False),
    ],
)
def test_allow_list(email, emails, domains, expected) -> None:
    assert allowed(email, emails, domains) is expected


def test_unverified_email_and_bad_lists() -> None:
    assert allowed("alice@team.example", None, ["team.example"], email_verified=False) is False
    assert allowed("alice@team.example", None, ["team.example"], email_verified=True) is True
    with pytest.raises(ValueError, match="allowed_domains is a list of strings"):
        allowed("alice@team.example", None, "team.example")


def _app(user: dict, access: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.secrets["auth"] = AUTH
    if access is not None:
        at.secrets["access"] = access
    at.user = user
    return at.run()


def _texts(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown]


def test_signed_out_sees_only_the_sign_in_button() -> None:
    at = _app({"is_logged_in": False})
    assert not at.exception
    assert [b.label for b in at.button] == ["Sign in"]
    assert not at.metric and not at.slider and not at.sidebar.selectbox
    assert "This Quantization Playground is for its team: sign in to use it." in _texts(at)


def test_refused_user_sees_one_sentence_and_sign_out() -> None:
    at = _app({"is_logged_in": True, "email": "mallory@other.example"},
              {"allowed_domains": ["team.example"]})  # fmt: skip
    assert not at.exception
    assert [b.label for b in at.button] == ["Sign out"]
    assert _texts(at) == [f"mallory@other.example {REFUSED}"]
    assert not at.metric and not at.slider and not at.sidebar.selectbox


def test_malformed_allow_list_keeps_everyone_out_with_the_reason() -> None:
    at = _app({"is_logged_in": True, "email": "alice@team.example"},
              {"allowed_domains": "team.example"})  # fmt: skip
    assert not at.exception
    assert [e.value for e in at.error] == [
        "This app's allow-list cannot be read: [access] allowed_domains is a list of "
        'strings, e.g. allowed_domains = ["..."].'
    ]
    assert [b.label for b in at.button] == ["Sign out"]
    assert not at.metric


def test_a_server_that_requires_sign_in_refuses_to_run_without_auth(monkeypatch) -> None:
    monkeypatch.setenv("QP_REQUIRE_SIGN_IN", "1")
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "This server requires sign-in but its secrets have no [auth] section: mount a "
        "secrets file (see .streamlit/secrets.example.toml) and restart it."
    ]
    assert not at.metric and not at.button and not at.sidebar.selectbox


def test_allowed_user_gets_the_app() -> None:
    at = _app({"is_logged_in": True, "email": "alice@team.example", "email_verified": True},
              {"allowed_domains": ["team.example"]})  # fmt: skip
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Quantization Playground"]
    assert at.metric[0].label == "Accuracy (simulated)"
    assert "Signed in as alice@team.example" in [c.value for c in at.sidebar.caption]
    assert "Sign out" in [b.label for b in at.sidebar.button]
