"""Deploy: the Playground's setting as a real int8 model. The ONNX file (QDQ form), which
layers ONNX Runtime runs with integer kernels, and on request accuracy and latency of float
PyTorch, float ONNX Runtime, the simulation and the int8 file side by side."""

import streamlit as st

from pages import cache, tables
from pages.query import sync_query
from pages.session import last_run, playground_settings
from pages.sidebar import require_model_and_dataset

st.title("Deploy")
model, data = require_model_and_dataset()
sync_query({})
settings = playground_settings(cache.layer_names(model))
label = settings.wa_label()
st.caption(
    f"Every accuracy the Playground shows is simulated: the rounded weights run in float "
    f"arithmetic. Here its setting (**{label}**) is written as an ONNX file in QDQ form "
    "(QuantizeLinear/DequantizeLinear with qcore's own codes, scales and zero points) and "
    f"run by ONNX Runtime on {data.name}'s test split, where 8-bit layers with 8-bit inputs "
    "run integer kernels. Other widths have no integer kernel: they are written as float "
    "fake-quant values and named below."
)

try:
    f = cache.onnx_file(model, data, settings)
except ValueError as e:
    st.error(str(e))
    st.stop()

e = f.export
total = len(e.integer_layers) + len(e.fake_quant_layers)
if e.integer_layers:
    st.markdown(f"**{len(e.integer_layers)} of {total} layers run ONNX Runtime integer kernels: "
                f"{', '.join(e.integer_layers)}.**")  # fmt: skip
else:
    st.markdown(f"**No layer of {total} runs an integer kernel in this setting.**")
if e.reasons:
    st.markdown("\n".join(f"- `{n}`: {why}" for n, why in e.reasons.items()))
if settings.abits is None:
    st.info(
        "Activations are float32 in this setting, so every layer runs in float arithmetic. "
        "Set **Activations** to 8 bits (and the weights to 8 bits) in the Playground for "
        "integer kernels.",
        icon=":material/info:",
    )
st.download_button(
    f"Download the ONNX file ({e.size_bytes:,} bytes)",
    data=f.data,
    file_name=f"{model.name}-{label}.onnx",
    mime="application/octet-stream",
    on_click="ignore",
    key="download_onnx",
    icon=":material/download:",
    help="Open it in Netron (netron.app) to see the graph with its quantize and dequantize "
    "pairs.",
)

run = st.button("Measure accuracy and latency", key="deploy_run", type="primary",
                help="Evaluates four runtimes on the test split and times each at batch 1 "
                "and 256: a few seconds to a minute.")  # fmt: skip
choice = last_run(
    "deploy_last", model, data, settings, run=run,
    prompt=f"Press **Measure accuracy and latency** to run {model.name} ({label}) in PyTorch "
    "and ONNX Runtime.",
    stale="The table below is of an earlier setting; press **Measure accuracy and latency** "
    "to measure this one.",
)  # fmt: skip
try:
    d = cache.run_deploy(model, data, choice)
except ValueError as err:
    st.error(str(err))
    st.stop()

st.dataframe(tables.deploy_frame(d), hide_index=True, key="deploy_table")
st.markdown(d.integer_sentence())
lat = d.rows[0].latency[0]
st.caption(
    f"Latency: wall-clock milliseconds of one forward pass, median and 90th percentile of "
    f"repeated runs, {lat.threads} thread(s), on this server's CPU while it serves other "
    f"requests. {d.cpu.sentence()}"
)
