"""Security: bearer tokens on writes, body size limits, CORS off by default, no pickle, masked passwords."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from monitor.api import ApiState, create_app
from monitor.auth import TokenVerifier, generate_token, hash_token
from monitor.config import Config, DatabaseConfig, ModelConfig, ServerConfig
from monitor.daemon import Daemon
from monitor.errors import AuthenticationConfigError
from storage.db import describe_database_error
from tests.conftest import MODEL

PREDICTIONS = f"/v1/models/{MODEL}/predictions"
REPOSITORY = Path(__file__).resolve().parent.parent


def prediction_body(prediction_id: str = "p-1") -> dict:
    return {
        "predictions": [
            {
                "prediction_id": prediction_id,
                "predicted_class": 1,
                "probabilities": [0.05, 0.9, 0.05],
                "input": {"shape": [2, 3], "data": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]},
            }
        ]
    }


@pytest.fixture
def token() -> str:
    return generate_token()


@pytest.fixture
def guarded(api_state: ApiState, token: str):
    state = ApiState(
        config=api_state.config,
        session_factory=api_state.session_factory,
        metrics=api_state.metrics,
        auth=TokenVerifier([hash_token(token)], required=True),
    )
    with TestClient(create_app(state)) as client:
        yield client


def test_write_without_token_rejected(guarded):
    response = guarded.post(PREDICTIONS, json=prediction_body())
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"].startswith("missing bearer token")


def test_write_with_wrong_token_rejected(guarded):
    response = guarded.post(PREDICTIONS, json=prediction_body(), headers={"Authorization": "Bearer pw_wrong"})
    assert response.status_code == 401
    assert response.json()["detail"].startswith("invalid bearer token")


def test_write_with_token_accepted(guarded, token):
    response = guarded.post(PREDICTIONS, json=prediction_body(), headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
def test_incident_action_needs_token(guarded, action):
    response = guarded.post(f"/v1/incidents/1/{action}")
    assert response.status_code == 401


def test_reads_need_no_token(guarded):
    assert guarded.get("/v1/incidents").status_code == 200


def test_token_stored_only_as_digest(token):
    digest = hash_token(token)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert token not in digest


@pytest.mark.parametrize(
    ("host", "digests", "required"),
    [("127.0.0.1", [], False), ("::1", [], False), ("0.0.0.0", [], True), ("127.0.0.1", ["ab" * 32], True)],
    ids=["loopback", "loopback-ipv6", "any-address", "loopback-with-tokens"],
)
def test_token_required_when(host, digests, required):
    assert TokenVerifier.for_server(host, digests).required is required


def test_public_bind_without_tokens_rejected(migrated_url):
    config = Config(
        database=DatabaseConfig(url=migrated_url),
        server=ServerConfig(host="0.0.0.0", port=0),
        models=[ModelConfig(name="toy", loader="tests.toy_model:load")],
    )
    daemon = Daemon(config, registry=CollectorRegistry())
    with pytest.raises(AuthenticationConfigError, match="poisonwatch token create"):
        daemon.start(serve_http=False)
    daemon.stop()


@pytest.fixture
def small_body_client(api_state: ApiState):
    config = api_state.config.model_copy(update={"server": api_state.config.server.model_copy(update={"max_body_bytes": 1024})})
    state = ApiState(config=config, session_factory=api_state.session_factory, metrics=api_state.metrics)
    with TestClient(create_app(state)) as client:
        yield client


def test_oversize_body_rejected(small_body_client):
    body = prediction_body()
    body["predictions"][0]["prediction_id"] = "x" * 200
    body["predictions"] = body["predictions"] * 8
    response = small_body_client.post(PREDICTIONS, json=body)
    assert response.status_code == 413
    assert "max_body_bytes" in response.json()["detail"]


def test_oversize_chunked_body_rejected(small_body_client):
    chunks = iter([b'{"predictions": [', b" " * 2000, b"]}"])
    response = small_body_client.post(PREDICTIONS, content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_cors_off_by_default(client):
    response = client.options(
        PREDICTIONS, headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_configured_origin(api_state: ApiState):
    config = api_state.config.model_copy(
        update={"server": api_state.config.server.model_copy(update={"cors_origins": ["https://dash.example"]})}
    )
    state = ApiState(config=config, session_factory=api_state.session_factory, metrics=api_state.metrics)
    with TestClient(create_app(state)) as client:
        response = client.options(
            PREDICTIONS, headers={"Origin": "https://dash.example", "Access-Control-Request-Method": "POST"}
        )
    assert response.headers["access-control-allow-origin"] == "https://dash.example"


def test_no_pickle_in_sources():
    offenders = []
    for folder in ("monitor", "detectors", "storage"):
        for path in (REPOSITORY / folder).rglob("*.py"):
            text = path.read_text()
            if re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b", text, re.MULTILINE) or "allow_pickle=True" in text:
                offenders.append(str(path.relative_to(REPOSITORY)))
    assert offenders == []


def test_database_error_masks_password():
    url = "postgresql+psycopg://app:hunter%402@db.internal/poisonwatch"
    error = RuntimeError('connection to "postgresql://app:hunter@2@db.internal" failed (password hunter%402)')
    described = describe_database_error(error, url)
    assert "hunter@2" not in described
    assert "hunter%402" not in described
    assert described.startswith("RuntimeError: ")
