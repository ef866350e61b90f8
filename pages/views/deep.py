"""Deep Compression: prune + retrain, share weights + retrain centroids, Huffman code; the
bytes and the accuracy after each stage, next to the paper's published numbers."""

import streamlit as st

import qcore
from pages import cache, figures, jobs, tables
from pages.query import sync_query
from pages.session import last_run
from pages.sidebar import require_model_and_dataset

st.title("Deep Compression")
model, data = require_model_and_dataset()
sync_query({})
st.caption(
    "Han, Mao and Dally's three stages (ICLR 2016): prune the smallest weights and retrain "
    "the rest, share each layer's weights through a k-means codebook and retrain its "
    "centroids, then Huffman code the codes and the sparse index. Retraining runs on "
    f"the {data.name} train split (at most {cache.DEEP_MAX_TRAIN:,} images); accuracy is "
    "measured on its test split after each stage. Sizes are packed bytes, tables and "
    "codebooks included."
)

RECIPE = "recipe"  # the bits picker's first option: the paper's per-layer widths
rate_col, bits_col, epochs_col = st.columns(3)
recipe = rate_col.toggle(
    "The paper's per-layer pruning rates",
    value=True,
    key="dc_recipe",
    help="LeNet-300-100 (the paper's Table 2) keeps 8 %, 9 % and 26 % of its three layers' "
    "weights; our two-conv CNN gets LeNet-5's rates (Table 3); other models a rule after "
    "those tables (small layers keep more). Off: the one rate below for every layer.",
)
prune = rate_col.slider(
    "Pruning rate (every layer)", 0.0, 0.98, 0.9, 0.01, key="dc_prune", disabled=recipe,
    help="The share of each layer's weights set to zero, smallest magnitude first.",
)  # fmt: skip
bits = bits_col.select_slider(
    "Codebook bits", options=[RECIPE, 2, 3, 4, 5, 6, 7, 8], value=RECIPE, key="dc_bits",
    format_func=lambda b: "the paper's" if b == RECIPE else f"{b} bits",
    help="Each layer shares at most 2^bits distinct weight values (a k-means codebook). The "
    "paper's: 6 bits for LeNet-300-100; 8 for convolutions and 5 for fully connected "
    "layers in LeNet-5; other models 8 for convolutions, 6 for fully connected layers.",
)  # fmt: skip
epochs = epochs_col.slider(
    "Retraining epochs after pruning", 1, 10, qcore.deep.DEFAULT_EPOCHS, key="dc_epochs",
    help="Passes over the train split with the pruning masks fixed. The centroids are then "
    f"retrained for {qcore.deep.CENTROID_EPOCHS} epoch.",
)  # fmt: skip
choice = (None if recipe else float(prune), None if bits == RECIPE else int(bits), epochs)
run = st.button("Run Deep Compression", key="dc_run", type="primary")
prune_rate, codebook_bits, epochs = last_run(
    "deep_last", model, data, choice, run=run,
    prompt=f"Choose the recipe and press **Run Deep Compression** ({model.name} on {data.name}). "
    f"Retraining makes {epochs} + {qcore.deep.CENTROID_EPOCHS} passes over the train split.",
    stale="The results below are of the last run; press **Run Deep Compression** again.",
)  # fmt: skip
try:
    outcome = jobs.run_deep(model, data, prune_rate, codebook_bits, epochs, restart=run)
except ValueError as e:
    st.error(str(e))
    st.stop()
res = outcome.result

stages = res.stages
first, final = stages.iloc[0], stages.iloc[-1]
payload, file_bytes = outcome.size_bytes, outcome.file_bytes
acc_col, size_col, ratio_col = st.columns(3)
drop = round((final["accuracy"] - first["accuracy"]) * 100, 1)
acc_col.metric(
    "Accuracy after all stages (test split)",
    f"{final['accuracy']:.1%}",
    delta=f"{drop:+.1f} pts vs float" if drop else "same as float",
    delta_color="normal" if drop else "off",
    border=True,
    help=f"Top-1 on the test split; the float model gets {first['accuracy']:.2%}, the final "
    f"one {final['accuracy']:.2%}.",
)
size_col.metric(
    "Packed size",
    tables.format_bytes(payload),
    delta=f"from {tables.format_bytes(first['size_bytes'])} float32",
    delta_color="off",
    delta_arrow="off",
    border=True,
    help=f"{payload:,} bytes of payload; the file below adds a {file_bytes - payload:,}-byte "
    f"header ({file_bytes:,} bytes in all).",
)
ratio_col.metric(
    "Compression",
    f"{final['ratio']:.1f}x",
    border=True,
    help="float32 bytes / packed bytes, the paper's measure.",
)

st.plotly_chart(
    figures.deep_waterfall(stages, title=f"{model.name}: packed bytes after each stage"),
    key="deep_waterfall",
)
skipped = [r["label"] for _, r in stages.iterrows() if not r["applied"]]
if skipped:
    st.caption(
        f"Not applied: {', '.join(skipped)} (it would have made the file larger than the "
        "stage before, so that stage's form is kept)."
    )

paper_name = qcore.deep.paper_reference(cache.get_model(model))
paper_tables = "Tables 1 and 3" if paper_name == "LeNet-5" else "Tables 1 and 2"
st.subheader("Stage by stage, beside the paper")
st.markdown(
    f"**Ours**: {model.name} on {data.name} (accuracy on its {res.split} split). "
    f"**The paper's** {paper_name} on all of MNIST (Han et al. 2016, {paper_tables}), for "
    "reference."
)
st.dataframe(
    tables.deep_comparison(stages, qcore.deep.PAPER[paper_name]),
    hide_index=True,
    key="deep_stages_table",
    column_config={
        "stage": st.column_config.TextColumn("stage"),
        "kept": st.column_config.NumberColumn("weights kept", format="%.1f %%"),
        "size_bytes": st.column_config.NumberColumn("packed bytes", format="localized"),
        "ratio": st.column_config.NumberColumn("ratio", format="%.1fx"),
        "error": st.column_config.NumberColumn("top-1 error", format="%.2f %%"),
        "paper_kept": st.column_config.TextColumn("paper: kept"),
        "paper_size": st.column_config.TextColumn("paper: size"),
        "paper_ratio": st.column_config.TextColumn("paper: ratio"),
        "paper_error": st.column_config.TextColumn("paper: top-1 error"),
    },
)  # fmt: skip
st.caption(
    "—: the paper does not publish that number. Its model trained on 60,000 digits; "
    f"the {data.name} train split has far fewer, so our float accuracy is lower, and with "
    f"{res.n:,} {res.split} images one image moves accuracy by {100 / res.n:.2g} points."
)

st.subheader("Bits per weight, layer by layer")
bits_table = tables.deep_layer_bits(res.layers)
st.dataframe(
    bits_table,
    hide_index=True,
    key="deep_layers_table",
    column_config={
        s: st.column_config.NumberColumn(qcore.deep.STAGE_LABELS[s], format="%.2f")
        for s in qcore.deep.STAGES
    },
)  # fmt: skip
st.caption(
    "Each layer's stored weight bytes × 8 / its weights: values or codes, the sparse index, "
    "the codebook and the Huffman tables (biases are not in these columns; they stay "
    "float32). Per layer: "
    + "; ".join(f"{n} pruned {res.prune_rates[n]:.0%}, {res.bits[n]} bits"
                for n in res.prune_rates)
    + "."
)

st.caption(
    f"The packed file: {file_bytes:,} bytes, the {payload:,}-byte payload shown above and a "
    f"{file_bytes - payload:,}-byte header (model, config, tensor table)."
)
st.download_button(
    "Download the packed model",
    data=outcome.download,
    file_name=f"{model.name}-deep-compression.qpk",
    mime="application/octet-stream",
    on_click="ignore",
    key="download_deep",
    icon=":material/download:",
    help=f"{file_bytes:,} bytes: the {payload:,}-byte payload above and its header; load it "
    "with qcore.load_packed.",
)
