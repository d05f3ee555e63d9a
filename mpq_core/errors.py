"""The exception hierarchy of mpq.

Every error a user can cause carries a stable ``code`` (for the REST API and scripts to match on)
and a message that says what to fix. Anything else that escapes is a bug.
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "BudgetInfeasible",
    "DataError",
    "DataMismatch",
    "ModelFormatError",
    "MpqError",
    "SpecError",
]


class MpqError(Exception):
    """Base class: a problem with the user's input that the user can act on."""

    code: str = "mpq_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ModelFormatError(MpqError):
    """The model file is not a loadable TorchScript archive or torch.export program."""

    code = "model_format"


class DataError(MpqError):
    """The calibration data file cannot be read or lacks the arrays mpq needs."""

    code = "data_format"


class DataMismatch(MpqError):
    """The data can be read but does not fit the model (shape, dtype, label range)."""

    code = "data_mismatch"


class SpecError(MpqError):
    """An option or job spec value is malformed (unknown budget kind, bad regex, ...)."""

    code = "invalid_spec"


class BudgetError(SpecError):
    """A budget is malformed."""

    code = "invalid_budget"


class BudgetInfeasible(MpqError):
    """No allocation within the candidate bits and pins satisfies the budget."""

    code = "budget_infeasible"
