"""Shared fixtures for the qcore tests: tiny seeded models and a tiny fake dataset."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI (.ci/run) runs the property tests on a fixed sequence of examples, so a landing never
# depends on the draw; a local run draws new examples every time, to find new failures.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@dataclass(frozen=True)
class FakeDataset:
    """The shape of a qcore Dataset: .x float [N, C, H, W], .y long [N], .classes, .name."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    name: str = "fake"

    def inputs(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """As ``qcore.Dataset.inputs``: the (already normalised) float inputs of ``rows``."""
        return self.x[rows]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _randomise_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def make_bn_model(seed: int = 0) -> nn.Module:
    """conv+BN+ReLU, conv(no bias)+BN, flatten, linear+BN1d, linear: input (N, 1, 6, 6)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 3),
    )
    _randomise_bn(model, seed + 1)
    return model.eval()


def make_mlp(seed: int = 0) -> nn.Module:
    """A model without BatchNorm: flatten, linear, relu, linear; input (N, 1, 6, 6)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()


class TwiceUsed(nn.Module):
    """A conv whose output feeds both a BatchNorm and a residual sum (must not be folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y  # conv output used twice
        z = self.bn2(self.conv2(torch.relu(z)))  # foldable
        return self.head(z.flatten(1))


def make_twice_used(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TwiceUsed()
    _randomise_bn(model, seed + 1)
    return model.eval()


def state_hash(model: nn.Module) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k, v in model.state_dict(keep_vars=True).items():
        t = v.detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(str([p.requires_grad for p in model.parameters()]).encode())
    return h.hexdigest()


@pytest.fixture
def bn_model() -> nn.Module:
    return make_bn_model()


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture
def twice_used() -> nn.Module:
    return make_twice_used()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(123))


@pytest.fixture
def fake_dataset(images: torch.Tensor) -> FakeDataset:
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(7))
    return FakeDataset(images, y, ("a", "b", "c"))


class Residual(nn.Module):
    """linear, relu, a residual addition, linear: input (N, 4); one "add" edge."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + x)


def _job_pool(monkeypatch, workers: str):
    from pages import jobs

    monkeypatch.setenv(jobs.WORKERS_ENV, workers)
    jobs.pool.clear()  # the next page run makes the pool anew, sized by the variable
    yield jobs
    jobs.pool.clear()


@pytest.fixture
def jobs_in_process(monkeypatch):
    """The analysis pages' jobs run in the test's process (``QP_JOB_WORKERS=0``)."""
    yield from _job_pool(monkeypatch, "0")


@pytest.fixture
def one_job_worker(monkeypatch):
    """The analysis pages' jobs run in a pool of one worker process (``QP_JOB_WORKERS=1``)."""
    yield from _job_pool(monkeypatch, "1")


@pytest.fixture(scope="session")
def app_url():
    """The app served once (``streamlit run app.py``, default settings) for every browser
    test that needs no server of its own: each test opens its own browser session on it,
    as users of one hosted app do. Tests that need a fresh server, other options or a
    server-wide budget start their own with ``e2e.serve_app``."""
    from e2e import serve_app

    with serve_app() as url:
        yield url
