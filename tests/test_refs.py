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


# --- models made in a session: named by the SHA-256 of their state ---------------------------


def test_state_sha256_follows_the_content_and_leaves_the_model_alone() -> None:
    from qcore.refs import state_sha256

    model = qcore.load_model("digits-mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sha = state_sha256(model)
    assert len(sha) == 64 and sha == state_sha256(qcore.load_model("digits-mlp"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    changed = qcore.load_model("digits-mlp")
    first = next(iter(changed.state_dict()))
    with torch.no_grad():
        changed.state_dict()[first].view(-1)[0] += 1e-6  # one value, by a float32 step
    assert state_sha256(changed) != sha
    # the same values under other names, or in another shape, are other content
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(2, 4)
    with torch.no_grad():
        b.weight.copy_(a.weight.T)
        b.bias.zero_(), a.bias.zero_()
    assert state_sha256(a) != state_sha256(b)


def test_session_refs_round_trip_and_are_strict() -> None:
    from qcore.refs import session_model_name

    sha = "ab" * 32
    ref = ModelRef(session_model_name(sha), sha256=sha)
    assert ref.name == "ft-abababababab" and ref.is_session
    assert not ModelRef("mnist-cnn").is_session
    again = ModelRef.from_dict(json.loads(json.dumps(ref.to_dict())))
    assert again == ref and hash(again) == hash(ref)
    assert ModelRef("mnist-cnn") == ModelRef("mnist-cnn", None)
    assert ModelRef.from_dict({"name": "mnist-cnn"}).to_dict() == {"name": "mnist-cnn"}
    for bad in ({"name": ref.name, "sha256": "AB" * 32}, {"name": ref.name, "sha256": "ab"},
                {"name": "ft-000000000000", "sha256": sha},
                {"name": ref.name, "sha256": sha, "extra": 1}, {"sha256": sha}):  # fmt: skip
        with pytest.raises(ValueError):
            ModelRef.from_dict(bad)
    with pytest.raises(ValueError, match="cannot be loaded by name"):
        ref.load()
