"""Per-version release checks: results computed once per model version and reused by every incident.

Two checks exist: the loss-gradient norm of every training example (the
normaliser of the default ranking score) and the top eigenpairs of the damped
Hessian (for the ``factors`` solver). Both are stored in ``release_checks``
with a format version, so a restart or another replica loads them instead of
computing them again, and a stored result of an older format is recomputed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from detectors import factors as hessian_factors
from detectors import influence, ranking, subset
from monitor.config import InfluenceConfig
from monitor.loader import LossFn, ModelBundle, Params
from storage import queries
from storage.models import ReleaseCheckKind

logger = logging.getLogger(__name__)

# Format of stored gradient norms: float32 little-endian, one value per training row.
GRADIENT_NORMS_FORMAT = 1


@dataclasses.dataclass
class VersionChecks:
    """The release-check results of one model version, as far as they were needed so far.

    ``loss`` and ``params`` are what influence differentiates: the bundle's, or
    those of its parameter subset when the bundle names one. They are built
    once per version because jitted influence functions cache per loss object.
    """

    loss: LossFn
    params: Params
    gradient_norms: np.ndarray | None = None
    factors: hessian_factors.HessianFactors | None = None


def influence_problem(bundle: ModelBundle) -> tuple[LossFn, Params]:
    """Return the loss and parameters influence uses for ``bundle``, restricted to its subset if any."""
    if bundle.influence_params is None:
        return bundle.loss_fn, bundle.params
    restricted = subset.restrict_to_subset(bundle.loss_fn, bundle.params, bundle.influence_params)
    return restricted.loss, restricted.params


class ReleaseChecks:
    """Computes, stores and caches release-check results; one process computes each at most once per version.

    Safe to call from several job threads: a per-version lock makes the second
    caller wait for the first one's result instead of computing it again.
    """

    def __init__(self, session_factory: sessionmaker[Session], settings: InfluenceConfig) -> None:
        self._session_factory = session_factory
        self._settings = settings
        self._results: dict[int, VersionChecks] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def needs_gradient_norms(self) -> bool:
        return self._settings.score == ranking.ScoreKind.GRADIENT_NORM.value

    def needs_factors(self) -> bool:
        return self._settings.solver == influence.SolverKind.FACTORS.value

    def ensure(self, version_id: int, bundle: ModelBundle) -> VersionChecks:
        """Return the checks the configuration needs for ``version_id``, loading or computing each once."""
        with self._guard:
            lock = self._locks.setdefault(version_id, threading.Lock())
        with lock:
            checks = self._results.get(version_id)
            if checks is None:
                loss, params = influence_problem(bundle)
                checks = self._results[version_id] = VersionChecks(loss=loss, params=params)
            if self.needs_gradient_norms() and checks.gradient_norms is None:
                checks.gradient_norms = self._gradient_norms(version_id, bundle, checks)
            if self.needs_factors() and checks.factors is None:
                checks.factors = self._factors(version_id, bundle, checks)
        return checks

    def _gradient_norms(self, version_id: int, bundle: ModelBundle, checks: VersionChecks) -> np.ndarray:
        num_examples = len(bundle.train.ids)
        with self._session_factory() as session:
            stored = queries.get_release_check(session, version_id, ReleaseCheckKind.GRADIENT_NORMS)
        if stored is not None and stored.format_version == GRADIENT_NORMS_FORMAT:
            norms = np.frombuffer(stored.data, dtype="<f4")
            if norms.shape == (num_examples,):
                return norms
            logger.warning(
                "stored gradient norms of model version %d have %d rows, expected %d; recomputing",
                version_id,
                norms.shape[0],
                num_examples,
            )

        started = time.perf_counter()
        norms = ranking.example_gradient_norms(
            checks.loss, checks.params, bundle.train.x, bundle.train.y, batch_size=self._settings.batch_size
        ).astype("<f4")
        seconds = time.perf_counter() - started
        if not np.isfinite(norms).all():
            raise FloatingPointError(f"gradient norms of model version {version_id} contain non-finite values")
        self._store(version_id, ReleaseCheckKind.GRADIENT_NORMS, GRADIENT_NORMS_FORMAT, norms.tobytes(), seconds)
        logger.info("release check: gradient norms of model version %d computed in %.2f s", version_id, seconds)
        return norms

    def _factors(self, version_id: int, bundle: ModelBundle, checks: VersionChecks) -> hessian_factors.HessianFactors:
        with self._session_factory() as session:
            stored = queries.get_release_check(session, version_id, ReleaseCheckKind.HESSIAN_FACTORS)
        if stored is not None:
            try:
                return hessian_factors.factors_from_bytes(stored.data)
            except ValueError as error:
                logger.warning("stored Hessian factors of model version %d are unusable (%s); recomputing", version_id, error)

        settings = self._settings
        started = time.perf_counter()
        hvp = influence.make_objective_hvp(
            checks.loss,
            checks.params,
            bundle.train.x,
            bundle.train.y,
            l2=bundle.l2,
            damping=settings.damping,
            batch_size=settings.batch_size,
        )
        factors = hessian_factors.compute_factors(
            hvp, checks.params, settings.factor_rank, damping=settings.damping, l2=bundle.l2
        )
        seconds = time.perf_counter() - started
        self._store(
            version_id,
            ReleaseCheckKind.HESSIAN_FACTORS,
            hessian_factors.FORMAT_VERSION,
            hessian_factors.factors_to_bytes(factors),
            seconds,
        )
        logger.info(
            "release check: %d Hessian eigenpairs of model version %d computed in %.2f s",
            factors.rank,
            version_id,
            seconds,
        )
        return factors

    def _store(self, version_id: int, kind: ReleaseCheckKind, format_version: int, data: bytes, seconds: float) -> None:
        with self._session_factory.begin() as session:
            queries.store_release_check(
                session, version_id, kind, format_version=format_version, data=data, seconds=seconds
            )
