"""A client for serving applications: batched, asynchronous logging of predictions and labels.

Importing this module loads neither JAX nor the database layer, so a serving
process pays only for httpx. Usage::

    client = PoisonwatchClient("http://poisonwatch:8000", model="digits", token="pw_...")
    client.log_prediction("req-123", predicted_class=3, probabilities=probs, input_data=x.ravel(), input_shape=[8, 8])
    client.log_label("req-123", label=5)   # later, when the ground truth arrives
    client.close()                          # also runs at interpreter exit

``log_*`` calls only append to a bounded in-memory queue; a background thread
sends batches and retries failed sends with exponential backoff.
"""

from __future__ import annotations

import atexit
import base64
import collections
import dataclasses
import datetime as dt
import enum
import logging
import math
import random
import re
import struct
import threading
import time
from collections.abc import Sequence

import httpx

# The server's tolerance for probabilities that do not sum to 1 exactly (monitor.schemas).
PROBABILITY_SUM_TOLERANCE = 1e-3

logger = logging.getLogger(__name__)

# Status codes after which a send is retried: the batch may succeed later.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class Kind(enum.StrEnum):
    PREDICTIONS = "predictions"
    LABELS = "labels"


@dataclasses.dataclass
class ClientStats:
    """Counters since the client started; ``dropped_*`` items are not stored (the queue was full, or the server rejected them)."""

    sent: int = 0
    duplicates: int = 0
    dropped_queue_full: int = 0
    dropped_rejected: int = 0
    retries: int = 0


class PoisonwatchClient:
    """Sends predictions and labels to the poisonwatch API in batches from a background thread.

    Memory is bounded by ``max_queue`` items per kind: when a queue is full the
    oldest item is dropped and counted in ``stats.dropped_queue_full``. The
    server stores a batch whole or not at all. When it rejects a batch with
    a 409 or 422 that names items (by index for an invalid field, by
    ``prediction_id`` for a conflict or a label of an unknown prediction),
    those items are dropped and logged, and the rest of the batch is sent
    again. A batch rejected with any other 4xx except 408 and 429 is dropped
    whole and logged, since resending it cannot succeed. Dropped items are
    counted in ``stats.dropped_rejected``, and :meth:`flush` counts them as
    done. Other failures are retried
    up to ``max_retries`` times, waiting ``backoff_seconds * 2**attempt``
    (with jitter, at most ``max_backoff_seconds``, and at least the server's
    ``Retry-After``). After that the batch is put back at the head of the
    queue, and the sender tries again when a batch is full or after
    ``flush_interval_seconds``, with no call to :meth:`flush` needed.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        token: str | None = None,
        batch_size: int = 500,
        flush_interval_seconds: float = 1.0,
        max_queue: int = 100_000,
        max_retries: int = 5,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
        timeout_seconds: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_queue < batch_size:
            raise ValueError(f"max_queue must be >= batch_size ({batch_size}), got {max_queue}")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_seconds, transport=transport)
        self.model = model
        self.batch_size = batch_size
        self.flush_interval_seconds = flush_interval_seconds
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.stats = ClientStats()
        # Predictions as item dicts. Labels as (predictions logged before the
        # label, item): a label is sent only once every prediction logged
        # before it is sent or dropped, so it never arrives before its prediction.
        self._predictions: collections.deque[dict] = collections.deque()
        self._labels: collections.deque[tuple[int, dict]] = collections.deque()
        self._predictions_logged = 0
        self._predictions_done = 0
        self._max_queue = max_queue
        self._condition = threading.Condition()
        self._closed = False
        self._in_flight = 0
        self._thread = threading.Thread(target=self._run, name="poisonwatch-client", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # --- producer side -----------------------------------------------------

    def log_prediction(
        self,
        prediction_id: str,
        *,
        predicted_class: int,
        input_data: Sequence[float],
        input_shape: Sequence[int],
        probabilities: Sequence[float] | None = None,
        confidence: float | None = None,
        model_version: str | None = None,
        timestamp: dt.datetime | None = None,
    ) -> None:
        """Queue one prediction; returns at once. ``timestamp`` defaults to now (UTC).

        The input is sent as base64 float32 bytes, which the server decodes
        far faster than JSON numbers. An array of any shape is flattened in
        C order.

        Logging the same ``prediction_id`` again with other content, the
        default ``timestamp`` included, is a conflict that the server
        rejects. A retry by this client resends the same item, so the server
        counts it as a duplicate.

        Raises:
            ValueError: for what the server would reject and the client can
                check without the model's metadata. For the input, that is
                a value count that does not match ``input_shape`` and a
                value that is not finite or beyond the float32 range. For
                the output, it is neither ``probabilities`` nor
                ``confidence``, a probability or confidence outside [0, 1]
                or not finite, probabilities that do not sum to 1 within
                0.001, and a negative ``predicted_class`` or one without a
                probability. The model's input shape and class count are
                checked only by the server.
        """
        shape = [int(size) for size in input_shape]
        probabilities = _checked_probabilities(probabilities, confidence, int(predicted_class))
        item = {
            "prediction_id": prediction_id,
            "predicted_class": int(predicted_class),
            "input": {"shape": shape, "data_base64": _float32_base64(input_data, shape)},
            "timestamp": (timestamp or dt.datetime.now(dt.UTC)).isoformat(),
        }
        if probabilities is not None:
            item["probabilities"] = probabilities
        if confidence is not None:
            item["confidence"] = float(confidence)
        if model_version is not None:
            item["model_version"] = model_version
        self._enqueue(Kind.PREDICTIONS, item)

    def log_label(self, prediction_id: str, *, label: int) -> None:
        """Queue the ground-truth label of a logged prediction; returns at once.

        The label is sent only after every prediction logged before it has
        been sent or dropped. A negative label raises :class:`ValueError`
        here. The server rejects a label beyond the model's classes.
        """
        if int(label) < 0:
            raise ValueError(f"label must be >= 0, got {label}")
        self._enqueue(Kind.LABELS, {"prediction_id": prediction_id, "label": int(label)})

    def _enqueue(self, kind: Kind, item: dict) -> None:
        with self._condition:
            if self._closed:
                raise RuntimeError("client is closed")
            queue = self._predictions if kind is Kind.PREDICTIONS else self._labels
            if len(queue) >= self._max_queue:
                queue.popleft()
                if kind is Kind.PREDICTIONS:
                    self._predictions_done += 1
                self.stats.dropped_queue_full += 1
                if self.stats.dropped_queue_full in (1, 10, 100, 1000) or self.stats.dropped_queue_full % 10000 == 0:
                    logger.warning("poisonwatch client queue full; %d items dropped so far", self.stats.dropped_queue_full)
            if kind is Kind.PREDICTIONS:
                queue.append(item)
                self._predictions_logged += 1
            else:
                queue.append((self._predictions_logged, item))
            if len(queue) >= self.batch_size:
                self._condition.notify_all()

    # --- sender side -------------------------------------------------------

    def flush(self, timeout_seconds: float = 30.0) -> bool:
        """Wait until every queued item is sent or dropped; False when ``timeout_seconds`` passed first."""
        deadline = time.monotonic() + timeout_seconds
        with self._condition:
            self._condition.notify_all()
            while self._pending() > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(min(remaining, 0.1))
        return True

    def close(self, timeout_seconds: float = 30.0) -> bool:
        """Flush, stop the sender thread and close the HTTP connections; False when items were left unsent."""
        with self._condition:
            if self._closed:
                return self._pending() == 0
        flushed = self.flush(timeout_seconds)
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout_seconds)
        self._http.close()
        atexit.unregister(self.close)
        if not flushed:
            logger.warning("poisonwatch client closed with %d items unsent", self._pending())
        return flushed

    def _pending(self) -> int:
        return len(self._predictions) + len(self._labels) + self._in_flight

    def _run(self) -> None:
        while True:
            with self._condition:
                full = len(self._predictions) >= self.batch_size or len(self._labels) >= self.batch_size
                if not self._closed and not full:
                    self._condition.wait(self.flush_interval_seconds)
                if self._closed and self._pending() == 0:
                    return
                predictions = [self._predictions.popleft() for _ in range(min(self.batch_size, len(self._predictions)))]
                self._in_flight = len(predictions)
            kept_predictions = self._send_guarded(Kind.PREDICTIONS, predictions)
            with self._condition:
                self._predictions_done += len(predictions) - len(kept_predictions)
                self._keep(self._predictions, kept_predictions)
                labels = []
                while self._labels and len(labels) < self.batch_size and self._labels[0][0] <= self._predictions_done:
                    labels.append(self._labels.popleft())
                self._in_flight = len(labels)
            bounds = {id(item): bound for bound, item in labels}
            kept_labels = self._send_guarded(Kind.LABELS, [item for _, item in labels])
            with self._condition:
                self._keep(self._labels, [(bounds[id(item)], item) for item in kept_labels])
                self._in_flight = 0
                self._condition.notify_all()
                waiting = self._pending() > 0
            if self._closed and waiting and (kept_predictions or kept_labels or not (predictions or labels)):
                # Closing while the server is away: give up instead of spinning.
                return

    def _keep(self, queue: collections.deque, entries: list) -> None:
        """Put unsent entries back at the head of ``queue`` in their order, within the queue bound.

        The caller must hold the lock.
        """
        room = self._max_queue - len(queue)
        requeued = entries[-room:] if room < len(entries) else entries
        lost = len(entries) - len(requeued)
        self.stats.dropped_queue_full += lost
        if queue is self._predictions:
            self._predictions_done += lost
        queue.extendleft(reversed(requeued))

    def _send_guarded(self, kind: Kind, items: list[dict]) -> list[dict]:
        """Send ``items`` and return those to keep for a later try.

        An unexpected error while sending drops this batch and leaves the sender thread running.
        """
        if not items:
            return []
        try:
            return self._send(kind, items)
        except Exception:  # noqa: BLE001 - the sender thread must outlive one bad batch
            self.stats.dropped_rejected += len(items)
            logger.exception("poisonwatch client dropped a batch of %d %s it could not send", len(items), kind.value)
            return []

    def _send(self, kind: Kind, items: list[dict]) -> list[dict]:
        """Send ``items`` and drop those the server rejects by name.

        Returns the items to keep for a later try when the server stays unreachable.
        """
        # Each pass drops at least one item, so a batch of n items takes at most n passes.
        while items:
            rejected = self._send_once(kind, items)
            if rejected is None:
                return items
            if not rejected:
                return []
            self.stats.dropped_rejected += len(rejected)
            items = [item for index, item in enumerate(items) if index not in rejected]
        return []

    def _send_once(self, kind: Kind, items: list[dict]) -> set[int] | None:
        """Send one batch with retries.

        Returns the indices of the items that the server's 409 or 422 names,
        an empty set when the batch is stored or dropped whole, and None when
        every retry failed, so the caller keeps the batch.
        """
        path = f"/v1/models/{self.model}/{kind.value}"
        for attempt in range(self.max_retries + 1):
            retry_after = 0.0
            try:
                response = self._http.post(path, json={kind.value: items})
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    result = response.json()
                    self.stats.sent += result.get("accepted", 0)
                    self.stats.duplicates += result.get("duplicates", 0)
                    return set()
                rejected = _rejected_indices(response, kind, items)
                if rejected:
                    logger.error(
                        "poisonwatch rejected %d of %d %s (prediction_id %s)%s: %s",
                        len(rejected),
                        len(items),
                        kind.value,
                        ", ".join(repr(items[index].get("prediction_id")) for index in sorted(rejected)),
                        "; sending the others again" if len(rejected) < len(items) else "",
                        response.text[:500],
                    )
                    return rejected
                if response.status_code not in RETRYABLE_STATUS:
                    self.stats.dropped_rejected += len(items)
                    logger.error(
                        "poisonwatch rejected a batch of %d %s with %d: %s",
                        len(items),
                        kind.value,
                        response.status_code,
                        response.text[:500],
                    )
                    return set()
                problem = f"HTTP {response.status_code}"
                retry_after = _retry_after_seconds(response)
            if attempt == self.max_retries:
                logger.warning(
                    "sending %d %s failed %d times (%s), keeping them to send again later",
                    len(items),
                    kind.value,
                    attempt + 1,
                    problem,
                )
                break
            self.stats.retries += 1
            delay = min(self.backoff_seconds * 2**attempt, self.max_backoff_seconds) * random.uniform(0.5, 1.0)
            delay = max(delay, retry_after)
            logger.warning("sending %d %s failed (%s); retry %d in %.1f s", len(items), kind.value, problem, attempt + 1, delay)
            with self._condition:
                if self._closed:
                    break
                self._condition.wait(delay)
        return None


def _checked_probabilities(probabilities: Sequence[float] | None, confidence: float | None, predicted_class: int) -> list[float] | None:
    """Check a prediction's probabilities and confidence as the server does, and return the probabilities as floats."""
    if predicted_class < 0:
        raise ValueError(f"predicted_class must be >= 0, got {predicted_class}")
    if confidence is not None and not 0.0 <= float(confidence) <= 1.0:
        raise ValueError(f"confidence must be a finite number in [0, 1], got {confidence}")
    if probabilities is None:
        if confidence is None:
            raise ValueError("give probabilities or confidence; both are missing")
        return None
    try:
        values = [float(value) for value in _flat(probabilities)]
    except (TypeError, ValueError):
        raise ValueError("probabilities must be a flat sequence of numbers") from None
    if not all(0.0 <= value <= 1.0 for value in values):
        raise ValueError("probabilities must be finite numbers in [0, 1]")
    # The plain sum, as the server computes it, so both agree at the tolerance's edge.
    total = sum(values)
    if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"probabilities sum to {total:.6g}, expected 1 within {PROBABILITY_SUM_TOLERANCE}")
    if predicted_class >= len(values):
        raise ValueError(f"predicted_class {predicted_class} is out of range for {len(values)} probabilities")
    implied = values[predicted_class]
    if confidence is not None and abs(float(confidence) - implied) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"confidence {confidence} differs from probabilities[{predicted_class}] = {implied}")
    return values


def _flat(values):
    # NumPy and JAX arrays of any shape are flattened in C order. Other sequences pass as they are.
    if hasattr(values, "ravel"):
        return values.ravel()
    return values


def _float32_base64(values: Sequence[float], shape: Sequence[int]) -> str:
    """Encode ``values`` as little-endian float32 bytes in standard base64, checking them against ``shape``."""
    try:
        values = [float(value) for value in _flat(values)]
    except (TypeError, ValueError):
        raise ValueError("input_data must be a flat sequence of numbers or an array of any shape") from None
    if len(values) != math.prod(shape):
        raise ValueError(f"input_data has {len(values)} values, expected {math.prod(shape)} for input_shape {list(shape)}")
    if not all(map(math.isfinite, values)):
        raise ValueError("input_data: every value must be finite")
    try:
        packed = struct.pack(f"<{len(values)}f", *values)
    except OverflowError:
        raise ValueError("input_data: a value is beyond the float32 range") from None
    return base64.b64encode(packed).decode("ascii")


def _rejected_indices(response: httpx.Response, kind: Kind, items: list[dict]) -> set[int]:
    """Return the indices of the items that a 409 or 422 names, or an empty set when it names none.

    A 422 about one item's field starts its detail with ``predictions[N]``
    (or ``labels[N]``). A 409 conflict and a 422 for labels of unknown
    predictions name the items by ``prediction_id`` in ``errors``.
    """
    if response.status_code not in (409, 422):
        return set()
    try:
        body = response.json()
    except ValueError:
        return set()
    if not isinstance(body, dict):
        return set()
    detail = body.get("detail")
    match = re.match(rf"{kind.value}\[(\d+)\]", detail) if isinstance(detail, str) else None
    if match is not None and int(match.group(1)) < len(items):
        return {int(match.group(1))}
    named = {error.get("prediction_id") for error in body.get("errors") or [] if isinstance(error, dict)}
    named.discard(None)
    # An id repeated within the batch conflicts at its later copies, so its
    # first copy is kept. If that copy conflicts with a stored row too, the
    # next response names it again.
    copies = collections.Counter(item.get("prediction_id") for item in items)
    rejected, seen = set(), set()
    for index, item in enumerate(items):
        prediction_id = item.get("prediction_id")
        if prediction_id not in named:
            continue
        if prediction_id in seen or copies[prediction_id] == 1:
            rejected.add(index)
        seen.add(prediction_id)
    return rejected


def _retry_after_seconds(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0
