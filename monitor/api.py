"""The HTTP API: ingestion of predictions and labels, incidents, metrics and health.

A write returns 200 only after its transaction has committed. A rejected
request stores nothing: every row of a batch is checked before any is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from monitor import pages, schemas
from monitor.config import Config
from monitor.metrics import Endpoint, Metrics, RejectReason
from storage import migrations, queries
from storage.models import Incident, IncidentState, ModelVersion, utcnow

logger = logging.getLogger(__name__)

API_VERSION = "v1"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ApiError(Exception):
    """A request the API rejects; becomes a JSON error body with ``status``."""

    def __init__(self, status: int, reason: RejectReason, detail: str, errors: list[schemas.FieldError] | None = None):
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.errors = errors or []


@dataclasses.dataclass
class ApiState:
    config: Config
    session_factory: sessionmaker[Session]
    metrics: Metrics
    scheduler_running: bool = False


def _endpoint_of(path: str) -> Endpoint | None:
    if path.endswith("/predictions"):
        return Endpoint.PREDICTIONS
    if path.endswith("/labels"):
        return Endpoint.LABELS
    return None


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


def create_app(state: ApiState) -> FastAPI:
    """Build the FastAPI application over ``state``; the caller runs it with uvicorn."""
    app = FastAPI(
        title="poisonwatch",
        version="0.1.0",
        description="Monitoring of JAX/Flax classifiers for targeted training-data poisoning.",
    )
    app.state.poisonwatch = state

    @app.middleware("http")
    async def observe_latency(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        # The route template, not the raw path, keeps the label set bounded;
        # requests that matched no route share one label value.
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        method = request.method if request.method in _KNOWN_METHODS else "other"
        state.metrics.http_request_duration.labels(
            route=template, method=method, status=f"{response.status_code // 100}xx"
        ).observe(time.perf_counter() - started)
        return response

    def reject(request: Request, error: ApiError) -> JSONResponse:
        endpoint = _endpoint_of(request.url.path)
        if endpoint is not None:
            state.metrics.requests_rejected.labels(endpoint=endpoint, reason=error.reason).inc()
        body = schemas.ErrorBody(detail=error.detail, errors=error.errors)
        return JSONResponse(status_code=error.status, content=body.model_dump())

    @app.exception_handler(ApiError)
    async def handle_api_error(request: Request, error: ApiError) -> JSONResponse:
        return reject(request, error)

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        malformed = any(problem.get("type") == "json_invalid" for problem in problems)
        fields = [
            schemas.FieldError(field=_field_name(tuple(problem.get("loc", ()))), message=problem.get("msg", ""))
            for problem in problems
        ]
        if malformed:
            detail = "request body is not valid JSON: " + "; ".join(field.message for field in fields)
            return reject(request, ApiError(400, RejectReason.MALFORMED, detail, fields))
        detail = "; ".join(f"{field.field}: {field.message}" for field in fields[:5])
        if len(fields) > 5:
            detail += f"; and {len(fields) - 5} more"
        return reject(request, ApiError(422, RejectReason.INVALID_FIELD, detail, fields))

    @app.exception_handler(SQLAlchemyError)
    async def handle_database_error(request: Request, error: SQLAlchemyError) -> JSONResponse:
        logger.error("database error on %s %s: %s", request.method, request.url.path, error.__class__.__name__, exc_info=error)
        return JSONResponse(
            status_code=503,
            content=schemas.ErrorBody(detail="database unavailable; retry later").model_dump(),
            headers={"Retry-After": "5"},
        )

    def model_version_for(session: Session, model: str, version: str | None, field: str) -> ModelVersion:
        if state.config.model(model) is None:
            raise ApiError(404, RejectReason.UNKNOWN_MODEL, f"model {model!r} not found")
        if version is None:
            current = queries.current_versions(session).get(model)
            if current is None:
                raise ApiError(404, RejectReason.UNKNOWN_MODEL, f"model {model!r} has no registered version yet")
            return current
        found = queries.find_version(session, model, version)
        if found is None:
            raise ApiError(
                422,
                RejectReason.UNKNOWN_VERSION,
                f"{field}: version {version!r} of model {model!r} not found",
                [schemas.FieldError(field=field, message="unknown model version")],
            )
        return found

    def prediction_record(index: int, item: schemas.PredictionIn, version: ModelVersion) -> queries.PredictionRecord:
        field = f"predictions[{index}]"

        expected_shape = list(version.input_shape)
        if item.input.shape != expected_shape:
            raise ApiError(
                422,
                RejectReason.WRONG_SHAPE,
                f"{field}.input.shape: got {item.input.shape}, expected {expected_shape} for model version {version.version}",
                [schemas.FieldError(field=f"{field}.input.shape", message=f"expected {expected_shape}")],
            )
        if len(item.input.data) > state.config.server.max_input_values:
            raise ApiError(
                422,
                RejectReason.INVALID_FIELD,
                f"{field}.input.data: {len(item.input.data)} values, at most {state.config.server.max_input_values} allowed",
            )
        if item.predicted_class >= version.num_classes:
            raise ApiError(
                422,
                RejectReason.INVALID_FIELD,
                f"{field}.predicted_class: {item.predicted_class} is out of range for {version.num_classes} classes",
                [schemas.FieldError(field=f"{field}.predicted_class", message=f"must be < {version.num_classes}")],
            )
        if item.probabilities is not None and len(item.probabilities) != version.num_classes:
            raise ApiError(
                422,
                RejectReason.INVALID_FIELD,
                f"{field}.probabilities: {len(item.probabilities)} values, expected {version.num_classes}",
                [schemas.FieldError(field=f"{field}.probabilities", message=f"expected {version.num_classes} values")],
            )

        input_data = np.asarray(item.input.data, dtype="<f4")
        if not np.isfinite(input_data).all():
            raise ApiError(422, RejectReason.INVALID_FIELD, f"{field}.input.data: values overflow float32")
        probabilities = None if item.probabilities is None else np.asarray(item.probabilities, dtype="<f4").tobytes()

        digest = hashlib.sha256(
            json.dumps(
                [
                    version.version,
                    item.predicted_class,
                    item.probabilities,
                    item.confidence,
                    item.input.shape,
                    item.timestamp.isoformat() if item.timestamp else None,
                ]
            ).encode()
        )
        digest.update(input_data.tobytes())
        return queries.PredictionRecord(
            prediction_id=item.prediction_id,
            model_version_id=version.id,
            predicted_class=item.predicted_class,
            confidence=float(item.effective_confidence),
            probabilities=probabilities,
            input_shape=item.input.shape,
            input_data=input_data.tobytes(),
            content_digest=digest.hexdigest(),
            predicted_at=item.timestamp or utcnow(),
        )

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
        responses={400: {"model": schemas.ErrorBody}, 404: {"model": schemas.ErrorBody}, 409: {"model": schemas.ErrorBody},
                   413: {"model": schemas.ErrorBody}, 422: {"model": schemas.ErrorBody}},
    )
    def ingest_predictions(model: str, batch: schemas.PredictionBatch) -> schemas.WriteResult:
        """Store a batch of predictions; idempotent by ``prediction_id``."""
        check_batch_size(len(batch.predictions), "predictions")

        def write() -> queries.WriteOutcome:
            with state.session_factory.begin() as session:
                versions: dict[str | None, ModelVersion] = {}
                records = []
                for index, item in enumerate(batch.predictions):
                    if item.model_version not in versions:
                        versions[item.model_version] = model_version_for(
                            session, model, item.model_version, f"predictions[{index}].model_version"
                        )
                    records.append(prediction_record(index, item, versions[item.model_version]))
                outcome = queries.insert_predictions(session, model, records)
                if not outcome.ok:
                    raise ApiError(
                        409,
                        RejectReason.CONFLICT,
                        "prediction_id already stored with different content: " + ", ".join(outcome.conflicts[:10]),
                        [schemas.FieldError(field="prediction_id", message=f"conflict: {pid}") for pid in outcome.conflicts[:10]],
                    )
                return outcome

        outcome = write_with_retry(write)
        state.metrics.predictions_ingested.labels(model=model).inc(outcome.accepted)
        return schemas.WriteResult(accepted=outcome.accepted, duplicates=outcome.duplicates)

    @app.post(
        f"/{API_VERSION}/models/{{model}}/labels",
        response_model=schemas.WriteResult,
        responses={400: {"model": schemas.ErrorBody}, 404: {"model": schemas.ErrorBody}, 409: {"model": schemas.ErrorBody},
                   413: {"model": schemas.ErrorBody}, 422: {"model": schemas.ErrorBody}},
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
                    raise ApiError(
                        422,
                        RejectReason.UNKNOWN_PREDICTION,
                        f"labels reference predictions not found for model {model!r}: " + ", ".join(outcome.unknown[:10]),
                        [schemas.FieldError(field="prediction_id", message=f"not found: {pid}") for pid in outcome.unknown[:10]],
                    )
                if outcome.conflicts:
                    raise ApiError(
                        409,
                        RejectReason.CONFLICT,
                        "prediction already has a different label: " + ", ".join(outcome.conflicts[:10]),
                        [schemas.FieldError(field="label", message=f"conflict: {pid}") for pid in outcome.conflicts[:10]],
                    )
                return outcome

        outcome = write_with_retry(write)
        state.metrics.labels_ingested.labels(model=model).inc(outcome.accepted)
        return schemas.WriteResult(accepted=outcome.accepted, duplicates=outcome.duplicates)

    @app.get(f"/{API_VERSION}/incidents", response_model=list[schemas.IncidentSummary])
    def list_incidents(
        state_filter: IncidentState | None = Query(None, alias="state"),
        model: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> list[schemas.IncidentSummary]:
        """List incidents, newest first."""
        with state.session_factory() as session:
            incidents = queries.list_incidents(session, state=state_filter, model=model, limit=limit, offset=offset)
            return [incident_summary(incident) for incident in incidents]

    @app.get(
        f"/{API_VERSION}/incidents/{{incident_id}}",
        response_model=schemas.IncidentDetail,
        responses={404: {"model": schemas.ErrorBody}},
    )
    def get_incident(incident_id: int) -> schemas.IncidentDetail | JSONResponse:
        """Show one incident with its input, solver diagnostics and top-k suspects."""
        with state.session_factory() as session:
            incident = queries.get_incident(session, incident_id)
            if incident is None:
                return JSONResponse(
                    status_code=404, content=schemas.ErrorBody(detail=f"incident {incident_id} not found").model_dump()
                )
            return incident_detail(incident)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """Report whether the database is reachable and migrated; 503 with the reason when not."""
        try:
            with state.session_factory() as session:
                session.execute(text("SELECT 1"))
                revision = migrations.current_revision(session.get_bind())
        except SQLAlchemyError as error:
            return JSONResponse(
                status_code=503,
                content={"status": "unavailable", "reason": f"database unreachable: {error.__class__.__name__}"},
                headers={"Retry-After": "5"},
            )
        expected = migrations.head_revision()
        if revision != expected:
            return JSONResponse(
                status_code=503,
                content={"status": "unavailable", "reason": f"database schema at {revision}, expected {expected}"},
            )
        return JSONResponse({"status": "ok", "scheduler": "running" if state.scheduler_running else "stopped"})

    app.include_router(pages.build_router(state.session_factory))
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
        ranking_reliable=incident.solver_converged,
        solver=schemas.SolverDiagnostics(
            iterations=incident.solver_iterations,
            relative_residual=_finite_or_none(incident.solver_residual),
            converged=incident.solver_converged,
            negative_curvature=incident.solver_negative_curvature,
            damping=incident.solver_damping,
            seconds=incident.analysis_seconds,
        ),
        input_shape=incident.prediction.input_shape,
        input=[float(value) for value in values],
        suspects=[
            schemas.Suspect(
                rank=suspect.rank,
                example_id=suspect.training_example.example_id,
                score=suspect.score,
                label=suspect.training_example.label,
                source=suspect.training_example.source,
                content_hash=suspect.training_example.content_hash,
            )
            for suspect in incident.suspects
        ],
    )


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
