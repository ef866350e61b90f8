"""Quantization Playground: the entry point. It sets the page up, draws the shared sidebar
and routes to the pages (``streamlit run app.py``)."""

import streamlit as st

from pages.query import show_query_warnings
from pages.session import init_session
from pages.sidebar import sidebar_pickers

st.set_page_config(page_title="Quantization Playground", page_icon="🎛️", layout="wide")

# One line per page; the first is the default.
PAGES = [
    st.Page("pages/views/playground.py", title="Playground", icon="🎚️", default=True),
    st.Page("pages/views/tradeoffs.py", title="Trade-offs", icon="📈"),
    st.Page("pages/views/sensitivity.py", title="Layer sensitivity", icon="🔬"),
    st.Page("pages/views/mixed.py", title="Mixed precision", icon="🧮"),
]

init_session()

st.title("Quantization Playground")
st.markdown(
    "A trained network stores each weight as a 32-bit float. **Quantization** stores it as a "
    "small integer code times a scale (fewer bits: a smaller model, coarser weights), "
    "**clipping** chooses the range those codes cover, and **pruning** sets the smallest "
    "weights to exactly zero. Pick a model, move the sliders and watch accuracy, size and the "
    "weights change. Accuracy is *simulated* (the rounded weights run in float arithmetic); "
    "sizes are the *packed* bytes of the file you can download."
)

show_query_warnings()

with st.sidebar:
    sidebar_pickers()

st.navigation(PAGES).run()
