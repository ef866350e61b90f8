"""Sign-in for a hosted app: Streamlit's own OpenID Connect (``st.login``, ``st.user``,
``st.logout``) and an allow-list, both read from the secrets file.

Off unless the secrets have an ``[auth]`` section (``make app`` needs none). With it, a
viewer who is signed out sees only a sign-in button; a signed-in viewer whose e-mail is not
on the ``[access]`` allow-list (``allowed_emails``, ``allowed_domains``) sees one sentence
and a sign-out button. See ``.streamlit/secrets.example.toml``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import streamlit as st

SIGN_IN = "Sign in"
SIGN_OUT = "Sign out"
REQUIRE_ENV = "QP_REQUIRE_SIGN_IN"  # set (1/true/yes/on) in the container: no [auth], no app
REFUSED = "is not on this app's allow-list; ask whoever runs it to add you."


def _section(name: str) -> Mapping[str, Any]:
    """A section of the secrets (``{}`` when there is no secrets file or no such section)."""
    try:
        section = st.secrets.get(name)
    except FileNotFoundError:  # no secrets file at all: sign-in is off
        return {}
    return section if isinstance(section, Mapping) else {}


def _strings(value: object, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"[access] {name} is a list of strings, e.g. {name} = [\"...\"].")
    return [str(v).strip().lower() for v in value]


def allowed(email: object, allowed_emails: object = None, allowed_domains: object = None,
            email_verified: object = True) -> bool:  # fmt: skip
    """Whether a signed-in ``email`` may use the app: listed in ``allowed_emails``, or its
    domain (after the last ``@``, exactly: not its subdomains) in ``allowed_domains``;
    case-insensitive. Both lists empty lets every signed-in user in; an e-mail the provider
    marks unverified (``email_verified`` false) or no e-mail is refused.

    >>> allowed("Alice@Team.Example", allowed_domains=["team.example"])
    True
    >>> allowed("mallory@other.example", ["bob@other.example"], ["team.example"])
    False
    >>> allowed("eve@evil.team.example", allowed_domains=["team.example"])
    False
    """
    emails = _strings(allowed_emails, "allowed_emails")
    domains = [d.lstrip("@") for d in _strings(allowed_domains, "allowed_domains")]
    if not isinstance(email, str) or "@" not in email or email_verified is False:
        return False
    email = email.strip().lower()
    if not emails and not domains:
        return True
    return email in emails or email.rsplit("@", 1)[1] in domains


def require_access() -> None:
    """Stop this run unless the viewer may see the app (a no-op when sign-in is off)."""
    if not _section("auth"):
        if os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            st.error(
                "This server requires sign-in but its secrets have no [auth] section: mount a "
                "secrets file (see .streamlit/secrets.example.toml) and restart it."
            )
            st.stop()
        return
    if not st.user.is_logged_in:
        st.title("Quantization Playground")
        st.write("This Quantization Playground is for its team: sign in to use it.")
        st.button(SIGN_IN, on_click=st.login, type="primary", key="sign_in")
        st.stop()
    access = _section("access")
    email = st.user.get("email")
    try:
        ok = allowed(email, access.get("allowed_emails"), access.get("allowed_domains"),
                     st.user.get("email_verified", True))  # fmt: skip
    except ValueError as e:  # a malformed allow-list keeps everyone out, with the reason
        st.error(f"This app's allow-list cannot be read: {e}")
        ok = False
    if not ok:
        who = email if isinstance(email, str) and email else "This account"
        st.write(f"{who} {REFUSED}")
        st.button(SIGN_OUT, on_click=st.logout, key="sign_out")
        st.stop()
    with st.sidebar:
        st.caption(f"Signed in as {email}")
        st.button(SIGN_OUT, on_click=st.logout, key="sign_out")
