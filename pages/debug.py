"""``/debug`` before ``st.navigation`` has run in this process: see ``pages/__init__.py``."""

from pages import run_app

run_app()
