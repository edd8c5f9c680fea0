"""What a memory measures on its own slots and keeps up to date as they change: the softmax
temperature (when it is ``"auto"``, :mod:`engine.tuning.temperature`) and the search breadth of an
approximate index (:mod:`engine.index.calibration`, via :meth:`State.upkeep_breadth`).

Both are settings measured on the side of a write that is already durable: a failure keeps
the previous setting and is logged, never failing the write.
"""

from __future__ import annotations

import logging

from .. import checks
from ..errors import EmptyMemoryError, InvalidValueError, StorageError
from ..metric import Metric
from ..state import Current
from ..store import Store
from . import temperature as choice

log = logging.getLogger(__name__)


class Tuning:
    """A memory's temperature (the value attended at, whether it is chosen, the last choice's
    report); the caller holds the memory's write mutex in every method."""

    def __init__(self, temperature: float | str):
        self.auto = temperature == "auto"
        self.value = choice.FALLBACK if self.auto else float(temperature)
        self.report: choice.TemperatureReport | None = None

    def use(self, current: Current, value: float, report: choice.TemperatureReport | None = None) -> None:
        """Attend at ``value`` from here on (the index calibrates its breadth for the answer at it)."""
        with current.lock.write():
            self.value = current.state.index.temperature = value
            self.report = report if report is not None else self.report

    def restore(self, current: Current, saved: dict | None) -> None:
        """An "auto" memory reopened attends at the choice it saved (before its index is built:
        its breadth is measured at it)."""
        report = choice.TemperatureReport.from_dict(saved)
        if self.auto and report is not None and choice.valid(report.temperature):
            self.use(current, float(report.temperature), report)

    def upkeep(self, current: Current, metric: Metric, store: Store | None, *, breadth: bool = True) -> None:
        """After a write: measure the breadth again when due (``breadth``: after writes that
        add slots or change a setting the breadth is measured at), then choose the
        temperature again when due (``auto``: once the memory can measure it, then whenever it
        grew or shrank 2x since), persisted so that a reopen answers at it, and measure the
        breadth again if the new temperature made its calibration stale. The breadth comes
        first so that a drift check (and the retraining of IVF lists fit to other data) is
        not passed over by a calibration the new temperature made stale."""
        if breadth:
            self._breadth(current)
        report = None
        if self.auto and choice.due(self.report, current.state.table.n_alive):
            try:
                report = choice.calibrate(current.state, self.value, metric=metric)
            except Exception:  # noqa: BLE001 - a setting measured on the side
                log.warning("choosing the temperature failed; it stays %g", self.value, exc_info=True)
        if report is not None:
            self.use(current, report.temperature, report)
            if store is not None:
                try:
                    store.update(temperature_report=report.as_dict())
                except (StorageError, ValueError):
                    log.warning("the temperature choice is not in the manifest yet; the next checkpoint writes it")
            self._breadth(current)

    @staticmethod
    def _breadth(current: Current) -> None:
        try:
            current.upkeep_breadth()
        except Exception:  # noqa: BLE001 - a search setting, never worth failing a durable write
            log.warning("measuring the search breadth again failed; it stays as it was", exc_info=True)

    def calibrate(self, current: Current, metric: Metric, *, k: int, sample: int, seed: int
                  ) -> choice.TemperatureReport:
        """A choice made now on the memory's own slots (:func:`engine.tuning.temperature.calibrate`).

        Raises:
            InvalidValueError: k, sample or seed out of range.
            EmptyMemoryError: fewer than MIN_SLOTS slots, or a single class.
        """
        k, sample, seed = checks.integer("k", k), checks.integer("sample", sample), checks.integer("seed", seed, low=0)
        if k > choice.MAX_K or sample > choice.MAX_SAMPLE:
            raise InvalidValueError(f"k must be at most {choice.MAX_K} and sample at most {choice.MAX_SAMPLE}, "
                                    f"got k={k}, sample={sample}")
        report = choice.calibrate(current.state, self.value, metric=metric, k=k, sample=sample, seed=seed)
        if report is None:
            raise EmptyMemoryError(f"choosing a temperature needs {choice.MIN_SLOTS} slots of two classes or more")
        return report

    def as_manifest(self) -> dict:
        return {"temperature_report": self.report.as_dict() if self.report is not None else None}
