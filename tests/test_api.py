"""Ingestion API: bad input is rejected with a named field and stores nothing; repeats are idempotent."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from types import SimpleNamespace

import hypothesis
import hypothesis.strategies as st

import numpy as np
import pytest
from sqlalchemy import func, select

from monitor import cli
from monitor.api import ApiState, _content_digest, _TargetVersion
from storage import queries
from storage.models import Incident, IncidentState, Label, Prediction
from tests.conftest import INPUT_SHAPE, MODEL, NUM_CLASSES, VERSION

PREDICTIONS = f"/v1/models/{MODEL}/predictions"
LABELS = f"/v1/models/{MODEL}/labels"


def prediction(prediction_id: str = "p-1", **overrides) -> dict:
    body = {
        "prediction_id": prediction_id,
        "predicted_class": 1,
        "probabilities": [0.05, 0.9, 0.05],
        "input": {"shape": list(INPUT_SHAPE), "data": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]},
    }
    body.update(overrides)
    return body


def stored_counts(state: ApiState) -> tuple[int, int]:
    with state.session_factory() as session:
        predictions = session.scalar(select(func.count(Prediction.id)))
        labels = session.scalar(select(func.count(Label.id)))
    return predictions, labels


def rejected(state: ApiState, endpoint: str, reason: str) -> float:
    return state.metrics.registry.get_sample_value(
        "poisonwatch_requests_rejected_total", {"endpoint": endpoint, "reason": reason}
    )


def test_predictions_accepted_and_counted(client, api_state):
    response = client.post(PREDICTIONS, json={"predictions": [prediction("a"), prediction("b")]})
    assert response.status_code == 200
    assert response.json() == {"accepted": 2, "duplicates": 0}
    assert stored_counts(api_state) == (2, 0)
    ingested = api_state.metrics.registry.get_sample_value("poisonwatch_predictions_ingested_total", {"model": MODEL})
    assert ingested == 2


def test_confidence_alone_is_enough(client, api_state):
    body = prediction(probabilities=None, confidence=0.97)
    del body["probabilities"]
    response = client.post(PREDICTIONS, json={"predictions": [body]})
    assert response.status_code == 200
    with api_state.session_factory() as session:
        stored = session.scalar(select(Prediction))
    assert stored.confidence == pytest.approx(0.97)
    assert stored.probabilities is None


def test_repeated_prediction_is_idempotent(client, api_state):
    first = client.post(PREDICTIONS, json={"predictions": [prediction("a")]})
    second = client.post(PREDICTIONS, json={"predictions": [prediction("a"), prediction("b")]})
    assert first.json() == {"accepted": 1, "duplicates": 0}
    assert second.status_code == 200
    assert second.json() == {"accepted": 1, "duplicates": 1}
    assert stored_counts(api_state) == (2, 0)


def test_repeat_within_one_batch_is_duplicate(client, api_state):
    response = client.post(PREDICTIONS, json={"predictions": [prediction("a"), prediction("a")]})
    assert response.json() == {"accepted": 1, "duplicates": 1}
    assert stored_counts(api_state) == (1, 0)


def test_content_digest_formula_unchanged(client, api_state):
    # Stored digests use this formula; a retry of a stored prediction must
    # still count as a duplicate, not a 409, after an upgrade.
    timestamp = "2026-01-02T03:04:05.123456+01:00"
    item = prediction("a", timestamp=timestamp, probabilities=[0.1, 0.7, 0.2], confidence=0.7)
    client.post(PREDICTIONS, json={"predictions": [item]})
    with api_state.session_factory() as session:
        stored = session.scalar(select(Prediction))
    expected = hashlib.sha256(
        json.dumps([VERSION, 1, 0.7, list(INPUT_SHAPE), "2026-01-02T03:04:05.123456+01:00", True]).encode()
    )
    expected.update(np.asarray([0.1, 0.7, 0.2], dtype="<f4").tobytes())
    expected.update(np.asarray(item["input"]["data"], dtype="<f4").tobytes())
    assert stored.content_digest == expected.hexdigest()
    assert stored.input_data == np.asarray(item["input"]["data"], dtype="<f4").tobytes()
    assert stored.probabilities == np.asarray([0.1, 0.7, 0.2], dtype="<f4").tobytes()


def test_openapi_describes_prediction_body(client):
    document = client.get("/openapi.json").json()
    request_body = document["paths"][PREDICTIONS.replace(MODEL, "{model}")]["post"]["requestBody"]
    schema_ref = request_body["content"]["application/json"]["schema"]["$ref"]
    components = document["components"]["schemas"]
    assert request_body["required"] is True
    assert schema_ref == "#/components/schemas/PredictionBatch"
    assert components["PredictionBatch"]["properties"]["predictions"]["items"]["$ref"] == "#/components/schemas/PredictionIn"
    assert components["PredictionIn"]["properties"]["input"]["$ref"] == "#/components/schemas/InputArray"


def test_repeat_with_other_content_conflicts(client, api_state):
    client.post(PREDICTIONS, json={"predictions": [prediction("a")]})
    changed = prediction("a", predicted_class=0, probabilities=[0.9, 0.05, 0.05])
    response = client.post(PREDICTIONS, json={"predictions": [prediction("new"), changed]})
    assert response.status_code == 409
    assert "a" in response.json()["detail"]
    assert response.json()["errors"] == [{"field": "prediction_id", "message": "conflict: a", "prediction_id": "a"}]
    assert stored_counts(api_state) == (1, 0)
    assert rejected(api_state, "predictions", "conflict") == 1


def test_repeat_within_one_batch_conflicts(client, api_state):
    changed = prediction("a", predicted_class=0, probabilities=[0.9, 0.05, 0.05])
    response = client.post(PREDICTIONS, json={"predictions": [prediction("a"), changed]})
    assert response.status_code == 409
    assert stored_counts(api_state) == (0, 0)


def test_malformed_json_rejected(client, api_state):
    response = client.post(PREDICTIONS, content=b'{"predictions": [', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]
    assert response.json()["errors"][0]["field"] == "body"
    assert rejected(api_state, "predictions", "malformed") == 1


def test_malformed_json_names_position(client):
    response = client.post(PREDICTIONS, content=b'{"predictions": [', headers={"content-type": "application/json"})
    assert response.json()["detail"] == "request body is not valid JSON: EOF while parsing a list at line 1 column 17"


@pytest.mark.parametrize(
    "headers",
    [{"content-type": "text/plain"}, {}],
    ids=["text-plain", "no-content-type"],
)
def test_body_not_declared_json_rejected(client, api_state, headers):
    body = json.dumps({"predictions": [prediction()]}).encode()
    response = client.post(PREDICTIONS, content=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body"
    assert "application/json" in response.json()["detail"]
    assert stored_counts(api_state) == (0, 0)


def test_json_suffix_media_type_accepted(client):
    body = json.dumps({"predictions": [prediction()]}).encode()
    response = client.post(PREDICTIONS, content=body, headers={"content-type": "application/vnd.poisonwatch+json; charset=utf-8"})
    assert response.status_code == 200


def test_empty_body_rejected(client, api_state):
    response = client.post(PREDICTIONS, content=b"", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"] == "body: Field required"
    assert rejected(api_state, "predictions", "invalid_field") == 1


@pytest.mark.parametrize(
    ("body_json", "field"),
    [
        pytest.param(
            '{"predictions": [{"prediction_id": "p", "predicted_class": 1, "probabilities": [NaN, 0.9, 0.1],'
            ' "input": {"shape": [2, 3], "data": [0, 0, 0, 0, 0, 0]}}]}',
            "predictions[0].probabilities[0]",
            id="nan-probability",
        ),
        pytest.param(
            '{"predictions": [{"prediction_id": "p", "predicted_class": 1, "probabilities": [0.1, 0.8, 0.1],'
            ' "input": {"shape": [2, 3], "data": [0, Infinity, 0, 0, 0, 0]}}]}',
            "predictions[0].input.data[1]",
            id="infinite-input",
        ),
        pytest.param(
            '{"predictions": [{"prediction_id": "p", "predicted_class": 1, "confidence": NaN,'
            ' "input": {"shape": [2, 3], "data": [0, 0, 0, 0, 0, 0]}}]}',
            "predictions[0].confidence",
            id="nan-confidence",
        ),
    ],
)
def test_non_finite_values_rejected(client, api_state, body_json, field):
    response = client.post(PREDICTIONS, content=body_json.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422
    fields = [error["field"] for error in response.json()["errors"]]
    assert field in fields
    assert stored_counts(api_state) == (0, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"probabilities": [0.2, 0.5, 0.1]}, "sum to 0.8", id="probabilities-not-normalized"),
        pytest.param({"probabilities": [0.5, 0.6, -0.1]}, "greater than or equal to 0", id="negative-probability"),
        pytest.param({"probabilities": None}, "give 'probabilities' or 'confidence'", id="no-confidence"),
        pytest.param({"predicted_class": -1}, "greater than or equal to 0", id="negative-class"),
        pytest.param({"confidence": 0.5}, "differs from probabilities[1]", id="confidence-disagrees"),
        pytest.param({"prediction_id": ""}, "at least 1 character", id="empty-id"),
        pytest.param({"input": {"shape": [2, 3], "data": [0.0] * 5}}, "5 values, expected 6", id="data-size"),
        pytest.param({"extra": 1}, "Extra inputs are not permitted", id="unknown-field"),
    ],
)
def test_invalid_prediction_names_problem(client, api_state, overrides, message):
    body = prediction(**overrides)
    if overrides.get("probabilities", "") is None:
        del body["probabilities"]
    response = client.post(PREDICTIONS, json={"predictions": [prediction("ok"), body]})
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert "Value error" not in response.json()["detail"]
    assert response.json()["detail"].startswith("predictions[1]")
    assert stored_counts(api_state) == (0, 0)
    assert rejected(api_state, "predictions", "invalid_field") == 1


def test_wrong_input_shape_rejected(client, api_state):
    body = prediction(input={"shape": [3, 2], "data": [0.0] * 6})
    response = client.post(PREDICTIONS, json={"predictions": [body]})
    assert response.status_code == 422
    assert "predictions[0].input.shape" in response.json()["detail"]
    assert "expected [2, 3]" in response.json()["detail"]
    assert stored_counts(api_state) == (0, 0)
    assert rejected(api_state, "predictions", "wrong_shape") == 1


def test_class_beyond_model_rejected(client, api_state):
    body = prediction(predicted_class=NUM_CLASSES, probabilities=None, confidence=0.99)
    del body["probabilities"]
    response = client.post(PREDICTIONS, json={"predictions": [body]})
    assert response.status_code == 422
    assert "predictions[0].predicted_class" in response.json()["detail"]


def test_probability_count_must_match_classes(client, api_state):
    body = prediction(predicted_class=0, probabilities=[0.5, 0.5])
    response = client.post(PREDICTIONS, json={"predictions": [body]})
    assert response.status_code == 422
    assert "2 values, expected 3" in response.json()["detail"]


def test_input_overflowing_float32_rejected(client, api_state):
    body = prediction("big", input={"shape": list(INPUT_SHAPE), "data": [0.0, 1e39, 0.0, 0.0, 0.0, 0.0]})
    response = client.post(PREDICTIONS, json={"predictions": [prediction("ok"), body]})
    assert response.status_code == 422
    assert response.json()["detail"] == "predictions[1].input.data: values overflow float32"
    assert stored_counts(api_state) == (0, 0)


def test_first_invalid_item_reported(client):
    overflowing = prediction("big", input={"shape": list(INPUT_SHAPE), "data": [1e39] * 6})
    wrong_shape = prediction("wide", input={"shape": [3, 2], "data": [0.0] * 6})
    response = client.post(PREDICTIONS, json={"predictions": [prediction("ok"), overflowing, wrong_shape]})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("predictions[1].input.data")


def test_input_over_size_limit_rejected(client, api_state):
    body = prediction(input={"shape": [101], "data": [0.0] * 101})
    response = client.post(PREDICTIONS, json={"predictions": [body]})
    assert response.status_code == 422
    assert stored_counts(api_state) == (0, 0)


def test_unknown_model_rejected(client, api_state):
    response = client.post("/v1/models/nope/predictions", json={"predictions": [prediction()]})
    assert response.status_code == 404
    assert "'nope' not found" in response.json()["detail"]
    assert stored_counts(api_state) == (0, 0)
    assert rejected(api_state, "predictions", "unknown_model") == 1


def test_unknown_model_version_rejected(client, api_state):
    response = client.post(PREDICTIONS, json={"predictions": [prediction(model_version="v9")]})
    assert response.status_code == 422
    assert "predictions[0].model_version" in response.json()["detail"]
    assert stored_counts(api_state) == (0, 0)


def test_oversize_batch_rejected(client, api_state):
    batch = [prediction(f"p-{index}") for index in range(11)]
    response = client.post(PREDICTIONS, json={"predictions": batch})
    assert response.status_code == 413
    assert "11 items, at most 10" in response.json()["detail"]
    assert stored_counts(api_state) == (0, 0)
    assert rejected(api_state, "predictions", "oversize_batch") == 1


def test_empty_batch_rejected(client, api_state):
    response = client.post(PREDICTIONS, json={"predictions": []})
    assert response.status_code == 422
    assert "predictions" in response.json()["detail"]


def test_label_attached(client, api_state):
    client.post(PREDICTIONS, json={"predictions": [prediction("a")]})
    response = client.post(LABELS, json={"labels": [{"prediction_id": "a", "label": 2}]})
    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "duplicates": 0}
    assert stored_counts(api_state) == (1, 1)


def test_label_for_unknown_prediction_rejected(client, api_state):
    client.post(PREDICTIONS, json={"predictions": [prediction("a")]})
    response = client.post(
        LABELS, json={"labels": [{"prediction_id": "a", "label": 2}, {"prediction_id": "ghost", "label": 0}]}
    )
    assert response.status_code == 422
    assert "ghost" in response.json()["detail"]
    assert [error["prediction_id"] for error in response.json()["errors"]] == ["ghost"]
    assert stored_counts(api_state) == (1, 0)
    assert rejected(api_state, "labels", "unknown_prediction") == 1


def test_repeated_label_is_idempotent(client, api_state):
    client.post(PREDICTIONS, json={"predictions": [prediction("a")]})
    client.post(LABELS, json={"labels": [{"prediction_id": "a", "label": 2}]})
    again = client.post(LABELS, json={"labels": [{"prediction_id": "a", "label": 2}]})
    other = client.post(LABELS, json={"labels": [{"prediction_id": "a", "label": 0}]})
    assert again.json() == {"accepted": 0, "duplicates": 1}
    assert other.status_code == 409
    assert stored_counts(api_state) == (1, 1)


def test_label_out_of_range_rejected(client, api_state):
    client.post(PREDICTIONS, json={"predictions": [prediction("a")]})
    response = client.post(LABELS, json={"labels": [{"prediction_id": "a", "label": NUM_CLASSES}]})
    assert response.status_code == 422
    assert "labels[0].label" in response.json()["detail"]
    assert stored_counts(api_state) == (1, 0)


def test_oversize_label_batch_rejected(client, api_state):
    labels = [{"prediction_id": f"p-{index}", "label": 0} for index in range(11)]
    response = client.post(LABELS, json={"labels": labels})
    assert response.status_code == 413


def test_stored_input_round_trips(client, api_state):
    client.post(PREDICTIONS, json={"predictions": [prediction("a")]})
    with api_state.session_factory() as session:
        stored = session.scalar(select(Prediction))
    assert stored.input_shape == list(INPUT_SHAPE)
    assert len(stored.input_data) == 4 * math.prod(INPUT_SHAPE)


def encoded(values) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def test_base64_input_stored_like_numbers(client, api_state):
    values = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    as_text = prediction("a", input={"shape": list(INPUT_SHAPE), "data_base64": encoded(values)})
    as_numbers = prediction("b", input={"shape": list(INPUT_SHAPE), "data": values})
    response = client.post(PREDICTIONS, json={"predictions": [as_text, as_numbers]})
    assert response.json() == {"accepted": 2, "duplicates": 0}
    with api_state.session_factory() as session:
        stored = {row.prediction_id: row for row in session.scalars(select(Prediction))}
    assert stored["a"].input_data == stored["b"].input_data == np.asarray(values, dtype="<f4").tobytes()
    # Both forms of the same values are one prediction: a retry in the other form is a duplicate.
    retry = client.post(PREDICTIONS, json={"predictions": [prediction("a", input={"shape": list(INPUT_SHAPE), "data": values})]})
    assert retry.json() == {"accepted": 0, "duplicates": 1}


@pytest.mark.parametrize(
    ("input_array", "message"),
    [
        pytest.param({"shape": [2, 3]}, "give exactly one of 'data' and 'data_base64'", id="neither"),
        pytest.param(
            {"shape": [2, 3], "data": [0.0] * 6, "data_base64": encoded([0.0] * 6)},
            "give exactly one of 'data' and 'data_base64'",
            id="both",
        ),
        pytest.param({"shape": [2, 3], "data_base64": encoded([0.0] * 5)}, "expected 32 for 6 float32 values", id="too-short"),
        pytest.param({"shape": [2, 3], "data_base64": "!" * 32}, "input.data_base64: not valid base64", id="not-base64"),
        pytest.param(
            {"shape": [2, 3], "data_base64": base64.b64encode(bytes(24)).decode()[:-4] + "AA=A"},
            "input.data_base64: not valid base64",
            id="misplaced-padding",
        ),
        pytest.param(
            {"shape": [2, 3], "data_base64": base64.b64encode(bytes(24)).decode()[:-2] + "=="},
            "input.data_base64: decodes to 22 bytes, expected 24",
            id="padding-shortens",
        ),
        pytest.param(
            {"shape": [2, 3], "data_base64": base64.b64encode(bytes(19)).decode() + "AAAA"},
            "input.data_base64: not valid base64",
            id="data-after-padding",
        ),
        pytest.param(
            {"shape": [2, 3], "data_base64": encoded([0.0, np.nan, 0.0, 0.0, 0.0, 0.0])},
            "input.data_base64: values are not finite",
            id="nan",
        ),
        pytest.param(
            {"shape": [2, 3], "data_base64": encoded([0.0, 0.0, 0.0, 0.0, 0.0, -np.inf])},
            "input.data_base64: values are not finite",
            id="infinite",
        ),
    ],
)
def test_invalid_base64_input_rejected(client, api_state, input_array, message):
    response = client.post(PREDICTIONS, json={"predictions": [prediction("ok"), prediction("bad", input=input_array)]})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("predictions[1].input")
    assert message in response.json()["detail"]
    assert stored_counts(api_state) == (0, 0)


def test_first_invalid_item_across_forms(client):
    not_finite = prediction("nan", input={"shape": list(INPUT_SHAPE), "data_base64": encoded([np.nan] * 6)})
    overflowing = prediction("big", input={"shape": list(INPUT_SHAPE), "data": [1e39] * 6})
    response = client.post(PREDICTIONS, json={"predictions": [prediction("ok"), overflowing, not_finite]})
    assert response.json()["detail"] == "predictions[1].input.data: values overflow float32"
    response = client.post(PREDICTIONS, json={"predictions": [prediction("ok"), not_finite, overflowing]})
    assert response.json()["detail"] == "predictions[1].input.data_base64: values are not finite"


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    name=st.text(min_size=1, max_size=20),
    predicted_class=st.integers(min_value=0, max_value=2**40),
    confidence=st.none() | st.floats(min_value=0.0, max_value=1.0),
    shape=st.lists(st.integers(min_value=1, max_value=10**6), min_size=1, max_size=8),
    timestamp=st.none() | st.datetimes(timezones=st.timezones()),
    probabilities=st.none() | st.binary(max_size=16),
)
def test_content_digest_header_matches_json(name, predicted_class, confidence, shape, timestamp, probabilities):
    # The API puts the digest header together from pieces. It must equal the json.dumps text that stored digests use.
    version = _TargetVersion(id=1, name=name, input_shape=shape, num_classes=3)
    item = SimpleNamespace(predicted_class=predicted_class, confidence=confidence, timestamp=timestamp)
    input_data = b"\x00" * 8
    header = json.dumps(
        [name, predicted_class, confidence, shape, timestamp.isoformat() if timestamp else None, probabilities is not None]
    )
    expected = hashlib.sha256(header.encode() + (probabilities or b"") + input_data).hexdigest()
    assert _content_digest(version, item, probabilities, input_data) == expected


def test_healthz_reports_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_metrics_exposes_incident_gauges(client):
    text = client.get("/metrics").text
    assert 'poisonwatch_incidents{model="toy",state="open"} 0.0' in text
    assert "poisonwatch_stored_results_up 1.0" in text


def test_incident_not_found(client):
    response = client.get("/v1/incidents/12345")
    assert response.status_code == 404
    assert "12345" in response.json()["detail"]


def test_incident_pages_render(client):
    listing = client.get("/incidents")
    missing = client.get("/incidents/999")
    assert listing.status_code == 200
    assert "text/html" in listing.headers["content-type"]
    assert "<h1>incidents</h1>" in listing.text
    assert missing.status_code == 404


def test_latency_histogram_uses_route_template(client, api_state):
    client.get("/v1/incidents/77")
    count = api_state.metrics.registry.get_sample_value(
        "poisonwatch_http_request_duration_seconds_count",
        {"route": "/v1/incidents/{incident_id}", "method": "GET", "status": "4xx"},
    )
    assert count == 1


def open_incident(client, api_state) -> int:
    """Store a confident misclassification, open its incident and return its id."""
    client.post(PREDICTIONS, json={"predictions": [prediction("wrong", probabilities=[0.02, 0.96, 0.02])]})
    client.post(LABELS, json={"labels": [{"prediction_id": "wrong", "label": 2}]})
    with api_state.session_factory.begin() as session:
        return queries.open_misclassification_incidents(session, confidence_threshold=0.9)[0].id


def set_state(api_state, incident_id: int, state: IncidentState) -> None:
    with api_state.session_factory.begin() as session:
        session.get(Incident, incident_id).state = state


def test_acknowledge_analyzed_incident(client, api_state):
    incident_id = open_incident(client, api_state)
    set_state(api_state, incident_id, IncidentState.ANALYZED)
    first = client.post(f"/v1/incidents/{incident_id}/acknowledge")
    again = client.post(f"/v1/incidents/{incident_id}/acknowledge")
    assert first.status_code == 200
    assert first.json()["state"] == "acknowledged"
    assert again.status_code == 200


def test_acknowledge_open_incident_conflicts(client, api_state):
    incident_id = open_incident(client, api_state)
    response = client.post(f"/v1/incidents/{incident_id}/acknowledge")
    assert response.status_code == 409
    assert "is open" in response.json()["detail"]


def test_resolve_stops_running_analysis(client, api_state):
    incident_id = open_incident(client, api_state)
    with api_state.session_factory.begin() as session:
        claimed = queries.claim_next_incident(session, worker="w")
    response = client.post(f"/v1/incidents/{incident_id}/resolve")
    with api_state.session_factory.begin() as session:
        stored = queries.store_analysis(
            session, session.get(Incident, incident_id), worker="w", suspects=[], iterations=1,
            residual=0.0, converged=True, negative_curvature=False, damping=0.0, seconds=0.1,
        )
    assert claimed.id == incident_id
    assert response.status_code == 200
    assert response.json()["state"] == "resolved"
    assert stored is False


def test_action_on_unknown_incident(client):
    response = client.post("/v1/incidents/999/resolve")
    assert response.status_code == 404


@pytest.mark.parametrize(("command", "state"), [("ack", "acknowledged"), ("resolve", "resolved")], ids=["ack", "resolve"])
def test_cli_incident_action(client, api_state, tmp_path, capsys, command, state):
    incident_id = open_incident(client, api_state)
    set_state(api_state, incident_id, IncidentState.ANALYZED)
    config = tmp_path / "poisonwatch.toml"
    config.write_text(f'[database]\nurl = "{api_state.config.database.url}"\n')
    exit_code = cli.main(["incidents", command, str(incident_id), "--config", str(config)])
    assert exit_code == 0
    assert capsys.readouterr().out.strip() == f"incident {incident_id} is now {state}"
