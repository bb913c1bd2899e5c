"""Request and response bodies of the HTTP API (``/v1``).

Checks that need no model metadata live here, as pydantic validators; checks
against a model's input shape and class count live in :mod:`monitor.api`.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

# How far the probabilities of one prediction may sum from 1.
PROBABILITY_SUM_TOLERANCE = 1e-3
MAX_INPUT_DIMENSIONS = 8

Identifier = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InputArray(_Body):
    """A float array given inline: its shape and its values in C order, as JSON numbers or as base64 float32 bytes.

    ``data_base64`` carries the little-endian float32 bytes of the values,
    base64 encoded with the standard alphabet and padding (RFC 4648,
    section 4). The server stores float32 either way, so both forms of the
    same values are the same prediction. Decoding base64 costs far less than
    parsing tens of thousands of decimal numbers.
    """

    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=MAX_INPUT_DIMENSIONS)
    data: list[float] | None = Field(None, description="The values as JSON numbers. Give this or 'data_base64'.")
    data_base64: str | None = Field(
        None,
        description="The values as little-endian float32 bytes in standard base64 with padding. Give this or 'data'.",
        json_schema_extra={"contentEncoding": "base64"},
    )

    @model_validator(mode="after")
    def _size_matches_shape(self) -> InputArray:
        expected = math.prod(self.shape)
        if (self.data is None) == (self.data_base64 is None):
            raise ValueError("give exactly one of 'data' and 'data_base64'")
        if self.data is not None and len(self.data) != expected:
            raise ValueError(f"data has {len(self.data)} values, expected {expected} for shape {self.shape}")
        if self.data_base64 is not None and len(self.data_base64) != base64_length(4 * expected):
            raise ValueError(
                f"data_base64 has {len(self.data_base64)} characters, expected {base64_length(4 * expected)}"
                f" for {expected} float32 values (shape {self.shape}): encode 4 bytes per value (float32,"
                " not float64) in standard base64 with '=' padding and no line breaks"
            )
        return self

    @property
    def size(self) -> int:
        """Number of values, from the shape."""
        return math.prod(self.shape)


def base64_length(num_bytes: int) -> int:
    """Length of the padded standard base64 text of ``num_bytes`` bytes."""
    return 4 * ((num_bytes + 2) // 3)


class PredictionIn(_Body):
    """One prediction as the serving application reports it."""

    prediction_id: Identifier
    model_version: Identifier | None = Field(None, description="Defaults to the model's current version.")
    timestamp: AwareDatetime | None = Field(None, description="When the prediction was made; defaults to receipt time.")
    predicted_class: int = Field(ge=0)
    probabilities: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(
        None, description="Class probabilities, summing to 1; give these or 'confidence'."
    )
    confidence: float | None = Field(None, ge=0.0, le=1.0, description="Probability of the predicted class.")
    input: InputArray

    @model_validator(mode="after")
    def _probabilities_consistent(self) -> PredictionIn:
        if self.probabilities is None:
            if self.confidence is None:
                raise ValueError("give 'probabilities' or 'confidence'; both are missing")
            return self
        total = sum(self.probabilities)
        if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
            raise ValueError(f"probabilities sum to {total:.6g}, expected 1 within {PROBABILITY_SUM_TOLERANCE}")
        if self.predicted_class >= len(self.probabilities):
            raise ValueError(
                f"predicted_class {self.predicted_class} is out of range for {len(self.probabilities)} probabilities"
            )
        implied = self.probabilities[self.predicted_class]
        if self.confidence is not None and abs(self.confidence - implied) > PROBABILITY_SUM_TOLERANCE:
            raise ValueError(
                f"confidence {self.confidence} differs from probabilities[{self.predicted_class}] = {implied}"
            )
        return self

    @property
    def effective_confidence(self) -> float:
        if self.probabilities is not None:
            return self.probabilities[self.predicted_class]
        assert self.confidence is not None
        return self.confidence


class PredictionBatch(_Body):
    predictions: list[PredictionIn] = Field(min_length=1)


class LabelIn(_Body):
    prediction_id: Identifier
    label: int = Field(ge=0)


class LabelBatch(_Body):
    labels: list[LabelIn] = Field(min_length=1)


class WriteResult(BaseModel):
    """Outcome of a committed write: new rows and repeats of stored rows."""

    accepted: int
    duplicates: int


class FieldError(BaseModel):
    field: str
    message: str
    prediction_id: str | None = Field(
        None, description="The prediction_id of the item at fault, when the error names items by id (409, unknown labels)."
    )


class ErrorBody(BaseModel):
    detail: str
    errors: list[FieldError] = []


class Suspect(BaseModel):
    rank: int
    example_id: str
    score: float = Field(description="Predicted change of the incident's true-label loss if the example were removed.")
    rank_score: float | None = Field(None, description="The score the ranking sorts by (see the incident's score_kind).")
    label: int
    source: str
    content_hash: str


class IncidentSummary(BaseModel):
    id: int
    model: str
    model_version: str
    prediction_id: str
    state: str
    true_label: int
    predicted_class: int
    confidence: float
    opened_at: str
    updated_at: str


class SolverDiagnostics(BaseModel):
    iterations: int | None
    relative_residual: float | None
    converged: bool | None
    negative_curvature: bool | None = Field(description="True when CG met p.Hp <= 0: the damped Hessian is indefinite.")
    damping: float | None
    seconds: float | None
    method: str | None = Field(None, description="The inverse-HVP solver: 'cg', 'lissa' or 'factors'.")
    captured: float | None = Field(
        None, description="For 'factors', the share of the incident gradient's norm inside the factors' span."
    )

    def captured_note(self) -> str:
        """Return ", N% of the incident gradient inside the factors' span" for a factors solve, else ""."""
        # The factors solver inverts the Hessian only inside the factors' span.
        if self.method != "factors" or self.captured is None:
            return ""
        return f", {self.captured:.1%} of the incident gradient inside the factors' span"


class SourceInfluence(BaseModel):
    source: str
    total: float = Field(description="Sum of the source's scores: the predicted loss change if the whole source were removed.")
    count: int
    most_negative: float


class IncidentDetail(IncidentSummary):
    attempts: int
    failure_reason: str | None
    ranking_reliable: bool | None = Field(
        description="False when the inverse-HVP solve did not converge, met negative curvature or diverged."
    )
    score_kind: str | None = Field(None, description="How suspects are ranked: 'raw' or 'gradient-norm'.")
    solver: SolverDiagnostics
    input_shape: list[int]
    input: list[float]
    suspects: list[Suspect]
    source_influence: list[SourceInfluence] = Field(
        default_factory=list, description="The most harmful data sources, most negative total first."
    )


class Health(BaseModel):
    """Body of ``/healthz``: ``ok`` or ``unavailable`` with the reason, and this replica's scheduler role."""

    status: Literal["ok", "unavailable"]
    scheduler: Literal["running", "standby", "disabled"]
    reason: str | None = None
