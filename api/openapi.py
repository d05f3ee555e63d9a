"""The OpenAPI document as the service behaves, completing what FastAPI generates.

FastAPI knows the routes, parameters and success bodies. It does not know what the error
handlers (:mod:`api.errors`) answer, the headers routes set themselves, the job spec (validated
by :mod:`mpq_core.spec`, not by pydantic) or the bearer authentication (a dependency of our
own). This module adds them to every operation by rule, in one place, so that a new route gets
them too; ``tests/api/test_openapi_contract.py`` checks real responses against the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from api.schemas import JobCreate, JobResult
from api.spec_schema import job_spec_schemas
from mpq_core.progress import STAGES

__all__ = ["ERROR_EXAMPLES", "install_openapi", "operation_id"]

_REF = "#/components/schemas/"
_ERROR_RESPONSE = {"$ref": _REF + "Error"}

#: One example of each status's error body (codes are stable; see api.errors).
ERROR_EXAMPLES: dict[int, tuple[str, str, str]] = {
    400: ("bad request", "invalid_cursor", "the cursor is not valid; omit it to start over"),
    401: ("no valid API key", "unauthorized", "a valid API key is required"),
    404: ("not found, or another tenant's", "not_found", "job '3f2b8c1e' not found"),
    409: ("the resource's state forbids it", "in_use", "model '3f2b8c1e' is used by a job"),
    413: ("too large", "upload_too_large", "the upload exceeds the limit of 2 GiB"),
    415: ("not a format mpq reads", "model_format", "not a TorchScript or torch.export file"),
    416: ("range past the end", "range_not_satisfiable", "the range starts past the end"),
    422: ("invalid request or job spec", "invalid_spec", "budgets: at least one is needed"),
    500: ("a bug: reported with no details", "internal_error", "internal server error"),
    503: ("an outage: try again after Retry-After", "database_unavailable", "try again in 5 s"),
}

_HEADER_DOCS: dict[str, dict[str, Any]] = {
    "Location": {"description": "the new resource's URL", "schema": {"type": "string"}},
    "Retry-After": {
        "description": "seconds to wait before asking again",
        "schema": {"type": "integer"},
    },
    "WWW-Authenticate": {"schema": {"type": "string", "enum": ["Bearer"]}},
}


def operation_id(route: APIRoute) -> str:
    """Operation ids are the route functions' names (``create_job``, ``download_artifact``)."""
    return route.name


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Every error, 4xx and 5xx: a stable code and a message saying what to fix.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "stable; match on it"},
                    "message": {"type": "string", "description": "what to fix, for people"},
                    "request_id": {
                        "type": "string",
                        "description": "the request's X-Request-ID, to quote in a report",
                    },
                },
            }
        },
    }


def _statuses(path: str, op: dict[str, Any]) -> set[int]:
    """The error statuses this operation can answer, by rule."""
    if not path.startswith("/v1/"):
        return set()
    found = {401, 500, 503}
    params = [p for p in op.get("parameters", []) if p.get("in") != "path"]
    if "{" in path or op["operationId"] == "create_job":  # a job names its uploads' ids
        found.add(404)
    if params or "requestBody" in op:
        found.add(422)
    if any(p["name"] == "cursor" for p in params):
        found.add(400)
    if "requestBody" in op:
        found |= {413, 415}
    if op["operationId"] in ("cancel_job", "delete_model", "delete_dataset"):
        found.add(409)
    if op["operationId"] in ("download_artifact", "artifact_headers"):
        found.add(416)
    return found


def _error_response(status: int) -> dict[str, Any]:
    description, code, message = ERROR_EXAMPLES[status]
    response: dict[str, Any] = {
        "description": description,
        "content": {
            "application/json": {
                "schema": _ERROR_RESPONSE,
                "example": {"error": {"code": code, "message": message}},
            }
        },
    }
    if status == 503:
        response["headers"] = {"Retry-After": _HEADER_DOCS["Retry-After"]}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": _HEADER_DOCS["WWW-Authenticate"]}
    return response


def _complete_operation(path: str, op: dict[str, Any]) -> None:
    responses: dict[str, Any] = op["responses"]
    statuses = _statuses(path, op)
    if 422 not in statuses:
        responses.pop("422", None)  # FastAPI's guess for any parameter; ids are never refused
    for code in sorted(statuses):
        responses[str(code)] = _error_response(code)
    if path.startswith("/v1/"):
        op["security"] = [{"bearer": []}]
    for status, headers in (("201", ["Location"]), ("202", ["Location", "Retry-After"])):
        if status in responses:
            responses[status].setdefault("headers", {}).update(
                {h: {**_HEADER_DOCS[h], "required": True} for h in headers}
            )
    if op["operationId"] == "get_job":
        responses["200"].setdefault("headers", {})["Retry-After"] = {
            **_HEADER_DOCS["Retry-After"],
            "description": "present while the job is queued or running: when to poll again",
        }


def _example_of(schema: dict[str, Any], schemas: dict[str, Any]) -> Any:
    """An example of a success body: the component's own, or a one-item page of them."""
    ref = schema.get("$ref", "")
    component = schemas.get(ref.removeprefix(_REF), {}) if ref.startswith(_REF) else {}
    if component.get("examples"):
        return component["examples"][0]
    items = component.get("properties", {}).get("items", {}).get("items")
    if items is None:
        return None
    page: dict[str, Any] = {"items": [_example_of(items, schemas)]}
    if "next_cursor" in component["properties"]:
        page["next_cursor"] = None
    if "total" in component["properties"]:
        page["total"] = 1
    return page


def _add_success_examples(op: dict[str, Any], schemas: dict[str, Any]) -> None:
    for status, response in op["responses"].items():
        content = response.get("content", {}).get("application/json")
        if status.startswith("2") and content and "example" not in content:
            example = _example_of(content.get("schema", {}), schemas)
            if example is not None:
                content["example"] = example


def _complete_schemas(schemas: dict[str, Any]) -> None:
    schemas.pop("HTTPValidationError", None)  # 422s are Error bodies (api.errors)
    schemas.pop("ValidationError", None)
    schemas["Error"] = _error_schema()
    schemas.update(job_spec_schemas())
    schemas["JobResult"] = JobResult.model_json_schema(ref_template=_REF + "{model}")
    # create_job reads its body itself (JSON or a form), so FastAPI did not add it.
    schemas["JobCreate"] = JobCreate.model_json_schema(ref_template=_REF + "{model}")
    for name in ("JobCreate", "JobPublic"):
        spec = schemas[name]["properties"]["spec"]
        schemas[name]["properties"]["spec"] = {"$ref": _REF + "JobSpec", **_kept(spec)}
    job = schemas["JobPublic"]["properties"]
    job["result"] = {"anyOf": [{"$ref": _REF + "JobResult"}, {"type": "null"}]}
    stages = {"type": "string", "enum": list(STAGES)}
    job["stage"] = {**job["stage"], "anyOf": [stages, {"type": "null"}]}


def _kept(prop: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in prop.items() if k == "description"}


def _builder(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = doc.setdefault("components", {})
        _complete_schemas(components.setdefault("schemas", {}))
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key from `mpq keys create NAME`",
            }
        }
        for path, item in doc["paths"].items():
            for op in item.values():
                _complete_operation(path, op)
                _add_success_examples(op, components["schemas"])
        app.openapi_schema = doc
        return doc

    return openapi


def install_openapi(app: FastAPI) -> None:
    """Serve the completed document at ``app.openapi_url`` (built once, on first use)."""
    app.openapi = _builder(app)  # type: ignore[method-assign]
