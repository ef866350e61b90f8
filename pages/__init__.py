"""The Streamlit pages and the modules they share.

- ``views/``: one script per page, routed by ``st.navigation`` in ``app.py``.
- ``sidebar``: the model and dataset pickers; the check that they load and fit.
- ``controls``: widget groups pages share, and the widgets' constants.
- ``session``: session defaults, settings as widget values, hand-off between pages, and
  the last run of each analysis page.
- ``query``: the URL query (parsed by qcore's flat-settings mapping, ``qcore.config``).
- ``cache``: every cached computation (the only ``st.cache_*``).
- ``progress``: background work with a progress bar.
- ``jobs``: the pool of job processes for the analysis pages; ``worker``: what runs in a
  job process (the tasks), free of Streamlit.
- ``tables``: the result records, the per-layer table and the results download.
- ``figures``: plotly figure builders, plain functions without Streamlit.
- ``compare``: the Playground's compare mode (setting A pinned beside the live B).
- ``tradeoffs``, ``sensitivity``, ``mixed``, ``finetune``, ``deep``, ``robustness``,
  ``deploy``, ``debug``: not pages and not helpers, but one line each that runs ``app.py``
  (:func:`run_app`), for the reason below.

Why those files. Streamlit (1.67) decides once per server process, when the first
session starts, whether the app is an old-style (v1) multipage app: it is when a
``pages/`` folder sits beside the entry script, as here. Until ``st.navigation`` has run
once in the process, every run goes through v1 routing instead of ``app.py``: the pages
are the entry script plus every ``pages/*.py`` (but ``__init__.py``), named by file, and a
URL naming none of them gets a "Page not found" notice before the entry script runs (even
with no ``.py`` file in ``pages/``). So the first visit after a server start through a link
such as ``/tradeoffs?model=mnist-cnn`` showed that notice over the right page. With a
``pages/tradeoffs.py`` the v1 routing finds the name, and that file runs ``app.py``, whose
``st.navigation`` routes to ``views/tradeoffs.py`` (and turns v1 routing off for good). No
user code runs before that first run, so the mode cannot be switched earlier.

The page scripts themselves stay in ``views/``: a v1 route runs its file alone, without
``app.py``'s session set-up and sidebar. The helper modules here are v1 routes too (to
nobody's benefit: ``/controls`` on a fresh server runs a module that only defines
functions, and shows a blank page); ``st.navigation`` forgets them after its first run.
During that first run v1 routing also sends its page list (every module here) to the
browser's sidebar navigation, which ``.streamlit/config.toml`` hides
(``client.showSidebarNavigation = false``); the app's own navigation is at the top
(``st.navigation(..., position="top")``), which that setting leaves alone.
"""

from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app.py"


def run_app() -> None:
    """Run the entry script ``app.py`` here (a v1 route hands over to ``st.navigation``)."""
    code = compile(APP.read_text(encoding="utf-8"), str(APP), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(APP)})
