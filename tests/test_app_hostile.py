"""The app against a careless or hostile visitor (issue 23): downloads and server paths, file
names in messages, links that combine settings no config takes, the uploads' memory budget,
bounded caches and a favicon served by the app itself."""

from __future__ import annotations

import ast
import io
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from test_app import APP, needs_sample, open_app

from pages import cache
from pages.sidebar import DOWNLOAD_ENV, escape_markdown
from qcore.upload import load_weights
from qcore.userdata import load_npz

ROOT = Path(APP).parent
_SPECIAL = re.compile(r"(?<!\\)[*_\[\]()$!`<>]")  # markdown's own characters, unescaped


def _unescaped(text: str) -> str:
    """What a reader sees: backslash escapes resolved, invisible word joiners gone."""
    return re.sub(r"\\(.)", r"\1", text).replace("\u2060", "")


# --- 4. downloads and server paths -------------------------------------------------------------


@needs_sample
def test_an_unset_download_setting_offers_no_download(tmp_path, monkeypatch) -> None:
    # a hosted server does not set it: no viewer may make the server fetch and write
    monkeypatch.delenv(DOWNLOAD_ENV, raising=False)
    monkeypatch.setenv("QCORE_DATA_DIR", str(tmp_path))
    at = open_app(model="mnist-cnn", dataset="mnist")
    assert not at.exception
    assert [e.value for e in at.error] == [
        "The mnist dataset is not on this server, and downloading it from this page is turned "
        "off here. Pick another dataset in the sidebar, or ask whoever runs the server to add it."
    ]
    assert not [b for b in at.button if b.key and b.key.startswith("download_")]
    assert not any(tmp_path.iterdir())


@needs_sample
def test_a_failed_download_names_no_server_path(tmp_path, monkeypatch) -> None:
    import torchvision.datasets

    monkeypatch.setenv(DOWNLOAD_ENV, "1")  # as `make app` sets it
    monkeypatch.setenv("QCORE_DATA_DIR", str(tmp_path))

    def offline(root, *args, **kwargs):  # what urlopen raises without a network
        raise urllib.error.URLError(f"[Errno -3] Temporary failure in name resolution ({root})")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    at = open_app(model="mnist-cnn", dataset="mnist")
    at.button(key="download_mnist").click().run()
    assert not at.exception
    shown = [e.value for e in at.error]
    assert shown[-1] == (
        "Downloading mnist failed; the server may have no internet connection. Pick another "
        "dataset in the sidebar, or ask whoever runs the server to add it."
    )
    for text in shown:
        assert str(tmp_path) not in text and "urlopen" not in text and "Errno" not in text


@needs_sample
def test_a_corrupt_data_file_names_no_server_path(tmp_path, monkeypatch) -> None:
    from test_data import _write_mnist

    monkeypatch.setenv("QCORE_DATA_DIR", str(tmp_path))
    _write_mnist(tmp_path, "MNIST")
    bad = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    try:
        at = open_app(model="mnist-cnn", dataset="mnist")
        assert not at.exception
        (error,) = at.error
        assert _unescaped(error.value) == (
            "The file t10k-images-idx3-ubyte in the data folder is corrupt (bad idx header or "
            "length); delete it and download it again."
        )
        assert str(tmp_path) not in _unescaped(error.value)
    finally:
        cache.get_dataset.clear()


# --- 5. a file's name in a message is text, never markdown ----------------------------------------

HOSTILE = "**bold** [click](https://evil.example/x) ![t](https://evil.example/t.png) $$x^2$$"


@needs_sample
@pytest.mark.parametrize("uploader, suffix, read", [
    ("upload_weights", ".pt", lambda data, name: load_weights(data, "cnn", "mnist-5k",
                                                              filename=name)),
    ("upload_data", ".npz", lambda data, name: load_npz(data, filename=name)),
])  # fmt: skip
def test_a_file_name_is_shown_as_typed(uploader, suffix, read) -> None:
    name = HOSTILE + suffix
    data = b"PK\x03\x04 not an archive"
    with pytest.raises(ValueError) as refusal:
        read(data, name)
    assert HOSTILE in str(refusal.value)  # qcore quotes the name as it is
    at = open_app(model="mnist-cnn")
    at.file_uploader(key=uploader).upload(name, data).run()
    assert not at.exception
    (error,) = at.sidebar.error
    # the user reads qcore's sentence, name and all, and no character of it is markdown:
    # no bold text, no live link, no image fetched from elsewhere, no KaTeX
    assert error.value == escape_markdown(str(refusal.value))
    assert _unescaped(error.value) == str(refusal.value)
    assert _SPECIAL.search(error.value) is None
    assert "**bold**" not in error.value and "](https://" not in error.value
    assert "$$" not in error.value
    # a bare address is no link either: GitHub-flavoured markdown links "https://..." after
    # parsing, whatever the backslashes; a word joiner after the colon stops it
    assert "https://" not in error.value and "https\\:\u2060//evil" in error.value


# --- 8. a link whose settings are valid alone but not together ---------------------------------


@needs_sample
def test_a_kmeans_link_with_per_channel_scales_gives_results_and_says_what_was_used() -> None:
    # one resolution everywhere (Settings.to_config, issue 18 item 4): the page computes,
    # and a note says per-tensor codebooks are used
    at = open_app(model="mnist-cnn", bits="4", codebook="kmeans", per_channel="true")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [i.value for i in at.info if "per-channel scales do not apply" in i.value]
    assert at.session_state["codebook"] == "kmeans"
    assert [m for m in at.metric if m.label.startswith("Accuracy")]  # the page computed


@needs_sample
def test_the_favicon_is_a_file_of_the_app(monkeypatch) -> None:
    # a Material icon as page_icon made every visitor's browser ask fonts.gstatic.com for it
    seen: list[dict] = []
    real = st.set_page_config

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(st, "set_page_config", spy)
    at = open_app()
    assert not at.exception and seen
    icon = Path(seen[0]["page_icon"])
    assert icon.is_file() and icon.is_relative_to(ROOT)
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- 3. one memory budget for every session's uploads, and bounded caches ---------------------


def _npz(seed: int, n: int = 800) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, x=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), y=np.arange(n) % 10)
    return buf.getvalue()


@needs_sample
def test_uploads_share_one_budget_and_the_oldest_unused_goes_first(monkeypatch) -> None:
    monkeypatch.setenv(cache.UPLOAD_BUDGET_ENV, "1")  # 1 MiB for every session together
    first, second = _npz(1), _npz(2)
    size = load_npz(first).nbytes  # 627,200 pixel bytes (uint8) + labels and indices
    assert 2**20 / 2 < size < 2**20
    a = open_app(model="mnist-cnn")
    a.file_uploader(key="upload_data").upload("a.npz", first).run()
    name_a = a.session_state["dataset"]
    assert name_a.startswith("ud-") and not a.exception and not a.error
    b = open_app(model="mnist-cnn")  # another visitor
    b.file_uploader(key="upload_data").upload("b.npz", second).run()
    assert b.session_state["dataset"].startswith("ud-") and not b.exception
    assert cache._UPLOADS.nbytes() <= 2**20  # the first upload was let go to fit the second
    assert not cache.upload_held(load_npz(first).sha256)
    a.run()  # the first visitor's next move: a sentence, and the model's own dataset
    assert not a.exception and not a.error, [e.value for e in a.error]
    (warning,) = [w for w in a.sidebar.warning]
    assert _unescaped(warning.value).startswith(f"{name_a} was let go to make room for newer "
                                                "uploads")  # fmt: skip
    assert "Upload the file again" in warning.value
    assert a.session_state["dataset"] == "mnist-5k"
    assert [m for m in a.metric if m.label.startswith("Accuracy")]


def test_one_upload_larger_than_the_budget_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(cache.UPLOAD_BUDGET_ENV, "1")
    big = load_npz(_npz(3, n=2000))  # 1.6 MB of pixels
    with pytest.raises(ValueError, match=r"takes 2 MiB in memory; this server keeps at most "
                                         r"1 MiB of uploads for all its users"):  # fmt: skip
        cache.hold_session_dataset(big)


def test_every_cache_of_the_app_is_bounded() -> None:
    # an unbounded cache keyed by models and datasets (uploads included) grows with every
    # visitor; the float metrics' held C x C confusion matrices
    tree = ast.parse((ROOT / "pages" / "cache.py").read_text())
    caches = [d for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              for d in f.decorator_list if isinstance(d, ast.Call)
              and ast.unparse(d.func) in ("st.cache_data", "st.cache_resource")]  # fmt: skip
    assert len(caches) >= 20
    unbounded = [ast.unparse(c) for c in caches if "max_entries" not in
                 {k.arg for k in c.keywords}]  # fmt: skip
    assert unbounded == []
