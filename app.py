"""Quantization Playground: the entry point. It sets the page up, draws the shared sidebar
and routes to the pages (``streamlit run app.py``)."""

from pathlib import Path

import streamlit as st

from pages import jobs, timing
from pages.access import require_access
from pages.query import show_query_warnings
from pages.session import init_session
from pages.sidebar import data_panel, sidebar_pickers, upload_panel

INTRO = (
    "A trained network stores each weight as a 32-bit float. **Quantization** stores it as a "
    "small integer code times a scale (fewer bits: a smaller model, coarser weights), "
    "**clipping** chooses the range those codes cover, and **pruning** sets the smallest "
    "weights to exactly zero. Pick a model, move the sliders and watch accuracy, size and the "
    "weights change. Accuracy is *simulated* (the rounded weights run in float arithmetic); "
    "sizes are the *packed* bytes of the file you can download."
)

# The favicon is a file served by this app: a Material icon here would make every
# visitor's browser fetch it from fonts.gstatic.com (the pages' icons below are bundled).
FAVICON = str(Path(__file__).resolve().parent / "pages" / "favicon.png")
st.set_page_config(page_title="Quantization Playground", page_icon=FAVICON,
                   layout="wide")  # fmt: skip

# One line per page; the first is the default. Each analysis page draws its own heading;
# the Playground's (the app's name and what it is about) is drawn here, below.
PLAYGROUND = st.Page("pages/views/playground.py", title="Playground", icon=":material/tune:",
                     default=True)  # fmt: skip
PAGES = [
    PLAYGROUND,
    st.Page("pages/views/tradeoffs.py", title="Trade-offs", icon=":material/scatter_plot:"),
    st.Page("pages/views/sensitivity.py", title="Layer sensitivity",
            icon=":material/troubleshoot:"),  # fmt: skip
    st.Page("pages/views/debug.py", title="Debug", icon=":material/bug_report:"),
    st.Page("pages/views/mixed.py", title="Mixed precision",
            icon=":material/stacked_bar_chart:"),  # fmt: skip
    st.Page("pages/views/finetune.py", title="Fine-tune", icon=":material/model_training:"),
    st.Page("pages/views/deep.py", title="Deep Compression", icon=":material/compress:"),
    st.Page("pages/views/robustness.py", title="Robustness", icon=":material/shield:"),
    st.Page("pages/views/deploy.py", title="Deploy", icon=":material/rocket_launch:"),
]

# the pages whose run button starts a job (pages/worker.py TASKS)
JOB_PAGES = {"Trade-offs", "Layer sensitivity", "Mixed precision", "Fine-tune",
             "Deep Compression", "Robustness"}  # fmt: skip


def page_title(title: str) -> str:
    """The browser tab's title of a page: its own name first, then the app's."""
    return "Quantization Playground" if title == "Playground" else (
        f"{title} · Quantization Playground")


timing.start_run()  # off unless QP_TIMINGS is set (scripts/bench_browser.py)
require_access()  # sign-in and the allow-list, when the secrets have [auth]
init_session()

with st.sidebar:
    sidebar_pickers()
    data_panel()
    upload_panel()

page = st.navigation(PAGES, position="top")  # the sidebar: see .streamlit/config.toml
# each page's own browser-tab title (the first call above set the app's name for all)
st.set_page_config(page_title=page_title(page.title))
if page is PLAYGROUND:
    st.title("Quantization Playground")
    st.markdown(INTRO)
show_query_warnings()
if page.title in JOB_PAGES:
    jobs.pool()  # the job pool and its spare process start while the page is set up
try:
    page.run()
finally:
    timing.end_run(page.title)
