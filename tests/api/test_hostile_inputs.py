"""A corpus of what a careless user or an attacker sends to every route, run against the real app
on SQLite and on Postgres (which refuses NaN in JSON and NUL in text, where SQLite stores both).

Every case must be answered below 500 with its own stable error code, never ``internal_error``;
the last test sends the whole corpus once more and counts: 0 responses of class 5xx.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.api.apptools import Service, data_bytes, model_and_dataset, model_bytes, running_service

BACKENDS = ("sqlite", "postgres")


@dataclass(frozen=True)
class Case:
    """One request and the answer it must get. ``body`` is sent byte for byte (so it can hold
    what a JSON encoder refuses to write: NaN, Infinity, lone surrogates); ``{model}`` and
    ``{data}`` in it, in ``path`` and in ``form`` stand for ids of the tenant's uploads."""

    id: str
    status: int
    code: str | None  # None: accepted (2xx), no error body
    method: str = "POST"
    path: str = "/v1/jobs"
    body: str | bytes | None = None
    content_type: str | None = "application/json"
    params: dict[str, str] | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)
    form: dict[str, str] | None = None  # multipart fields, sent before the model and data files
    authorized: bool = True


def _spec(fragment: str, status: int, code: str | None, case_id: str) -> Case:
    """A JSON job whose spec is ``{"budgets": ["avg-bits=4"], <fragment>}`` (the fragment may
    also override budgets: JSON keeps the last value of a repeated key)."""
    spec = '{"budgets": ["avg-bits=4"], "finetune": {"epochs": 0}' + (
        f", {fragment}}}" if fragment else "}"
    )
    body = f'{{"model_id": "{{model}}", "dataset_id": "{{data}}", "spec": {spec}}}'
    return Case(case_id, status, code, body=body)


def _bad(fragment: str, code: str, case_id: str) -> Case:
    return _spec(fragment, 422, code, case_id)


def _cursor(payload: Any) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _form(spec: str, code: str, case_id: str, status: int = 422) -> Case:
    return Case(case_id, status, code, body=None, content_type=None, form={"spec": spec})


NOT_FINITE = (
    [
        _bad(f'"{name}": {value}', "spec_not_finite", f"{name}-{value}")
        for name, value in [
            ("seed", "NaN"),
            ("seed", "Infinity"),
            ("seed", "-Infinity"),
            ("seed", "1e400"),
            ("batch_size", "Infinity"),
            ("batch_size", "NaN"),
            ("act_bits", "Infinity"),
            ("eval_fraction", "NaN"),
            ("schema_version", "Infinity"),
            ("output_key", "NaN"),
        ]
    ]
    + [
        _bad(f'"finetune": {{"{name}": {value}}}', "spec_not_finite", f"finetune.{name}-{value}")
        for name, value in [
            ("lr", "NaN"),
            ("lr", "Infinity"),
            ("epochs", "Infinity"),
            ("steps", "NaN"),
            ("batch_size", "-Infinity"),
            ("patience", "Infinity"),
            ("val_fraction", "NaN"),
            ("distill_weight", "NaN"),
            ("label_weight", "Infinity"),
        ]
    ]
    + [
        _bad('"analysis": {"hawq_iterations": Infinity}', "spec_not_finite", "hawq-inf"),
        _bad('"bits": [2, NaN]', "spec_not_finite", "bits-nan"),
        _bad('"pins": {"fc.*": Infinity}', "spec_not_finite", "pin-bits-inf"),
        _bad('"cost_table": {"fc": {"4": NaN}}', "spec_not_finite", "cost-table-nan"),
        _bad('"schema_version": 1, "finetune_lr": NaN', "spec_not_finite", "v1-finetune_lr-nan"),
    ]
)

WRONG_TYPES = [
    _bad('"seed": "0"', "spec_type", "seed-string"),
    _bad('"seed": 1.5', "spec_type", "seed-fraction"),
    _bad('"seed": true', "spec_type", "seed-bool"),
    _bad('"seed": [0]', "spec_type", "seed-list"),
    _bad('"bits": [2.5, 4]', "spec_type", "bits-fraction"),
    _bad('"bits": "248"', "spec_type", "bits-string"),
    _bad('"bits": []', "spec_type", "bits-empty"),
    _bad('"batch_size": 1.5', "spec_type", "batch-fraction"),
    _bad('"finetune": {"batch_size": 2.5}', "spec_type", "finetune-batch-fraction"),
    _bad('"budgets": "avg-bits=4"', "spec_type", "budgets-string"),
    _bad('"budgets": [4]', "spec_type", "budgets-number"),
    _bad('"budgets": {"avg-bits": 4}', "spec_type", "budgets-object"),
    _bad('"device": 7', "spec_type", "device-number"),
    _bad('"quantize_activations": "false"', "spec_type", "bool-as-string"),
    _bad('"analysis": {"first_order": 1}', "spec_type", "bool-as-number"),
    _bad('"analysis": {"method": ["fisher"]}', "spec_type", "method-list"),
    _bad('"analysis": "fisher"', "spec_type", "analysis-string"),
    _bad('"solver": null', "spec_type", "solver-null"),
    _bad('"output_key": {"logits": 1}', "spec_type", "output-key-object"),
    _bad('"pins": [1, 2]', "spec_type", "pins-list"),
    _bad('"pins": {"fc.*": "8"}', "spec_type", "pin-bits-string"),
    _bad('"ties": "fc.*"', "spec_type", "ties-string"),
    _bad('"cost_table": "table.json"', "spec_type", "cost-table-string"),
]

OUT_OF_RANGE = [
    _bad('"seed": 1180591620717411303424', "spec_out_of_range", "seed-2**70"),
    _bad('"seed": -1', "spec_out_of_range", "seed-negative"),
    _bad('"bits": [1, 4]', "spec_out_of_range", "bits-1"),
    _bad('"batch_size": 0', "spec_out_of_range", "batch-0"),
    _bad('"batch_size": 1000000000', "spec_out_of_range", "batch-1e9"),
    _bad('"act_bits": 64', "spec_out_of_range", "act-bits-64"),
    _bad('"finetune": {"lr": -0.001}', "spec_out_of_range", "lr-negative"),
    _bad('"finetune": {"lr": 1e30}', "spec_out_of_range", "lr-1e30"),
    _bad('"finetune": {"lr": 0}', "spec_out_of_range", "lr-0"),
    _bad('"finetune": {"epochs": 1000000000}', "spec_out_of_range", "epochs-1e9"),
    _bad('"analysis": {"hawq_iterations": 1e12}', "spec_out_of_range", "hawq-1e12"),
    _bad('"schema_version": 99', "invalid_spec", "schema-version-future"),
]

TEXT_AND_SIZE = [
    _bad('"budgets": ["avg-bits=NaN"]', "invalid_budget", "budget-text-nan"),
    _bad('"budgets": ["size=1e999"]', "invalid_budget", "budget-text-inf"),
    _bad('"budgets": ["avg-bits=4\U0001f642"]', "invalid_budget", "budget-emoji"),
    _bad('"budgets": []', "invalid_spec", "budgets-empty"),
    _bad('"budgets": [' + ", ".join(['"avg-bits=4"'] * 500) + "]", "spec_too_large", "budgets-500"),
    _bad('"bits": [' + ", ".join(["4"] * 100_000) + "]", "spec_too_large", "bits-100k"),
    _bad('"ties": [' + ", ".join(['"fc"'] * 1000) + "]", "spec_too_large", "ties-1000"),
    _bad('"output_key": "' + "k" * 5000 + '"', "spec_too_large", "output-key-5000-chars"),
    _bad('"cost_table": ' + '{"a": ' * 20 + "1" + "}" * 20, "spec_too_large", "nested-20"),
    _bad('"output_key": "logits\\u0000"', "spec_bad_text", "nul-in-output-key"),
    _bad('"pins": {"fc\\u0000": 4}', "spec_bad_text", "nul-in-pin"),
    _bad('"cost_table": {"fc\\u0000": {"4": 1}}', "spec_bad_text", "nul-in-cost-table-key"),
    _bad('"ties": ["fc\\u001b[2J"]', "spec_bad_text", "escape-in-tie"),
    _bad('"device": "cuda:\u0663"', "invalid_spec", "device-arabic-digit"),
    _bad('"device": "cuda:99999999999999999999"', "invalid_spec", "device-huge-index"),
    _bad('"device": "tpu"', "invalid_spec", "device-tpu"),
    _bad('"colour": "red"', "invalid_spec", "unknown-field"),
    _bad(", ".join(f'"f{i}": 0' for i in range(50_000)), "invalid_spec", "50k-unknown-fields"),
    _bad('"pins": {"(a)\\\\1": 4}', "invalid_regex", "pin-backreference"),
    _bad('"ties": ["(?=fc)fc"]', "invalid_regex", "tie-lookahead"),
    _bad('"pins": {"a{1000}{1000}": 4}', "invalid_regex", "pin-repetition-bomb"),
    _bad('"pins": {"' + "x" * 201 + '": 4}', "regex_too_long", "pin-201-chars"),
]

ACCEPTED = [
    _spec('"bits": [4.0, 8], "batch_size": 16.0', 202, None, "integral-floats"),
    _spec('"device": "cuda:7"', 202, None, "device-index-decided-by-worker"),
    _spec('"pins": {"(a+)+$": 4}', 202, None, "catastrophic-pin-is-bounded-by-re2"),
    _spec('"output_key": "l\u00f6gits \u65e5\u672c"', 202, None, "unicode-output-key"),
]

BODIES = [
    Case("body-deep-nesting", 422, "invalid_request", body='{"spec": ' + "[" * 5000 + "]" * 5000 + "}"),
    Case("body-lone-surrogate", 422, "invalid_request", body='{"model_id": "\\ud800"}'),
    Case("body-not-json", 422, "invalid_request", body="model=1&data=2"),
    Case("body-empty", 422, "invalid_request", body=""),
    Case("body-bad-utf8", 422, "invalid_request", body=b'{"model_id": "\xff\xfe"}'),
    Case("body-list", 422, "invalid_request", body="[1, 2, 3]"),
    Case("spec-null", 422, "invalid_request", body='{"model_id": "a", "dataset_id": "b", "spec": null}'),
    Case("spec-list", 422, "invalid_request", body='{"model_id": "a", "dataset_id": "b", "spec": []}'),
    Case("model-id-missing", 422, "invalid_request", body='{"dataset_id": "b", "spec": {}}'),
    Case("model-id-10k", 422, "invalid_request", body='{"model_id": "' + "m" * 10_000 + '", "dataset_id": "b", "spec": {}}'),
    Case("model-id-number", 422, "invalid_request", body='{"model_id": 5, "dataset_id": "b", "spec": {}}'),
    Case("extra-top-level-field", 422, "invalid_request", body='{"model_id": "a", "dataset_id": "b", "spec": {}, "admin": true}'),
    Case("model-id-nul", 404, "not_found", body='{"model_id": "\\u0000", "dataset_id": "{data}", "spec": {"budgets": ["avg-bits=4"]}}'),
    Case("model-id-unknown", 404, "not_found", body='{"model_id": "0000", "dataset_id": "{data}", "spec": {"budgets": ["avg-bits=4"]}}'),
    Case("body-over-limit", 413, "request_too_large", body='{"spec": {"x": "' + "a" * (2 << 20) + '"}}'),
    Case("content-type-text", 415, "unsupported_media_type", body="{}", content_type="text/plain"),
    Case("multipart-no-boundary", 422, "invalid_request", body="--x--", content_type="multipart/form-data"),
]  # fmt: skip

FORMS = [
    _form('{"budgets": ["avg-bits=4"], "seed": NaN}', "spec_not_finite", "form-spec-nan"),
    _form('{"budgets": ["avg-bits=4"], "finetune": {"lr": Infinity}}', "spec_not_finite", "form-lr-inf"),
    _form("[" * 100_000 + "]" * 100_000, "invalid_request", "form-spec-deep-nesting"),
    _form('{"budgets": ["avg-bits=4"], "output_key": "\\ud800"}', "spec_bad_text", "form-lone-surrogate"),
    _form('{"budgets": ["avg-bits=4"], "pins": {"fc\\u0000": 4}}', "spec_bad_text", "form-nul"),
    _form("budgets=avg-bits=4", "invalid_request", "form-spec-not-json"),
    _form('["avg-bits=4"]', "invalid_request", "form-spec-list"),
    _form('{"budgets": "avg-bits=4"}', "spec_type", "form-string-budgets"),
]  # fmt: skip

QUERIES = [
    Case("cursor-garbage", 400, "invalid_cursor", "GET", params={"cursor": "!!!"}),
    Case("cursor-not-json", 400, "invalid_cursor", "GET", params={"cursor": _cursor(b"\x00\xff")}),
    Case("cursor-nul-id", 400, "invalid_cursor", "GET", params={"cursor": _cursor(["2026-01-01T00:00:00+00:00", "\x00"])}),
    Case("cursor-end-of-calendar", 400, "invalid_cursor", "GET", params={"cursor": _cursor(["9999-12-31T23:59:59-14:00", "x"])}),
    Case("cursor-naive-time", 400, "invalid_cursor", "GET", params={"cursor": _cursor(["2026-01-01T00:00:00", "x"])}),
    Case("cursor-object", 400, "invalid_cursor", "GET", params={"cursor": _cursor({"a": 1})}),
    Case("cursor-too-long", 422, "invalid_request", "GET", params={"cursor": "A" * 500}),
    Case("limit-0", 422, "invalid_request", "GET", params={"limit": "0"}),
    Case("limit-text", 422, "invalid_request", "GET", params={"limit": "ten"}),
    Case("limit-1e9", 422, "invalid_request", "GET", params={"limit": "1000000000"}),
    Case("limit-nan", 422, "invalid_request", "GET", params={"limit": "NaN"}),
    Case("status-unknown", 422, "invalid_request", "GET", params={"status": "done"}),
    Case("model-filter-nul", 400, "invalid_characters", "GET", params={"model_id": "\x00"}),
    Case("model-filter-too-long", 422, "invalid_request", "GET", params={"model_id": "m" * 37}),
    Case("models-cursor-garbage", 400, "invalid_cursor", "GET", "/v1/models", params={"cursor": "%%%"}),
    Case("datasets-limit-negative", 422, "invalid_request", "GET", "/v1/datasets", params={"limit": "-1"}),
]  # fmt: skip

PATHS = [
    Case("job-id-nul", 400, "invalid_characters", "GET", "/v1/jobs/abc%00def"),
    Case("job-id-unicode", 404, "not_found", "GET", "/v1/jobs/j%C3%B6b"),
    Case("job-id-1000-chars", 404, "not_found", "GET", "/v1/jobs/" + "j" * 1000),
    Case("job-id-traversal", 404, "not_found", "GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd"),
    Case("cancel-unknown", 404, "not_found", "POST", "/v1/jobs/nope/cancel", body=None),
    Case("cancel-nul", 400, "invalid_characters", "POST", "/v1/jobs/%00/cancel", body=None),
    Case("delete-unknown", 404, "not_found", "DELETE", "/v1/jobs/nope"),
    Case("delete-nul", 400, "invalid_characters", "DELETE", "/v1/jobs/%00"),
    Case("artifacts-unknown-job", 404, "not_found", "GET", "/v1/jobs/nope/artifacts"),
    Case("artifact-name-nul", 400, "invalid_characters", "GET", "/v1/jobs/nope/artifacts/a%00b"),
    Case("model-delete-nul", 400, "invalid_characters", "DELETE", "/v1/models/%00"),
    Case("dataset-get-unknown", 404, "not_found", "GET", "/v1/datasets/" + "d" * 36),
]  # fmt: skip

UPLOADS = [
    Case("model-filename-nul", 400, "invalid_characters", "POST", "/v1/models", body=b"x", content_type="application/octet-stream", params={"filename": "m\x00.pt"}),
    Case("model-not-a-model", 415, "model_format", "POST", "/v1/models", body=b"\x00" * 64, content_type="application/octet-stream"),
    Case("model-empty", 415, "model_format", "POST", "/v1/models", body=b"", content_type="application/octet-stream"),
    Case("dataset-not-data", 415, "data_format", "POST", "/v1/datasets", body=b"hello", content_type="application/octet-stream"),
]  # fmt: skip

HEADERS = [
    Case("no-key", 401, "unauthorized", "GET", "/v1/jobs", authorized=False),
    Case("empty-bearer", 401, "unauthorized", "GET", "/v1/jobs", headers={"Authorization": "Bearer "}, authorized=False),
    Case("basic-auth", 401, "unauthorized", "GET", "/v1/jobs", headers={"Authorization": "Basic YTpi"}, authorized=False),
    Case("key-10k", 401, "unauthorized", "GET", "/v1/jobs", headers={"Authorization": "Bearer " + "k" * 10_000}, authorized=False),
    Case("key-latin1", 401, "unauthorized", "GET", "/v1/jobs", headers={"Authorization": "Bearer caf\u00e9".encode("latin-1")}, authorized=False),
    Case("content-length-huge", 413, "request_too_large", headers={"Content-Length": str(10**12)}, body="{}"),
]  # fmt: skip

CORPUS = (
    NOT_FINITE + WRONG_TYPES + OUT_OF_RANGE + TEXT_AND_SIZE + ACCEPTED + BODIES + FORMS
    + QUERIES + PATHS + UPLOADS + HEADERS
)  # fmt: skip


@dataclass
class Tenant:
    svc: Service
    headers: dict[str, str]
    ids: dict[str, str]


@pytest.fixture(scope="module", params=BACKENDS)
def tenant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tenant]:
    """The real app on a fresh database of each backend, with one tenant's model and dataset."""
    overrides: dict[str, Any] = {}
    if request.param == "postgres":
        overrides["database_url"] = request.getfixturevalue("pg_url")
    with running_service(tmp_path_factory.mktemp(request.param), **overrides) as svc:
        headers = svc.key("hostile")
        model_id, data_id = model_and_dataset(svc, headers)
        yield Tenant(svc, headers, {"model": model_id, "data": data_id})


def _fill(text: str, ids: dict[str, str]) -> str:
    return text.replace("{model}", ids["model"]).replace("{data}", ids["data"])


def _send(t: Tenant, case: Case) -> Any:
    given: dict[str, str | bytes] = {**(t.headers if case.authorized else {}), **case.headers}
    # as bytes, so that a header can hold what is not ASCII (httpx encodes str as ASCII)
    headers = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in given.items()}
    if case.form is not None:
        files = {
            "model": ("m.pt", model_bytes(), "application/octet-stream"),
            "data": ("d.npz", data_bytes(), "application/octet-stream"),
        }
        return t.svc.client.post(case.path, data=case.form, files=files, headers=headers)
    body = case.body
    if isinstance(body, str):
        body = _fill(body, t.ids).encode("utf-8", "surrogatepass")
    if body is not None and case.content_type is not None:
        headers.setdefault(b"Content-Type", case.content_type.encode())
    return t.svc.client.request(
        case.method, case.path, content=body, params=case.params, headers=headers
    )


def _check(case: Case, r: Any) -> None:
    assert r.status_code < 500, f"{case.id}: {r.status_code} {r.text[:300]}"
    assert r.status_code == case.status, f"{case.id}: {r.status_code} {r.text[:300]}"
    if case.code is None:
        return
    error = r.json()["error"]
    assert error["code"] == case.code, f"{case.id}: {error}"
    assert error["message"] and "Traceback" not in error["message"]
    assert len(error["message"]) < 2000, f"{case.id}: a {len(error['message'])}-character message"


def test_corpus_is_large_and_each_case_named_once() -> None:
    ids = [case.id for case in CORPUS]
    assert len(ids) >= 60
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.id)
def test_hostile_input_gets_its_4xx_code(tenant: Tenant, case: Case) -> None:
    _check(case, _send(tenant, case))


def test_whole_corpus_has_no_5xx_and_no_internal_error(tenant: Tenant) -> None:
    statuses = [_send(tenant, case) for case in CORPUS]
    server_errors = [
        (c.id, r.status_code) for c, r in zip(CORPUS, statuses, strict=True) if r.status_code >= 500
    ]
    internal = [c.id for c, r in zip(CORPUS, statuses, strict=True) if "internal_error" in r.text]
    assert server_errors == [] and internal == []
    assert sum(r.status_code < 500 for r in statuses) == len(CORPUS) >= 60


def test_stored_specs_hold_only_finite_numbers(tenant: Tenant) -> None:
    """What was accepted went into the database as plain JSON, readable back on both backends."""
    r = tenant.svc.client.get("/v1/jobs", params={"limit": 100}, headers=tenant.headers)
    assert r.status_code == 200
    for job in r.json()["items"]:
        json.dumps(job["spec"], allow_nan=False)  # raises on NaN/Infinity
