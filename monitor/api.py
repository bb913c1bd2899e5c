"""The HTTP API: ingestion of predictions and labels, incidents, metrics and health.

A write returns 200 only after its transaction has committed. A rejected
request stores nothing: every row of a batch is checked before any is written.
While the database is unreachable every route that needs it returns 503 with
``Retry-After``. Writes and incident actions need a bearer token whenever
:class:`monitor.auth.TokenVerifier` requires one.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from monitor import pages, schemas
from monitor.auth import TokenVerifier
from monitor.config import Config
from monitor.metrics import Endpoint, Metrics, RejectReason
from storage import migrations, queries
from storage.db import describe_database_error
from storage.models import Incident, IncidentState, utcnow

logger = logging.getLogger(__name__)

API_VERSION = "v1"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds a client should wait before retrying while the database is unreachable.
RETRY_AFTER_SECONDS = 5
# Largest id a path or query parameter accepts: the range of a BIGINT column.
MAX_ID = 2**63 - 1


class ApiError(Exception):
    """A request the API rejects; becomes a JSON error body with ``status``.

    ``reason`` labels the rejection counter of the ingestion endpoints; None
    for rejections that counter has no reason for.
    """

    def __init__(
        self,
        status: int,
        reason: RejectReason | None,
        detail: str,
        errors: list[schemas.FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.errors = errors or []
        self.headers = headers


@dataclasses.dataclass
class ApiState:
    config: Config
    session_factory: sessionmaker[Session]
    metrics: Metrics
    scheduler_running: bool = False
    auth: TokenVerifier = dataclasses.field(default_factory=lambda: TokenVerifier([], required=False))


class BodySizeLimit:
    """ASGI middleware that rejects request bodies over ``max_bytes`` with a 413.

    A declared ``Content-Length`` over the limit is rejected before the body
    is read. A chunked body is counted as it arrives and rejected when it
    crosses the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return

        received = 0
        rejected = False

        async def counting_receive() -> Message:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not rejected:
                    rejected = True
                    await self._reject(scope, receive, send)
                    # The application receives a disconnect and stops reading the body.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            # After the 413 is sent, any response the application sends is dropped.
            if not rejected:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(status_code=413, content=schemas.ErrorBody(detail=self._detail()).model_dump())
        await response(scope, receive, send)

    def _detail(self) -> str:
        return f"request body over {self.max_bytes} bytes; send smaller batches or raise [server] max_body_bytes"


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": schemas.ErrorBody} for code in codes}


def _endpoint_of(path: str) -> Endpoint | None:
    if path.endswith("/predictions"):
        return Endpoint.PREDICTIONS
    if path.endswith("/labels"):
        return Endpoint.LABELS
    return None


class LatencyMiddleware:
    """ASGI middleware that observes each HTTP request's wall time in ``histogram``.

    The labels are the matched route template, the method and the status
    class. The template, not the raw path, keeps the label set bounded, and
    unmatched requests share one value. Starlette's ``BaseHTTPMiddleware``
    would wrap the request and response streams, which costs time on large
    bodies, so this is a plain ASGI middleware.
    """

    def __init__(self, app: Any, histogram: Any) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_recording_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            # The router stores the matched route in this same scope dict.
            template = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in _KNOWN_METHODS else "other"
            self.histogram.labels(route=template, method=method, status=f"{status // 100}xx").observe(
                time.perf_counter() - started
            )


def freeze_startup_objects() -> None:
    """Exclude every object alive now from the cyclic garbage collector's future scans.

    Call once, after start-up has loaded models, modules and compiled functions
    that live as long as the process. Full collections then scan only what
    requests allocate; on the ingestion benchmark they took 4 to 6 ms of each
    500-prediction batch without this.
    """
    gc.collect()
    gc.freeze()


# Ids named in one error body; a batch may hold thousands.
MAX_IDS_IN_ERROR = 10


def _id_list_error(
    status: int, reason: RejectReason, summary: str, field: str, problem: str, ids: list[str]
) -> ApiError:
    """Build the error for a batch whose items ``ids`` all fail the same way, naming the first few."""
    shown = ids[:MAX_IDS_IN_ERROR]
    return ApiError(
        status,
        reason,
        f"{summary}: " + ", ".join(shown),
        [
            schemas.FieldError(field=field, message=f"{problem}: {prediction_id}", prediction_id=prediction_id)
            for prediction_id in shown
        ],
    )


def _plain_message(problem: dict[str, Any]) -> str:
    # Errors raised by our validators carry pydantic's "Value error, " prefix.
    message = str(problem.get("msg", ""))
    return message.removeprefix("Value error, ")


def _field_name(location: tuple[Any, ...]) -> str:
    parts = [str(part) for part in location if part != "body"]
    name = ""
    for part in parts:
        if part.isdigit():
            name += f"[{part}]"
        elif name:
            name += f".{part}"
        else:
            name = part
    return name or "body"


# The predictions endpoint reads its body itself (see parse_prediction_batch),
# so FastAPI does not see a body parameter; this declares it in the OpenAPI
# document. _document_prediction_batch adds the referenced schema.
_PREDICTION_BATCH_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionBatch"}}},
    }
}


def _document_prediction_batch(app: FastAPI) -> None:
    """Make ``app.openapi()`` list ``PredictionBatch`` and the models it nests under ``components/schemas``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            batch_schema = schemas.PredictionBatch.model_json_schema(ref_template="#/components/schemas/{model}")
            components = document.setdefault("components", {}).setdefault("schemas", {})
            components.update(batch_schema.pop("$defs", {}))
            components["PredictionBatch"] = batch_schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _is_json_media_type(content_type: str | None) -> bool:
    # The media types FastAPI parses as JSON for a declared body: application/json and application/*+json.
    if not content_type:
        return False
    media_type = content_type.partition(";")[0].strip().lower()
    main_type, _, subtype = media_type.partition("/")
    return main_type == "application" and (subtype == "json" or subtype.endswith("+json"))


def parse_prediction_batch(content_type: str | None, body: bytes) -> schemas.PredictionBatch:
    """Parse and validate a predictions request body in one pass of pydantic-core's JSON parser.

    This takes about a third of the time of ``json.loads`` followed by
    validation of the Python objects, which is what FastAPI does for a declared
    body. Errors are raised as :class:`RequestValidationError` with ``body``
    first in each location, as FastAPI raises them, so the validation error
    handler returns 400 for malformed JSON and 422 for an invalid field.
    """
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    if not _is_json_media_type(content_type):
        raise ApiError(
            422,
            RejectReason.INVALID_FIELD,
            f"body: content type {content_type!r} is not JSON; send 'Content-Type: application/json'",
            [schemas.FieldError(field="body", message="expected content type application/json")],
        )
    try:
        return schemas.PredictionBatch.model_validate_json(body)
    except ValidationError as error:
        problems = error.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**problem, "loc": ("body", *problem["loc"])} for problem in problems]) from None


def _json_error_message(problem: dict[str, Any]) -> str:
    message = str(problem.get("msg", "")).removeprefix("Invalid JSON: ")
    location = problem.get("loc", ())
    # FastAPI's own parser (json.loads) gives a character offset as the last
    # location; pydantic-core's parser puts line and column in the message.
    if location and isinstance(location[-1], int):
        return f"{message} at character {location[-1]}"
    return message


@dataclasses.dataclass(frozen=True)
class _Float32Arrays:
    """Arrays of one batch converted to little-endian float32 together: each array's bytes and whether it is all finite.

    An array whose base64 text does not decode has ``None`` as its bytes and
    the decoder's message in ``errors``.
    """

    data: list[bytes | None]
    finite: list[bool]
    errors: dict[int, str] = dataclasses.field(default_factory=dict)


def _to_float32(arrays: Sequence[Sequence[float]]) -> _Float32Arrays:
    """Convert every array of a batch to float32 in one NumPy pass instead of one call per array.

    A value beyond the float32 range becomes infinity, so its array is marked
    not finite. Every array must have at least one value.
    """
    if not arrays:
        return _Float32Arrays(data=[], finite=[])
    lengths = [len(array) for array in arrays]
    with np.errstate(over="ignore"):
        values = np.fromiter(itertools.chain.from_iterable(arrays), dtype="<f4", count=sum(lengths))
    return _split_float32(values, lengths)


def _split_float32(values: np.ndarray, lengths: list[int]) -> _Float32Arrays:
    """Cut the float32 ``values`` of several arrays, laid end to end, into each array's bytes and finiteness."""
    ends = list(itertools.accumulate(lengths))
    starts = [end - length for end, length in zip(ends, lengths)]
    buffer = values.tobytes()
    data: list[bytes | None] = [buffer[4 * start : 4 * end] for start, end in zip(starts, ends)]
    finite_values = np.isfinite(values)
    if finite_values.all():
        finite = [True] * len(lengths)
    else:
        finite = np.logical_and.reduceat(finite_values, starts).tolist()
    return _Float32Arrays(data=data, finite=finite)


def _inputs_to_float32(inputs: Sequence[schemas.InputArray]) -> _Float32Arrays:
    """Convert the inputs of a batch to float32 bytes, whether given as JSON numbers or as base64.

    Numbers go through one NumPy pass, as in :func:`_to_float32`. Base64
    text is decoded strictly (standard alphabet, exact padding) and must
    give four bytes per value of the shape.
    """
    numbers = _to_float32([array.data for array in inputs if array.data is not None])
    numbers_data = iter(numbers.data)
    numbers_finite = iter(numbers.finite)
    data: list[bytes | None] = []
    finite: list[bool] = []
    errors: dict[int, str] = {}
    decoded_at: list[int] = []
    for index, array in enumerate(inputs):
        if array.data is not None:
            data.append(next(numbers_data))
            finite.append(next(numbers_finite))
            continue
        finite.append(True)
        try:
            decoded = binascii.a2b_base64(array.data_base64, strict_mode=True)
        except binascii.Error as error:
            data.append(None)
            errors[index] = f"not valid base64: {error}; use the standard alphabet (A-Z, a-z, 0-9, '+', '/') with '=' padding"
            continue
        if len(decoded) != 4 * array.size:
            data.append(None)
            errors[index] = f"decodes to {len(decoded)} bytes, expected {4 * array.size} for shape {array.shape}"
            continue
        data.append(decoded)
        decoded_at.append(index)
    if decoded_at:
        # One finiteness check covers every decoded value. Arrays are checked one by one only when a value is not finite.
        finite_values = np.isfinite(np.frombuffer(b"".join(data[index] for index in decoded_at), dtype="<f4"))
        if not finite_values.all():
            lengths = [inputs[index].size for index in decoded_at]
            starts = list(itertools.accumulate([0, *lengths[:-1]]))
            for index, is_finite in zip(decoded_at, np.logical_and.reduceat(finite_values, starts).tolist()):
                finite[index] = is_finite
    return _Float32Arrays(data=data, finite=finite, errors=errors)


@dataclasses.dataclass(frozen=True)
class _TargetVersion:
    """The model version a prediction is checked against, read once per batch."""

    id: int
    name: str
    input_shape: list[int]
    num_classes: int

    @functools.cached_property
    def digest_prefix(self) -> str:
        """The start of every digest header of this version, up to the predicted class."""
        return "[" + json.dumps(self.name) + ", "

    @functools.cached_property
    def shape_text(self) -> str:
        return json.dumps(self.input_shape)


def _input_field(index: int, item: schemas.PredictionIn) -> str:
    """Name the field that carries the values of item ``index``'s input, as error messages spell it."""
    return f"predictions[{index}].input.data" if item.input.data is not None else f"predictions[{index}].input.data_base64"


def _invalid_field(field: str, problem: str, summary: str, *, reason: RejectReason = RejectReason.INVALID_FIELD) -> ApiError:
    """Build the 422 for one invalid field: ``problem`` in the detail, ``summary`` in its entry of ``errors``."""
    return ApiError(422, reason, f"{field}: {problem}", [schemas.FieldError(field=field, message=summary)])


def _content_digest(
    version: _TargetVersion, item: schemas.PredictionIn, probabilities: bytes | None, input_data: bytes
) -> str:
    """Compute the SHA-256 hex digest of the fields that make two reports of one prediction the same.

    The scalar fields enter as the ``json.dumps`` text of the list
    ``[version, predicted_class, confidence, input shape, timestamp in ISO
    8601 or null, whether probabilities are given]``, then the probabilities
    and the input as the float32 bytes that are stored. Their lengths follow
    from the version's class count and the input shape in the text, so the
    parts cannot run into each other.

    The header is put together from pieces instead of calling ``json.dumps``
    for each row, which cost about 1 ms per batch of 500 in a profile of
    ``benchmarks/ingest.py``. The pieces give the same text: the input shape
    equals the version's (checked before), integers and finite floats print
    as their ``repr``, and an ISO 8601 timestamp contains no character that
    JSON escapes. ``test_content_digest_header_matches_json`` compares both
    texts.

    Stored digests depend on this exact formula. A change would turn every
    client retry of a prediction stored before it into a 409 conflict.
    """
    confidence = "null" if item.confidence is None else repr(item.confidence)
    timestamp = "null" if item.timestamp is None else '"' + item.timestamp.isoformat() + '"'
    has_probabilities = "false" if probabilities is None else "true"
    header = (
        f"{version.digest_prefix}{item.predicted_class!r}, {confidence}, {version.shape_text}, {timestamp},"
        f" {has_probabilities}]"
    )
    if probabilities is None:
        return hashlib.sha256(header.encode() + input_data).hexdigest()
    return hashlib.sha256(header.encode() + probabilities + input_data).hexdigest()


def create_app(state: ApiState) -> FastAPI:
    """Build the FastAPI application over ``state``; the caller runs it with uvicorn."""
    app = FastAPI(
        title="poisonwatch",
        version="0.1.0",
        description="Monitoring of JAX/Flax classifiers for targeted training-data poisoning.",
    )
    app.state.poisonwatch = state

    app.add_middleware(LatencyMiddleware, histogram=state.metrics.http_request_duration)

    def reject(request: Request, error: ApiError) -> JSONResponse:
        endpoint = _endpoint_of(request.url.path)
        if endpoint is not None and error.reason is not None:
            state.metrics.requests_rejected.labels(endpoint=endpoint, reason=error.reason).inc()
        body = schemas.ErrorBody(detail=error.detail, errors=error.errors)
        return JSONResponse(status_code=error.status, content=body.model_dump(exclude_none=True), headers=error.headers)

    @app.exception_handler(ApiError)
    async def handle_api_error(request: Request, error: ApiError) -> JSONResponse:
        return reject(request, error)

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        malformed = any(problem.get("type") == "json_invalid" for problem in problems)
        if malformed:
            # For invalid JSON the location is a character offset or nothing, not a field.
            fields = [schemas.FieldError(field="body", message=_json_error_message(problem)) for problem in problems]
            detail = "request body is not valid JSON: " + "; ".join(field.message for field in fields)
            return reject(request, ApiError(400, RejectReason.MALFORMED, detail, fields))
        fields = [
            schemas.FieldError(field=_field_name(tuple(problem.get("loc", ()))), message=_plain_message(problem))
            for problem in problems
        ]
        detail = "; ".join(f"{field.field}: {field.message}" for field in fields[:5])
        if len(fields) > 5:
            detail += f"; and {len(fields) - 5} more"
        return reject(request, ApiError(422, RejectReason.INVALID_FIELD, detail, fields))

    @app.exception_handler(SQLAlchemyError)
    async def handle_database_error(request: Request, error: SQLAlchemyError) -> JSONResponse:
        # The summary names the driver error with the password masked; no traceback,
        # because an outage produces one line per request.
        logger.error(
            "database error on %s %s: %s",
            request.method,
            request.url.path,
            describe_database_error(error, state.config.database.url),
        )
        return JSONResponse(
            status_code=503,
            content=schemas.ErrorBody(detail="database unavailable; retry later").model_dump(),
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    bearer = HTTPBearer(
        auto_error=False,
        description="A token whose SHA-256 digest is in [server] token_sha256; needed for writes "
        "when the server binds to a non-loopback address or has tokens configured.",
    )

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        token = credentials.credentials if credentials is not None else None
        if not state.auth.accepts(token):
            detail = "missing bearer token" if token is None else "invalid bearer token"
            raise ApiError(
                401,
                None,
                f"{detail}: send 'Authorization: Bearer TOKEN' with a token from 'poisonwatch token create'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def model_version_for(session: Session, model: str, version: str | None, field: str) -> _TargetVersion:
        if state.config.model(model) is None:
            raise ApiError(404, RejectReason.UNKNOWN_MODEL, f"model {model!r} not found")
        found = queries.version_fields(session, model, version)
        if found is None and version is None:
            raise ApiError(404, RejectReason.UNKNOWN_MODEL, f"model {model!r} has no registered version yet")
        if found is None:
            raise ApiError(
                422,
                RejectReason.UNKNOWN_VERSION,
                f"{field}: version {version!r} of model {model!r} not found",
                [schemas.FieldError(field=field, message="unknown model version")],
            )
        return _TargetVersion(found.id, found.version, list(found.input_shape), found.num_classes)

    def check_prediction(
        index: int, item: schemas.PredictionIn, version: _TargetVersion, input_finite: bool, input_error: str | None
    ) -> None:
        # Field names are built only for an error, because this runs for every item of every batch.
        if item.input.shape != version.input_shape:
            raise _invalid_field(
                f"predictions[{index}].input.shape",
                f"got {item.input.shape}, expected {version.input_shape} for model version {version.name}",
                f"expected {version.input_shape}",
                reason=RejectReason.WRONG_SHAPE,
            )
        if item.input.size > state.config.server.max_input_values:
            raise ApiError(
                422,
                RejectReason.INVALID_FIELD,
                f"{_input_field(index, item)}: {item.input.size} values,"
                f" at most {state.config.server.max_input_values} allowed",
            )
        if item.predicted_class >= version.num_classes:
            raise _invalid_field(
                f"predictions[{index}].predicted_class",
                f"{item.predicted_class} is out of range for {version.num_classes} classes",
                f"must be < {version.num_classes}",
            )
        if item.probabilities is not None and len(item.probabilities) != version.num_classes:
            raise _invalid_field(
                f"predictions[{index}].probabilities",
                f"{len(item.probabilities)} values, expected {version.num_classes}",
                f"expected {version.num_classes} values",
            )
        if input_error is not None:
            raise _invalid_field(_input_field(index, item), input_error, input_error)
        if not input_finite:
            problem = "values overflow float32" if item.input.data is not None else "values are not finite"
            raise _invalid_field(_input_field(index, item), problem, problem)

    def prediction_rows(
        session: Session, model: str, items: Sequence[schemas.PredictionIn], inputs: _Float32Arrays, probabilities: _Float32Arrays
    ) -> list[dict[str, Any]]:
        """Check each item against its model version and build its ``predictions`` row, in item order.

        ``inputs`` contains every item's input and ``probabilities`` the
        probabilities of the items that have them, both in item order. The
        first invalid item raises :class:`ApiError`.
        """
        received_at = utcnow()
        versions: dict[str | None, _TargetVersion] = {}
        probability_data = iter(probabilities.data)
        rows = []
        for index, item in enumerate(items):
            version = versions.get(item.model_version)
            if version is None:
                version = model_version_for(session, model, item.model_version, f"predictions[{index}].model_version")
                versions[item.model_version] = version
            check_prediction(index, item, version, inputs.finite[index], inputs.errors.get(index))
            input_data = inputs.data[index]
            item_probabilities = None if item.probabilities is None else next(probability_data)
            rows.append(
                {
                    "model": model,
                    "prediction_id": item.prediction_id,
                    "model_version_id": version.id,
                    "predicted_class": item.predicted_class,
                    "confidence": float(item.effective_confidence),
                    "probabilities": item_probabilities,
                    "input_shape": item.input.shape,
                    "input_data": input_data,
                    "content_digest": _content_digest(version, item, item_probabilities, input_data),
                    "predicted_at": item.timestamp or received_at,
                    "received_at": received_at,
                }
            )
        return rows

    def check_batch_size(size: int, what: str) -> None:
        limit = state.config.server.max_batch_size
        if size > limit:
            raise ApiError(413, RejectReason.OVERSIZE_BATCH, f"{what}: {size} items, at most {limit} per request")

    def write_with_retry(write):
        # When two requests race to insert the same new id, the loser's commit
        # fails on the unique constraint. One retry then finds the stored row.
        try:
            return write()
        except IntegrityError:
            logger.info("unique-constraint race on write; retrying once")
            return write()

    @app.post(
        f"/{API_VERSION}/models/{{model}}/predictions",
        response_model=schemas.WriteResult,
        responses=_error_responses(400, 401, 404, 409, 413, 422, 503),
        dependencies=[Depends(require_token)],
        openapi_extra=_PREDICTION_BATCH_REQUEST_BODY,
    )
    async def ingest_predictions(model: str, request: Request) -> schemas.WriteResult:
        """Store a batch of predictions; idempotent by ``prediction_id``."""
        try:
            body = await request.body()
        except ClientDisconnect:
            # Also raised after BodySizeLimit has sent its 413, which then drops this response.
            raise ApiError(400, None, "request body incomplete: the client disconnected") from None
        # Parsing, checks and the write share one worker thread, so the event
        # loop stays free and the request makes one threadpool hop.
        return await run_in_threadpool(store_predictions, model, request.headers.get("content-type"), body)

    def store_predictions(model: str, content_type: str | None, body: bytes) -> schemas.WriteResult:
        batch = parse_prediction_batch(content_type, body)
        check_batch_size(len(batch.predictions), "predictions")
        inputs = _inputs_to_float32([item.input for item in batch.predictions])
        probabilities = _to_float32([item.probabilities for item in batch.predictions if item.probabilities is not None])

        def write(check_stored: bool = True) -> queries.WriteOutcome:
            with state.session_factory.begin() as session:
                rows = prediction_rows(session, model, batch.predictions, inputs, probabilities)
                outcome = queries.insert_prediction_rows(session, model, rows, check_stored=check_stored)
                if not outcome.ok:
                    raise _id_list_error(
                        409,
                        RejectReason.CONFLICT,
                        "prediction_id already stored, or repeated in this batch, with different content",
                        "prediction_id",
                        "conflict",
                        outcome.conflicts,
                    )
                return outcome

        try:
            # Nearly every batch is new, so the first attempt inserts without
            # looking for stored ids. A repeat fails on the unique constraint,
            # rolls the whole batch back, and the checked write sorts repeats
            # from conflicts.
            outcome = write(check_stored=False)
        except IntegrityError:
            outcome = write_with_retry(write)
        state.metrics.predictions_ingested.labels(model=model).inc(outcome.accepted)
        return schemas.WriteResult(accepted=outcome.accepted, duplicates=outcome.duplicates)

    @app.post(
        f"/{API_VERSION}/models/{{model}}/labels",
        response_model=schemas.WriteResult,
        responses=_error_responses(400, 401, 404, 409, 413, 422, 503),
        dependencies=[Depends(require_token)],
    )
    def ingest_labels(model: str, batch: schemas.LabelBatch) -> schemas.WriteResult:
        """Attach ground-truth labels to stored predictions; idempotent by ``prediction_id``."""
        check_batch_size(len(batch.labels), "labels")

        def write() -> queries.WriteOutcome:
            with state.session_factory.begin() as session:
                version = model_version_for(session, model, None, "model")
                for index, item in enumerate(batch.labels):
                    if item.label >= version.num_classes:
                        raise ApiError(
                            422,
                            RejectReason.INVALID_FIELD,
                            f"labels[{index}].label: {item.label} is out of range for {version.num_classes} classes",
                            [schemas.FieldError(field=f"labels[{index}].label", message=f"must be < {version.num_classes}")],
                        )
                outcome = queries.insert_labels(session, model, [(item.prediction_id, item.label) for item in batch.labels])
                if outcome.unknown:
                    raise _id_list_error(
                        422,
                        RejectReason.UNKNOWN_PREDICTION,
                        f"labels reference predictions not found for model {model!r}",
                        "prediction_id",
                        "not found",
                        outcome.unknown,
                    )
                if outcome.conflicts:
                    raise _id_list_error(
                        409,
                        RejectReason.CONFLICT,
                        "prediction already has a different label",
                        "label",
                        "conflict",
                        outcome.conflicts,
                    )
                return outcome

        outcome = write_with_retry(write)
        state.metrics.labels_ingested.labels(model=model).inc(outcome.accepted)
        return schemas.WriteResult(accepted=outcome.accepted, duplicates=outcome.duplicates)

    @app.get(
        f"/{API_VERSION}/incidents",
        response_model=list[schemas.IncidentSummary],
        responses=_error_responses(422, 503),
    )
    def list_incidents(
        state_filter: IncidentState | None = Query(None, alias="state"),
        model: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=MAX_ID),
    ) -> list[schemas.IncidentSummary]:
        """List incidents, newest first."""
        with state.session_factory() as session:
            incidents = queries.list_incidents(session, state=state_filter, model=model, limit=limit, offset=offset)
            return [incident_summary(incident) for incident in incidents]

    @app.get(
        f"/{API_VERSION}/incidents/{{incident_id}}",
        response_model=schemas.IncidentDetail,
        responses=_error_responses(404, 422, 503),
    )
    def get_incident(incident_id: int = Path(ge=1, le=MAX_ID)) -> schemas.IncidentDetail | JSONResponse:
        """Show one incident with its input, solver diagnostics and top-k suspects."""
        with state.session_factory() as session:
            incident = queries.get_incident(session, incident_id)
            if incident is None:
                return JSONResponse(
                    status_code=404, content=schemas.ErrorBody(detail=f"incident {incident_id} not found").model_dump()
                )
            return incident_detail(incident)

    def act_on_incident(incident_id: int, action, verb: str) -> schemas.IncidentSummary:
        with state.session_factory.begin() as session:
            outcome, incident = action(session, incident_id)
            if outcome == queries.TransitionOutcome.NOT_FOUND:
                raise ApiError(404, None, f"incident {incident_id} not found")
            if outcome == queries.TransitionOutcome.INVALID:
                raise ApiError(
                    409,
                    None,
                    f"incident {incident_id} is {incident.state.value}; only analyzed or failed incidents can be {verb}",
                )
            summary = incident_summary(incident)
        if outcome == queries.TransitionOutcome.CHANGED:
            logger.info("incident %d %s", incident_id, verb)
        return summary

    @app.post(
        f"/{API_VERSION}/incidents/{{incident_id}}/acknowledge",
        response_model=schemas.IncidentSummary,
        responses=_error_responses(401, 404, 409, 413, 422, 503),
        dependencies=[Depends(require_token)],
    )
    def acknowledge_incident(incident_id: int = Path(ge=1, le=MAX_ID)) -> schemas.IncidentSummary:
        """Acknowledge an analyzed or failed incident; repeating it changes nothing."""
        return act_on_incident(incident_id, queries.acknowledge_incident, "acknowledged")

    @app.post(
        f"/{API_VERSION}/incidents/{{incident_id}}/resolve",
        response_model=schemas.IncidentSummary,
        responses=_error_responses(401, 404, 413, 422, 503),
        dependencies=[Depends(require_token)],
    )
    def resolve_incident(incident_id: int = Path(ge=1, le=MAX_ID)) -> schemas.IncidentSummary:
        """Resolve an incident in any state; a running analysis of it then stores nothing."""
        return act_on_incident(incident_id, queries.resolve_incident, "resolved")

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
    def healthz() -> JSONResponse:
        """Report whether the database is reachable and migrated; 503 with the reason when not.

        ``scheduler`` is ``running`` in the replica that runs the jobs,
        ``standby`` in the others and ``disabled`` where the config turns it off.
        """
        if state.scheduler_running:
            scheduler = "running"
        else:
            scheduler = "standby" if state.config.scheduler.enabled else "disabled"
        try:
            with state.session_factory() as session:
                session.execute(text("SELECT 1"))
                revision = migrations.current_revision(session.get_bind())
        except SQLAlchemyError as error:
            reason = "database unreachable: " + describe_database_error(error, state.config.database.url)
            return JSONResponse(
                status_code=503,
                content=schemas.Health(status="unavailable", scheduler=scheduler, reason=reason).model_dump(),
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        expected = migrations.head_revision()
        if revision != expected:
            reason = f"database schema at {revision}, expected {expected}"
            return JSONResponse(
                status_code=503,
                content=schemas.Health(status="unavailable", scheduler=scheduler, reason=reason).model_dump(),
            )
        return JSONResponse(schemas.Health(status="ok", scheduler=scheduler).model_dump())

    _document_prediction_batch(app)
    app.include_router(pages.build_router(state.session_factory))
    app.add_middleware(BodySizeLimit, max_bytes=state.config.server.max_body_bytes)
    if state.config.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.config.server.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def incident_summary(incident: Incident) -> schemas.IncidentSummary:
    return schemas.IncidentSummary(
        id=incident.id,
        model=incident.model_version.model,
        model_version=incident.model_version.version,
        prediction_id=incident.prediction.prediction_id,
        state=incident.state.value,
        true_label=incident.true_label,
        predicted_class=incident.predicted_class,
        confidence=incident.confidence,
        opened_at=incident.opened_at.isoformat(),
        updated_at=incident.updated_at.isoformat(),
    )


def incident_detail(incident: Incident) -> schemas.IncidentDetail:
    summary = incident_summary(incident)
    values = np.frombuffer(incident.prediction.input_data, dtype="<f4")
    return schemas.IncidentDetail(
        **summary.model_dump(),
        attempts=incident.attempts,
        failure_reason=incident.failure_reason,
        ranking_reliable=incident.ranking_reliable if incident.ranking_reliable is not None else incident.solver_converged,
        score_kind=incident.score_kind,
        solver=schemas.SolverDiagnostics(
            iterations=incident.solver_iterations,
            relative_residual=_finite_or_none(incident.solver_residual),
            converged=incident.solver_converged,
            negative_curvature=incident.solver_negative_curvature,
            damping=incident.solver_damping,
            seconds=incident.analysis_seconds,
            method=incident.solver,
            captured=incident.solver_captured,
        ),
        input_shape=incident.prediction.input_shape,
        input=[float(value) for value in values],
        suspects=[
            schemas.Suspect(
                rank=suspect.rank,
                example_id=suspect.training_example.example_id,
                score=suspect.score,
                rank_score=suspect.rank_score,
                label=suspect.training_example.label,
                source=suspect.training_example.source,
                content_hash=suspect.training_example.content_hash,
            )
            for suspect in incident.suspects
        ],
        source_influence=[schemas.SourceInfluence.model_validate(source) for source in incident.source_influence or []],
    )


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
