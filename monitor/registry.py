"""Loading the configured models and registering their versions and manifests."""

from __future__ import annotations

import hashlib
import logging
import threading

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from monitor.config import Config, ModelConfig
from monitor.loader import ModelBundle, load_bundle
from storage import queries
from storage.models import ModelVersion

logger = logging.getLogger(__name__)


def content_hash(x: np.ndarray) -> str:
    """SHA-256 of an input's canonical form: its shape, then its values as little-endian float32 in C order."""
    canonical = np.ascontiguousarray(x, dtype="<f4")
    digest = hashlib.sha256(repr(tuple(canonical.shape)).encode())
    digest.update(canonical.tobytes())
    return digest.hexdigest()


def manifest_rows(bundle: ModelBundle) -> list[queries.ManifestRow]:
    train = bundle.train
    return [
        queries.ManifestRow(
            example_id=str(train.ids[row]),
            content_hash=content_hash(train.x[row]),
            label=int(train.y[row]),
            source=str(train.sources[row]),
        )
        for row in range(len(train.ids))
    ]


class ModelRegistry:
    """The loaded bundle of each configured model's current version, loaded once and shared."""

    def __init__(self, config: Config, session_factory: sessionmaker[Session]) -> None:
        self._config = config
        self._session_factory = session_factory
        self._bundles: dict[str, ModelBundle] = {}
        self._version_ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def load_all(self) -> None:
        """Load every configured model and register its version; the version becomes current."""
        for model in self._config.models:
            self.load(model)

    def load(self, model: ModelConfig) -> ModelBundle:
        with self._lock:
            bundle = load_bundle(model.loader, model.options)
            with self._session_factory.begin() as session:
                version = queries.register_model_version(
                    session,
                    model=model.name,
                    version=bundle.version,
                    loader=model.loader,
                    input_shape=bundle.input_shape,
                    num_classes=bundle.num_classes,
                    manifest=manifest_rows(bundle),
                )
                version_id = version.id
            logger.info(
                "loaded model %s version %s with %d training examples",
                model.name,
                bundle.version,
                len(bundle.train.ids),
            )
            self._bundles[model.name] = bundle
            self._version_ids[model.name] = version_id
            return bundle

    def bundle_for(self, version: ModelVersion) -> ModelBundle | None:
        """Return the loaded bundle of ``version``, or None when that version is not the one loaded."""
        bundle = self._bundles.get(version.model)
        if bundle is None or self._version_ids.get(version.model) != version.id:
            return None
        return bundle

    def items(self) -> list[tuple[str, int, ModelBundle]]:
        """Return ``(model name, model version id, bundle)`` for each loaded model."""
        return [(name, self._version_ids[name], bundle) for name, bundle in self._bundles.items()]
