"""The Streamlit pages and the modules they share.

- ``views/``: one script per page, routed by ``st.navigation`` in ``app.py``.
- ``state``: cached loaders and results, session state, URL query (the only ``st.cache_*``).
- ``controls``: widget groups pages share.
- ``figures``: plotly figure builders, plain functions without Streamlit.

Page scripts live in ``views/`` and not directly in ``pages/``: Streamlit treats every
``pages/*.py`` next to the entry script as a page of an old-style (v1) multipage app until
``st.navigation`` first runs in the process, and in that state a request for a page's URL
would run its script alone, without ``app.py`` (this also happens on every ``AppTest``
rerun). Modules here are never requested as pages, so they are safe.
"""
