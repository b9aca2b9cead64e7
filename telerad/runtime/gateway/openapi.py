"""The OpenAPI 3.1 description of the gateway's HTTP port, served at /openapi.json.

JSON bodies of the job API come from the same pydantic models the handlers parse and
answer with, so the description cannot drift from them; the DICOMweb part describes the
PS3.18 resources this gateway implements (see docs/dicomweb-conformance.md), with the
matching keys QIDO-RS accepts taken from the query parser itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel

from telerad import __version__
from telerad.api.jobs import (
    JOB_HEADER,
    LEASE_NOT_HELD,
    ClaimRequest,
    CompleteRequest,
    ExportReport,
    ExportRequest,
    ExtendRequest,
    FailRequest,
    Job,
    JobState,
    Problem,
    WorklistEntry,
)
from telerad.runtime.dicomweb.qido import (
    MATCHING_KEYS,
    MAX_COUNT,
    TEXT_PATTERN,
    VALUE_PATTERNS,
    Level,
)
from telerad.runtime.gateway.waiters import MAX_WAIT_S
from telerad.runtime.store.search import ATTRIBUTES

UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _closed(schema: Any) -> Any:
    """pydantic describes a dict with constrained keys by patternProperties alone, which
    lets any other key through; the model refuses them, so the description says so."""
    if isinstance(schema, dict):
        closed = {k: _closed(v) for k, v in schema.items()}
        if "patternProperties" in closed and "additionalProperties" not in closed:
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _models(
    models: Iterable[type[BaseModel]], mode: Literal["validation", "serialization"]
) -> dict[str, Schema]:
    schemas: dict[str, Schema] = {}
    for model in models:
        schema = _closed(
            model.model_json_schema(
                by_alias=True, ref_template="#/components/schemas/{model}", mode=mode
            )
        )
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _problems(*statuses: int) -> dict[str, Schema]:
    reasons = {
        ARCHIVED: "Stored in an archive storage class: its restore has started; ask again"
        " after Retry-After seconds.",
        400: "The request is malformed; the detail says which part.",
        401: "No valid bearer token of this site's tenant.",
        403: "The token belongs to another tenant.",
        404: "No such resource.",
        406: "None of the accepted media types can be produced.",
        409: "The request conflicts with the resource's state.",
        LEASE_NOT_HELD: f"The job named in {JOB_HEADER} is not leased under its token.",
        413: "The body is larger than the gateway accepts.",
        415: "The body's media type is not supported.",
        501: "Not implemented for this kind of target.",
        502: "The peer failed.",
        503: "The gateway cannot serve the request now.",
    }
    content = {"application/problem+json": {"schema": _ref("Problem")}}
    retry = {"Retry-After": {"description": "Seconds.", "schema": {"type": "integer"}}}
    return {
        str(s): {
            "description": reasons[s],
            "content": content,
            **({"headers": retry} if s == ARCHIVED else {}),
        }
        for s in statuses
    }


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _dicom_json(schema: Schema, description: str, headers: bool = False) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/dicom+json": {"schema": schema}},
    }
    if headers:
        response["headers"] = {
            "Warning": {
                "description": 'What was not done as asked, as `299 telerad "..."`.',
                "schema": {"type": "string"},
            }
        }
    return response


def _multipart(description: str) -> Schema:
    return {
        "description": description,
        "content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}},
    }


def _path(name: str, description: str, schema: Schema | None = None) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string", "pattern": UID_PATTERN, "maxLength": 64},
    }


def _query(name: str, description: str, schema: Schema) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


STUDY = _path("study", "Study Instance UID.")
SERIES = _path("series", "Series Instance UID.")
INSTANCE = _path("instance", "SOP Instance UID.")
JOB = _path("job", "Job id.", {"type": "integer", "minimum": 1, "maximum": 10**18 - 1})
MAX_PAGE = 1000
MAX_OFFSET = (1 << 31) - 1
# Any operation that needs a token: refused it, or answered 503 when its audit record
# cannot be written.
GUARDED_PROBLEMS = (401, 403, 503)
ARCHIVED = 202
"""A WADO-RS answer for what must be restored first: not a failure, but no data yet."""
_READINESS: Schema = {
    "type": "object",
    "required": ["ready", "listening", "draining"],
    "properties": {
        "ready": {"type": "boolean", "description": "Listening and not draining."},
        "listening": {"type": "boolean", "description": "Every DICOM receiver accepts."},
        "draining": {"type": "boolean", "description": "Stopping (SIGTERM received)."},
    },
}


_LIVENESS: Schema = {
    "type": "object",
    "required": ["live", "listening"],
    "properties": {
        "live": {"type": "boolean", "description": "Listening, or draining."},
        "listening": {"type": "boolean", "description": "Every DICOM receiver accepts."},
    },
}


def _matching_value(vr: str) -> Schema:
    if vr in VALUE_PATTERNS:
        return {"type": "string", "pattern": VALUE_PATTERNS[vr]}
    return {"type": "string", "maxLength": 256, "pattern": TEXT_PATTERN}


def _qido(level: Level, scope: list[Schema], summary: str) -> Schema:
    keys = [
        _query(
            key,
            f"Match {key} (PS3.4 C.2.2.2: single value, wildcards, ranges; a list of"
            " values separated by `,` or `\\` matches any of them, except on dates and"
            " times).",
            _matching_value(ATTRIBUTES[key].vr),
        )
        for key in MATCHING_KEYS[level]
    ]
    common = [
        _query(
            "includefield",
            "Attributes to return besides the defaults, or `all`.",
            {"type": "string"},
        ),
        *_page("more than 1000 are cut to 1000, with a Warning", MAX_COUNT, MAX_COUNT),
        *(
            _query(name, "Not supported: ignored, with a Warning when true.", {"type": "boolean"})
            for name in ("fuzzymatching", "emptyvaluematching", "multiplevaluematching")
        ),
    ]
    return {
        "get": {
            "tags": ["QIDO-RS"],
            "summary": summary,
            "description": "Query parameters that are neither these nor attributes are"
            " ignored, with a Warning (PS3.18 8.3.4).",
            "parameters": [*scope, *common, *keys],
            "responses": {
                "200": _dicom_json(
                    {"type": "array", "items": _ref("DicomJson")}, "Matches.", headers=True
                ),
                **_problems(400, *GUARDED_PROBLEMS, 406),
            },
        }
    }


def _wado(scope: list[Schema], what: str, *, job: bool = False) -> Schema:
    return {
        "get": {
            "tags": ["WADO-RS"],
            "summary": f"Retrieve the {what} (multipart/related; type=application/dicom).",
            "parameters": [*scope, *([JOB_PARAMETER] if job else [])],
            "responses": {
                "200": _multipart("One part per instance, in its stored transfer syntax."),
                **_problems(
                    ARCHIVED,
                    400,
                    *GUARDED_PROBLEMS,
                    404,
                    406,
                    *((LEASE_NOT_HELD, 501) if job else ()),
                ),
            },
        }
    }


def _metadata(scope: list[Schema], what: str) -> Schema:
    return {
        "get": {
            "tags": ["WADO-RS"],
            "summary": f"Metadata of the {what}, with bulk data as BulkDataURI.",
            "parameters": scope,
            "responses": {
                "200": _dicom_json({"type": "array", "items": _ref("DicomJson")}, "Metadata."),
                **_problems(ARCHIVED, 400, *GUARDED_PROBLEMS, 404, 406),
            },
        }
    }


JOB_PARAMETER: Schema = {
    "name": JOB_HEADER,
    "in": "header",
    "required": False,
    "description": "`<job id>:<lease token>` when a worker asks for a leased job's study or"
    " stores its result: the lease is checked (412 when not held), and a result stored under"
    " it does not make the study route again.",
    # No pattern: any value that does not name a held lease gets the same 412.
    "schema": {"type": "string"},
}


def _stow(scope: list[Schema]) -> Schema:
    job = [JOB_PARAMETER] if scope else []
    return {
        "tags": ["STOW-RS"],
        "summary": "Store instances (multipart/related; type=application/dicom).",
        "parameters": [*scope, *job],
        "requestBody": {
            "required": True,
            "content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}},
        },
        "responses": {
            "200": _dicom_json(_ref("DicomJson"), "Every instance stored."),
            "202": _dicom_json(_ref("DicomJson"), "Some stored; failures or warnings listed."),
            "409": _dicom_json(_ref("DicomJson"), "Nothing stored; the reasons are listed."),
            **_problems(400, *GUARDED_PROBLEMS, 415, *((LEASE_NOT_HELD,) if scope else ())),
        },
    }


def _post(model: type[BaseModel], response: Schema, *problems: int, **extra: Schema) -> Schema:
    """A job API call; those on one job (404 among their problems) take its id."""
    return {
        "post": {
            "tags": ["jobs"],
            "parameters": [JOB] if 404 in problems else [],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(model.__name__)}},
            },
            "responses": {"200": response, **extra, **_problems(400, *GUARDED_PROBLEMS, *problems)},
        }
    }


def _with_parameters(operation: Schema, *parameters: Schema) -> Schema:
    (method,) = operation.values()
    method["parameters"] = [*method["parameters"], *parameters]
    return operation


def _page(limits: str, max_limit: int, max_offset: int) -> list[Schema]:
    return [
        _query(
            "limit",
            f"Results per page ({limits}).",
            {"type": "integer", "minimum": 0, "maximum": max_limit},
        ),
        _query(
            "offset", "Results to skip.", {"type": "integer", "minimum": 0, "maximum": max_offset}
        ),
    ]


DICOM_JSON: dict[str, Schema] = {
    "DicomJson": {
        "description": "A data set in the DICOM JSON model (PS3.18 F.2).",
        "type": "object",
        "propertyNames": {"pattern": "^[0-9A-F]{8}$"},
        "additionalProperties": _ref("DicomAttribute"),
    },
    "DicomAttribute": {
        "type": "object",
        "required": ["vr"],
        "properties": {
            "vr": {"type": "string", "pattern": "^[A-Z]{2}$"},
            "Value": {"type": "array"},
            "BulkDataURI": {"type": "string"},
            "InlineBinary": {"type": "string"},
        },
        "additionalProperties": False,
    },
}


def query_parameters(description: Schema) -> dict[tuple[str, str], set[str]]:
    """(METHOD, path template) -> the query parameters it declares, for every operation
    but the QIDO-RS searches."""
    out: dict[tuple[str, str], set[str]] = {}
    for path, operations in description["paths"].items():
        for method, operation in operations.items():
            if "QIDO-RS" in operation.get("tags", ()):
                continue
            out[(method.upper(), path)] = {
                p["name"] for p in operation.get("parameters", ()) if p["in"] == "query"
            }
    return out


def document() -> Schema:
    instance_scope = [STUDY, SERIES, INSTANCE]
    job = _ref("Job")
    paths: dict[str, Schema] = {
        "/studies": {**_qido(Level.STUDY, [], "Search for studies."), "post": _stow([])},
        "/series": _qido(Level.SERIES, [], "Search for series in every study."),
        "/instances": _qido(Level.INSTANCE, [], "Search for instances in every study."),
        "/studies/{study}": {**_wado([STUDY], "study", job=True), "post": _stow([STUDY])},
        "/studies/{study}/metadata": _metadata([STUDY], "study"),
        "/studies/{study}/series": _qido(Level.SERIES, [STUDY], "Search for a study's series."),
        "/studies/{study}/instances": _qido(
            Level.INSTANCE, [STUDY], "Search for a study's instances."
        ),
        "/studies/{study}/series/{series}": _wado([STUDY, SERIES], "series"),
        "/studies/{study}/series/{series}/metadata": _metadata([STUDY, SERIES], "series"),
        "/studies/{study}/series/{series}/instances": _qido(
            Level.INSTANCE, [STUDY, SERIES], "Search for a series' instances."
        ),
        "/studies/{study}/series/{series}/instances/{instance}": _wado(instance_scope, "instance"),
        "/studies/{study}/series/{series}/instances/{instance}/metadata": _metadata(
            instance_scope, "instance"
        ),
        "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}": {
            "get": {
                "tags": ["WADO-RS"],
                "summary": "Frames as stored: native pixel data as application/octet-stream"
                " parts, compressed pixel data in its stored transfer syntax (image/jpeg,"
                " image/jls, image/jp2, image/jpx, image/dicom-rle, image/jphc, or"
                " application/octet-stream; transfer-syntax=*), named on each part.",
                "parameters": [
                    *instance_scope,
                    _path(
                        "frames",
                        "Comma-separated frame numbers, from 1.",
                        {"type": "string", "pattern": "^[1-9][0-9]*(,[1-9][0-9]*)*$"},
                    ),
                ],
                "responses": {
                    "200": _multipart(
                        "One part per frame, in the order asked; each part's Content-Type"
                        " has its transfer-syntax."
                    ),
                    **_problems(ARCHIVED, 400, *GUARDED_PROBLEMS, 404, 406),
                },
            }
        },
        "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}": {
            "get": {
                "tags": ["WADO-RS"],
                "summary": "The value of a bulk data element that metadata refers to.",
                "parameters": [
                    *instance_scope,
                    _path(
                        "tag",
                        "Tag as 8 hex digits.",
                        {"type": "string", "pattern": "^[0-9A-Fa-f]{8}$"},
                    ),
                ],
                "responses": {
                    "200": _multipart("One application/octet-stream part."),
                    **_problems(ARCHIVED, 400, *GUARDED_PROBLEMS, 404, 406),
                },
            }
        },
        "/exports": {
            "post": {
                "tags": ["exports"],
                "summary": "Send a study to one of the site's DICOMweb destinations (STOW-RS).",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ExportRequest")}},
                },
                "responses": {
                    "200": _json(_ref("ExportReport"), "What the destination answered."),
                    **_problems(400, *GUARDED_PROBLEMS, 404, 501, 502),
                },
            }
        },
        "/jobs/claim": _with_parameters(
            _post(
                ClaimRequest,
                _json(job, "A job, leased to the caller."),
                **{"204": {"description": "No job waits for this model (within `wait`)."}},
            ),
            _query(
                "wait",
                "Seconds to wait for a job when none waits now: the answer comes as soon as"
                " one of the model is queued, by this gateway or another of the site.",
                {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_S},
            ),
        ),
        "/jobs/{job}/extend": {**_post(ExtendRequest, _json(job, "Lease extended."), 404, 409)},
        "/jobs/{job}/complete": _post(CompleteRequest, _json(job, "Job done."), 404, 409),
        "/jobs/{job}/fail": _post(FailRequest, _json(job, "Job queued again or parked."), 404, 409),
        "/jobs/{job}": {
            "get": {
                "tags": ["jobs"],
                "parameters": [JOB],
                "responses": {"200": _json(job, "The job."), **_problems(*GUARDED_PROBLEMS, 404)},
            }
        },
        "/jobs": {
            "get": {
                "tags": ["jobs"],
                "parameters": [
                    _query(
                        "state",
                        "Only jobs in this state.",
                        {"type": "string", "enum": [s.value for s in JobState]},
                    ),
                    _query("model", "Only jobs of this model.", {"type": "string"}),
                    _query(
                        "claimable",
                        "Only jobs a claim would take now: queued and due, or leased with an"
                        " expired lease.",
                        {"type": "boolean"},
                    ),
                    *_page("at most 1000", MAX_PAGE, MAX_OFFSET),
                ],
                "responses": {
                    "200": _json(
                        {"type": "array", "items": job},
                        "Jobs, most urgent first (oldest first among equals).",
                    ),
                    **_problems(400, *GUARDED_PROBLEMS),
                },
            }
        },
        "/worklist": {
            "get": {
                "tags": ["worklist"],
                "parameters": _page("at most 1000", MAX_PAGE, MAX_OFFSET),
                "responses": {
                    "200": _json(
                        {"type": "array", "items": _ref("WorklistEntry")},
                        "Studies, most urgent first.",
                    ),
                    **_problems(400, *GUARDED_PROBLEMS),
                },
            }
        },
        "/healthz": {
            "get": {
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "Healthy."),
                    "503": _json({"type": "object"}, "A check failed; the body says which."),
                },
            }
        },
        "/readyz": {
            "get": {
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": _json(_READINESS, "Accepting associations."),
                    "503": _json(
                        _READINESS, "Not accepting associations: draining, or not listening."
                    ),
                },
            }
        },
        "/livez": {
            "get": {
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": _json(_LIVENESS, "The DICOM port serves, or the gateway drains."),
                    "503": _json(_LIVENESS, "The DICOM port no longer serves: restart it."),
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["operations"],
                "security": [],
                "responses": {"200": _json({"type": "object"}, "This document.")},
            }
        },
    }
    # Requests are described as they are parsed, answers as they are written.
    schemas = {
        **_models([Job, WorklistEntry, Problem, ExportReport], "serialization"),
        **_models(
            [ClaimRequest, ExtendRequest, CompleteRequest, FailRequest, ExportRequest],
            "validation",
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "telerad gateway",
            "version": __version__,
            "description": "DICOMweb (STOW-RS, QIDO-RS, WADO-RS), the job API for inference "
            "workers, the worklist, and operations endpoints of one imaging site.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`<namespace>.<secret>` from the site's token Secret.",
                }
            },
            "schemas": {**schemas, **DICOM_JSON},
        },
    }
