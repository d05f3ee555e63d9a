"""The model and data arguments the commands share, and loading them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpq_core.data import CalibrationData
    from mpq_core.intake import LoadedModel

__all__ = ["add_input_arguments", "add_job_arguments", "load_inputs"]


def add_input_arguments(p: argparse.ArgumentParser, *, data_help: str | None = None) -> None:
    p.add_argument("model", help="TorchScript archive (.pt) or torch.export program (.pt2)")
    p.add_argument(
        "--data", required=True, help=data_help or ".npz or .safetensors with 'input' (+ 'labels')"
    )


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of a whole job (``quantize``, ``sweep``): the model, calibration
    and evaluation data, the output folder, and a stored sensitivity table to reuse."""
    add_input_arguments(p, data_help="calibration data (.npz or .safetensors)")
    p.add_argument(
        "--eval-data", help="evaluation data (default: hold out --eval-fraction of --data)"
    )
    p.add_argument("--out-dir", required=True, help="folder for the artefacts (created if missing)")
    p.add_argument(
        "--sensitivity",
        metavar="SENS.json",
        help="reuse a stored table for this model (default: analyze the model)",
    )


def load_inputs(model_path: str, data_path: str) -> tuple[LoadedModel, CalibrationData]:
    """Load the model and the data and check that the data feeds the model."""
    from mpq_core.data import load_data
    from mpq_core.intake import load_model
    from mpq_core.runner import check_data_fits

    model = load_model(model_path)
    data = load_data(data_path)
    check_data_fits(model, data)
    return model, data
