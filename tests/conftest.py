"""Shared fixtures (the tests/zoo.py models, seeded, with their saved archives built once; the
external services from tests/support/fixtures.py) and the markers of tests that need a service.

Markers are set here from the fixtures a test uses, so no test can forget one:

- ``postgres``, ``redis``, ``s3``: the test talks to that real server (a parametrized test only in
  the variants that do, e.g. ``engine[postgres]`` or ``storage[s3]``);
- ``browser`` (a headless Chromium) and ``slow`` (a long end-to-end check) are set by hand.

``make test`` runs everything; ``pytest -m "not postgres and not redis and not s3 and not
browser"`` runs what needs no server (README: "Tests").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from mpq_core.data import CalibrationData
from tests.zoo import (
    SmallCNN,
    SmallMLP,
    TinyLSTM,
    TinyTextEncoder,
    export_bytes,
    torchscript_bytes,
)

pytest_plugins = ["tests.support.fixtures"]

#: The fixture whose use (directly or through other fixtures: ``fixturenames`` holds the whole
#: closure) means a test needs that service.
SERVICE_FIXTURES: dict[str, str] = {"postgres": "pg_admin", "redis": "redis_url", "s3": "s3_server"}
#: Parameter values of backend-parametrized fixtures (``engine``, ``fresh_url``, ``storage``)
#: that reach a service through ``request.getfixturevalue``, invisible in ``fixturenames``.
SERVICE_PARAMS = frozenset({"postgres", "s3"})


def service_markers(item: pytest.Item) -> set[str]:
    """The service markers ``item`` needs, from its fixtures and backend parameters."""
    names = set(getattr(item, "fixturenames", ()))
    found = {marker for marker, fixture in SERVICE_FIXTURES.items() if fixture in names}
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        found |= SERVICE_PARAMS & {v for v in callspec.params.values() if isinstance(v, str)}
    return found


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in sorted(service_markers(item)):
            item.add_marker(marker)


# The test models are tiny: intra-op threads only add overhead (and spin-wait on a busy machine).
torch.set_num_threads(1)

ZOO = ("cnn", "mlp", "text", "lstm")
FIXED_BATCH = 4  # batch size of the fixed-batch torch.export archives


def zoo_module(name: str) -> nn.Module:
    """A freshly built, seeded zoo model in eval mode (non-trivial BatchNorm statistics)."""
    torch.manual_seed(0)
    if name == "cnn":
        model: nn.Module = SmallCNN()
        with torch.no_grad():
            model.bn1.running_mean.uniform_(-0.2, 0.2)
            model.bn1.running_var.uniform_(0.5, 1.5)
    elif name == "mlp":
        model = SmallMLP()
    elif name == "text":
        model = TinyTextEncoder()
    elif name == "lstm":
        model = TinyLSTM()
    else:
        raise KeyError(name)
    return model.eval()


def zoo_inputs(name: str, n: int, seed: int = 1) -> list[torch.Tensor]:
    """``n`` samples of valid positional inputs for zoo model ``name``."""
    g = torch.Generator().manual_seed(seed)
    if name == "cnn":
        return [torch.randn(n, 1, 8, 8, generator=g)]
    if name == "mlp":
        return [torch.randn(n, 16, generator=g)]
    if name == "text":
        ids = torch.randint(0, 30, (n, 7), generator=g)
        mask = (torch.rand(n, 7, generator=g) > 0.3).float()
        mask[:, 0] = 1.0  # every sample keeps at least one token
        return [ids, mask]
    if name == "lstm":
        return [torch.randint(0, 20, (n, 5), generator=g)]
    raise KeyError(name)


def zoo_classes(name: str) -> int:
    return {"cnn": 10, "mlp": 5, "text": 4, "lstm": 3}[name]


def zoo_data(name: str, n: int, *, labels: bool = True, seed: int = 1) -> CalibrationData:
    g = torch.Generator().manual_seed(seed + 100)
    lab = torch.randint(0, zoo_classes(name), (n,), generator=g) if labels else None
    return CalibrationData(zoo_inputs(name, n, seed), lab)


def save_bytes(model: nn.Module, example: tuple[torch.Tensor, ...], fmt: str) -> bytes:
    """``fmt``: script | trace | export (dynamic batch) | export_fixed (batch of the example)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "script":
            return torchscript_bytes(model, example)
        if fmt == "trace":
            return torchscript_bytes(model, example, trace=True)
        if fmt == "export":
            return export_bytes(model, example)
        if fmt == "export_fixed":
            return export_bytes(model, example, dynamic_batch=False)
    raise KeyError(fmt)


def stock_load(path: Path, fmt: str) -> nn.Module:
    """A written model as a user loads it, with stock torch and no mpq (``fmt``: the upload's
    format, ``export`` or a TorchScript one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "export":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path))


@pytest.fixture(scope="session")
def zoo_bytes() -> Callable[[str, str], bytes]:
    """``zoo_bytes(name, fmt)``: the saved archive of a zoo model, built once per session.

    Dynamic formats are traced on 2 samples; ``export_fixed`` on ``FIXED_BATCH`` samples.
    """
    cache: dict[tuple[str, str], bytes] = {}

    def get(name: str, fmt: str) -> bytes:
        key = (name, fmt)
        if key not in cache:
            n = FIXED_BATCH if fmt == "export_fixed" else 2
            example = tuple(zoo_inputs(name, n, seed=0))
            cache[key] = save_bytes(zoo_module(name), example, fmt)
        return cache[key]

    return get
