"""The Streamlit pages and the modules they share.

- ``views/``: one script per page, routed by ``st.navigation`` in ``app.py``.
- ``sidebar``: the model and dataset pickers; the check that they load and fit.
- ``controls``: widget groups pages share, and the widgets' constants.
- ``session``: session defaults, settings as widget values, hand-off between pages, and
  the last run of each analysis page.
- ``query``: the URL query (parsed by qcore's flat-settings mapping, ``qcore.config``).
- ``cache``: every cached computation (the only ``st.cache_*``).
- ``progress``: background work with a progress bar.
- ``tables``: the result records, the per-layer table and the results download.
- ``figures``: plotly figure builders, plain functions without Streamlit.

Page scripts live in ``views/`` and not directly in ``pages/``: Streamlit treats every
``pages/*.py`` next to the entry script as a page of an old-style (v1) multipage app until
``st.navigation`` first runs in the process, and in that state a request for a page's URL
would run its script alone, without ``app.py`` (this also happens on every ``AppTest``
rerun). Modules here are never requested as pages, so they are safe.
"""
