"""The one layout of object keys in storage, used by the API, the workers and the tests.

Everything a tenant owns lives under ``tenants/<tenant_id>/``::

    tenants/<tenant_id>/models/<model_id>             an uploaded model
    tenants/<tenant_id>/datasets/<dataset_id>         an uploaded data file
    tenants/<tenant_id>/jobs/<job_id>/<name>          an output file (artifact) of a job
    tenants/<tenant_id>/sensitivity/<key>.json        a cached sensitivity table

Every row that points at an object (models, datasets, artifacts, the sensitivity cache) stores
its key in ``storage_key``, and readers only ever use that stored key: objects written under an
earlier layout (``jobs/<job_id>/<name>``, ``sensitivity/<tenant_id>/<key>.json``) stay readable.
"""

from __future__ import annotations

__all__ = ["artifact_key", "dataset_key", "model_key", "sensitivity_key", "tenant_prefix"]


def tenant_prefix(tenant_id: str) -> str:
    """The folder of everything ``tenant_id`` owns.

    Example:
        >>> tenant_prefix("t1")
        'tenants/t1/'
    """
    return f"tenants/{tenant_id}/"


def model_key(tenant_id: str, model_id: str) -> str:
    """Where uploaded model ``model_id`` is stored.

    Example:
        >>> model_key("t1", "m1")
        'tenants/t1/models/m1'
    """
    return f"{tenant_prefix(tenant_id)}models/{model_id}"


def dataset_key(tenant_id: str, dataset_id: str) -> str:
    """Where uploaded data file ``dataset_id`` is stored.

    Example:
        >>> dataset_key("t1", "d1")
        'tenants/t1/datasets/d1'
    """
    return f"{tenant_prefix(tenant_id)}datasets/{dataset_id}"


def artifact_key(tenant_id: str, job_id: str, name: str) -> str:
    """Where output file ``name`` (``model.pt``, ``report.json``, ...) of a job is stored.

    Example:
        >>> artifact_key("t1", "j1", "model.pt")
        'tenants/t1/jobs/j1/model.pt'
    """
    return f"{tenant_prefix(tenant_id)}jobs/{job_id}/{name}"


def sensitivity_key(tenant_id: str, cache_key: str) -> str:
    """Where the tenant's cached sensitivity table ``cache_key`` (see
    :meth:`mpq_service.tables.SensitivityCache.make_key`) is stored.

    Example:
        >>> sensitivity_key("t1", "ab12")
        'tenants/t1/sensitivity/ab12.json'
    """
    return f"{tenant_prefix(tenant_id)}sensitivity/{cache_key}.json"
