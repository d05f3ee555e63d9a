"""mpq_core: the mixed-precision quantization engine.

Model intake, layer profiling, quantizers, sensitivities, budgets and MCKP solvers. This
package's ``__init__`` imports nothing heavy on purpose: the pure modules (``budgets``,
``solvers``, ``allocation``, ``sensitivity_table``, ``layers``, ``errors``) must stay importable
in the API process, which never loads torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
