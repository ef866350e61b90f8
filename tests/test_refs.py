"""ModelRef and DatasetRef: small, hashable, JSON-safe keys a worker can rebuild from."""

from __future__ import annotations

import json

import pytest
import torch

import qcore
from qcore.refs import DatasetRef, ModelRef


def test_refs_rebuild_the_model_and_data_from_json() -> None:
    m, d = ModelRef("digits-mlp"), DatasetRef("digits", "calib")
    m2 = ModelRef.from_dict(json.loads(json.dumps(m.to_dict())))
    d2 = DatasetRef.from_dict(json.loads(json.dumps(d.to_dict())))
    assert (m2, d2) == (m, d) and hash(m2) == hash(m)
    model, data = m2.load(), d2.load()
    assert data.split == "calib" and len(data.x) == qcore.load_dataset("digits", "calib").x.shape[0]
    with torch.inference_mode():
        assert torch.equal(model(data.x[:5]), qcore.load_model("digits-mlp")(data.x[:5]))


@pytest.mark.parametrize("bad", [{"name": ""}, {"name": "x", "extra": 1}, [], {"nam": "x"}])
def test_bad_refs_are_sentences(bad) -> None:
    with pytest.raises(ValueError):
        ModelRef.from_dict(bad)
    with pytest.raises(ValueError, match="split"):
        DatasetRef("digits", "train2")
