"""The serving-side client: batching, retries with backoff, bounded memory, flush on close."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from monitor.client import Kind, PoisonwatchClient
from storage.models import Prediction
from tests.conftest import INPUT_SHAPE, MODEL


class FakeServer:
    """An httpx transport that records each batch and responds from a scripted list of status codes."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.batches: list[tuple[str, list[dict]]] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        kind = request.url.path.rsplit("/", 1)[-1]
        with self.lock:
            status = self.statuses.pop(0) if self.statuses else 200
            if status != 200:
                return httpx.Response(status, json={"detail": "scripted"}, headers={"Retry-After": "0"})
            self.batches.append((kind, body[kind]))
        return httpx.Response(200, json={"accepted": len(body[kind]), "duplicates": 0})

    def ids(self, kind: str) -> list[str]:
        return [item["prediction_id"] for batch_kind, items in self.batches if batch_kind == kind for item in items]


def make_client(server: FakeServer, **options) -> PoisonwatchClient:
    defaults = {"batch_size": 4, "flush_interval_seconds": 0.05, "backoff_seconds": 0.01, "max_queue": 100}
    return PoisonwatchClient("http://poisonwatch.test", "toy", transport=httpx.MockTransport(server), **(defaults | options))


def log(client: PoisonwatchClient, count: int, prefix: str = "p") -> None:
    for index in range(count):
        client.log_prediction(f"{prefix}-{index}", predicted_class=1, probabilities=[0.1, 0.8, 0.1], input_data=[0.0] * 4, input_shape=[2, 2])


def test_client_sends_in_batches():
    server = FakeServer()
    client = make_client(server)
    log(client, 10)
    client.log_label("p-0", label=2)
    flushed = client.close()
    assert flushed
    assert server.ids("predictions") == [f"p-{index}" for index in range(10)]
    assert max(len(items) for _, items in server.batches) <= 4
    assert server.ids("labels") == ["p-0"]
    assert client.stats.sent == 11


def test_client_retries_after_503():
    server = FakeServer(statuses=[503, 503])
    client = make_client(server)
    log(client, 3)
    flushed = client.close()
    assert flushed
    assert server.ids("predictions") == ["p-0", "p-1", "p-2"]
    assert client.stats.retries == 2


def test_client_drops_rejected_batch():
    server = FakeServer(statuses=[422])
    client = make_client(server)
    log(client, 2)
    client.close()
    assert client.stats.dropped_rejected == 2
    assert server.ids("predictions") == []


def test_client_queue_bounded():
    server = FakeServer(statuses=[503] * 1000)
    client = make_client(server, max_queue=8, max_retries=0, flush_interval_seconds=5.0)
    log(client, 20)
    queued = len(client._predictions)
    pending = client._pending()
    client.close(timeout_seconds=0.5)
    assert queued <= 8
    # At most one batch is in flight beside the full queue.
    assert pending <= 8 + 4
    assert client.stats.dropped_queue_full >= 20 - 8 - 4


def test_client_keeps_batch_when_server_away():
    server = FakeServer(statuses=[503] * 3)
    client = make_client(server, max_retries=1)
    log(client, 2)
    flushed = client.flush(timeout_seconds=5.0)
    client.close()
    assert flushed
    assert server.ids("predictions") == ["p-0", "p-1"]


def test_client_labels_wait_for_their_predictions():
    # While the predictions' sends fail, their labels stay queued. A label is
    # never sent before every prediction logged ahead of it is stored.
    class OrderCheckingServer(FakeServer):
        def __init__(self):
            super().__init__(statuses=[503] * 4)
            self.stored: set[str] = set()

        def __call__(self, request):
            kind = request.url.path.rsplit("/", 1)[-1]
            ids = [item["prediction_id"] for item in json.loads(request.content)[kind]]
            if kind == "labels":
                missing = [prediction_id for prediction_id in ids if prediction_id not in self.stored]
                assert not missing, f"labels sent before their predictions: {missing}"
            response = super().__call__(request)
            if kind == "predictions" and response.status_code == 200:
                self.stored.update(ids)
            return response

    server = OrderCheckingServer()
    client = make_client(server, batch_size=4, max_retries=0)
    log(client, 10)
    for index in (0, 5, 9):
        client.log_label(f"p-{index}", label=1)
    assert client.flush(timeout_seconds=10.0)
    client.close()
    assert server.ids("predictions") == [f"p-{index}" for index in range(10)]
    assert server.ids("labels") == ["p-0", "p-5", "p-9"]
    assert client.stats.dropped_rejected == 0


def test_client_rejects_invalid_batch_size():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        PoisonwatchClient("http://poisonwatch.test", "toy", batch_size=0)


def test_client_imports_without_jax():
    code = "import sys, monitor.client; assert 'jax' not in sys.modules and 'sqlalchemy' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("input_data", "message"),
    [
        pytest.param([0.0] * 3, "3 values, expected 4", id="wrong-size"),
        pytest.param([0.0, float("nan"), 0.0, 0.0], "must be finite", id="nan"),
        pytest.param([0.0, 1e39, 0.0, 0.0], "beyond the float32 range", id="overflow"),
    ],
)
def test_client_rejects_bad_input_at_once(input_data, message):
    server = FakeServer()
    client = make_client(server)
    with pytest.raises(ValueError, match=message):
        client.log_prediction("bad", predicted_class=1, probabilities=[0.1, 0.8, 0.1], input_data=input_data, input_shape=[2, 2])
    log(client, 2)
    assert client.close()
    assert server.ids("predictions") == ["p-0", "p-1"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"probabilities": [float("nan"), 0.9, 0.1]}, "finite numbers in", id="nan-probability"),
        pytest.param({"probabilities": [0.2, 0.2, 0.2]}, "sum to 0.6", id="not-normalized"),
        pytest.param({"probabilities": None, "confidence": float("inf")}, "confidence must be", id="infinite-confidence"),
        pytest.param({"probabilities": None, "confidence": 2.0}, "confidence must be", id="confidence-above-one"),
        pytest.param({"probabilities": None}, "give probabilities or confidence", id="neither"),
        pytest.param({"predicted_class": 3}, "out of range for 3 probabilities", id="class-out-of-range"),
        pytest.param({"predicted_class": -1}, "must be >= 0", id="negative-class"),
        pytest.param({"confidence": 0.5}, "differs from probabilities", id="confidence-disagrees"),
    ],
)
def test_client_rejects_bad_probabilities_at_once(fields, message):
    server = FakeServer()
    client = make_client(server)
    arguments = {"predicted_class": 1, "probabilities": [0.1, 0.8, 0.1], "input_data": [0.0] * 4, "input_shape": [2, 2]}
    with pytest.raises(ValueError, match=message):
        client.log_prediction("bad", **(arguments | fields))
    log(client, 2)
    assert client.close()
    assert server.ids("predictions") == ["p-0", "p-1"]


def test_client_flattens_arrays():
    server = FakeServer()
    client = make_client(server)
    client.log_prediction("grid", predicted_class=1, probabilities=np.array([0.1, 0.8, 0.1]),
                          input_data=np.arange(4, dtype=np.float32).reshape(2, 2), input_shape=[2, 2])
    assert client.close()
    sent = server.batches[0][1][0]
    assert np.frombuffer(base64.b64decode(sent["input"]["data_base64"]), dtype="<f4").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_client_survives_unsendable_batch(monkeypatch):
    # An error while sending one batch drops only that batch, and the sender thread goes on.
    server = FakeServer()
    client = make_client(server)
    real_send = client._send
    failures = iter([RuntimeError("encoder broke")])

    def flaky_send(kind, items):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_send(kind, items)

    monkeypatch.setattr(client, "_send", flaky_send)
    log(client, 4, prefix="lost")
    assert client.flush(5)
    log(client, 3, prefix="kept")
    assert client.close()
    assert server.ids("predictions") == ["kept-0", "kept-1", "kept-2"]
    assert client.stats.dropped_rejected == 4


def test_client_resends_batch_without_rejected_item(caplog):
    # The server stores a batch whole or not at all, so the client drops only the item a 422 names.
    class RejectingServer(FakeServer):
        def __call__(self, request):
            items = json.loads(request.content)["predictions"]
            ids = [item["prediction_id"] for item in items]
            for bad in ("p-1", "p-3"):
                if bad in ids:
                    index = ids.index(bad)
                    return httpx.Response(422, json={"detail": f"predictions[{index}].input.shape: got [3], expected [2, 2]"})
            return super().__call__(request)

    server = RejectingServer()
    client = make_client(server, batch_size=5)
    log(client, 5)
    assert client.close()
    assert server.ids("predictions") == ["p-0", "p-2", "p-4"]
    assert client.stats.sent == 3
    assert client.stats.dropped_rejected == 2
    assert "(prediction_id 'p-1')" in caplog.text
    assert "(prediction_id 'p-3')" in caplog.text


def test_client_drops_items_named_by_id(caplog):
    # A 409 conflict and a 422 for labels of unknown predictions name the items by prediction_id.
    class IdRejectingServer(FakeServer):
        def __call__(self, request):
            kind = request.url.path.rsplit("/", 1)[-1]
            ids = [item["prediction_id"] for item in json.loads(request.content)[kind]]
            status, bad = (409, {"p-1", "p-2"}) if kind == "predictions" else (422, {"ghost"})
            named = [prediction_id for prediction_id in ids if prediction_id in bad]
            if named:
                errors = [{"field": "prediction_id", "message": "rejected", "prediction_id": name} for name in named]
                return httpx.Response(status, json={"detail": "rejected: " + ", ".join(named), "errors": errors})
            return super().__call__(request)

    server = IdRejectingServer()
    client = make_client(server, batch_size=5)
    log(client, 5)
    client.log_label("p-0", label=1)
    client.log_label("ghost", label=1)
    client.log_label("p-3", label=2)
    assert client.close()
    assert server.ids("predictions") == ["p-0", "p-3", "p-4"]
    assert server.ids("labels") == ["p-0", "p-3"]
    assert client.stats.dropped_rejected == 3
    assert "'p-1', 'p-2'" in caplog.text
    assert "'ghost'" in caplog.text


def test_client_keeps_first_copy_of_repeated_id():
    # The API rejects a batch that repeats an id with other content and names the id. The first copy is new.
    class RepeatRejectingServer(FakeServer):
        def __call__(self, request):
            items = json.loads(request.content)["predictions"]
            ids = [item["prediction_id"] for item in items]
            repeated = sorted({prediction_id for prediction_id in ids if ids.count(prediction_id) > 1})
            if repeated:
                errors = [{"field": "prediction_id", "message": "conflict", "prediction_id": name} for name in repeated]
                return httpx.Response(409, json={"detail": "conflict", "errors": errors})
            return super().__call__(request)

    server = RepeatRejectingServer()
    client = make_client(server, batch_size=5)
    for index, predicted_class in enumerate([1, 1, 0]):
        probabilities = [0.1, 0.8, 0.1] if predicted_class == 1 else [0.8, 0.1, 0.1]
        prediction_id = "dup" if index != 1 else "other"
        client.log_prediction(prediction_id, predicted_class=predicted_class, probabilities=probabilities,
                              input_data=[0.0] * 4, input_shape=[2, 2])
    assert client.close()
    assert server.ids("predictions") == ["dup", "other"]
    assert server.batches[0][1][0]["predicted_class"] == 1
    assert client.stats.dropped_rejected == 1


def test_client_rejects_negative_label():
    client = make_client(FakeServer())
    with pytest.raises(ValueError, match="label must be >= 0"):
        client.log_label("p-0", label=-1)
    assert client.close()


def test_client_rejects_nested_list_input():
    client = make_client(FakeServer())
    with pytest.raises(ValueError, match="input_data must be a flat sequence"):
        client.log_prediction("nested", predicted_class=1, probabilities=[0.1, 0.8, 0.1], input_data=[[0.0, 0.0], [0.0, 0.0]], input_shape=[2, 2])
    assert client.close()


def test_client_batches_stored_by_api(client, api_state):
    # The client's payload, base64 float32 inputs included, goes through the real API and is stored as sent.
    def forward(request: httpx.Request) -> httpx.Response:
        answer = client.request(request.method, request.url.path, content=request.content, headers=dict(request.headers))
        return httpx.Response(answer.status_code, content=answer.content, headers=answer.headers)

    values = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    sender = PoisonwatchClient("http://poisonwatch.test", MODEL, transport=httpx.MockTransport(forward), flush_interval_seconds=0.05)
    for index in range(3):
        sender.log_prediction(f"c-{index}", predicted_class=1, probabilities=[0.05, 0.9, 0.05], input_data=values, input_shape=INPUT_SHAPE)
    assert sender.close()
    assert sender.stats.sent == 3
    with api_state.session_factory() as session:
        stored = session.scalars(select(Prediction).order_by(Prediction.prediction_id)).all()
    assert [row.prediction_id for row in stored] == ["c-0", "c-1", "c-2"]
    assert {row.input_data for row in stored} == {np.asarray(values, dtype="<f4").tobytes()}
