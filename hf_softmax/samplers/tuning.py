"""What a sampler settles at run time about its index: the query effort and the backend.

``Sampler`` (``samplers/base.py``) mixes this in.

- The query effort (annoy ``search_k``, hnsw ``ef``, faiss ``nprobe`` / ``efSearch``: the
  attribute ``effort_knob`` names) that ``callbacks.index_rebuild.target_recall`` tunes
  (``hf_softmax/recall_target.py``);
- ``prepare``, once before the first build (``IndexMaintainer.start``): ``auto`` picks its
  backend there, racing its candidates for a target recall (``samplers/race.py``); its
  ``choice`` goes into the rebuild callback's checkpoint state, so a resumed run builds the
  same; ``builder`` is the sampler a build worker runs a copy of.
"""

from __future__ import annotations

from typing import Any


class SamplerTuning:
    """Query effort and backend choice; defaults for a sampler that decides nothing."""

    effort_knob: str | None = None  # the query-effort knob ``target_recall`` tunes, if any

    # -- query effort (sampler.target_recall, hf_softmax/recall_target.py) ------------------
    @property
    def effort(self) -> int | None:
        """The value of ``effort_knob`` (annoy ``search_k``, hnsw ``ef``); None without one."""
        return None if self.effort_knob is None else getattr(self, self.effort_knob)

    @effort.setter
    def effort(self, value: int) -> None:
        if self.effort_knob is not None:
            if not hasattr(self, "_configured_effort"):  # the first tune: keep the config's
                self._configured_effort = getattr(self, self.effort_knob)
            setattr(self, self.effort_knob, int(value))

    @property
    def configured_effort(self) -> int | None:
        """The knob's value as configured, before any tuning (``default_effort`` builds on it:
        tuning lowers the effort back to it, never below)."""
        return getattr(self, "_configured_effort", self.effort)

    def default_effort(self, k: int) -> int | None:
        """The effort the index uses at the step's k when not tuned (None without a knob)."""
        return None

    @property
    def effort_limit(self) -> int:
        """The effort past which the knob changes nothing (an exhaustive search): N here;
        faiss IVF: its nlist cells."""
        return int(self.num_classes)

    def prepare(self, shape: Any, weights: Any, target_recall: float | None = None) -> Any:
        """Once, before the first build (``IndexMaintainer.start``): shape (N, D) of the rows,
        weights a function returning their snapshot. ``auto`` picks its backend here.
        Returns (index, snapshot) where it built one (the first build uses it), else None."""
        return None

    @property
    def choice(self) -> dict[str, Any] | None:
        """What ``prepare`` decided (``auto``: backend and effort), kept in the checkpoint so
        a resumed run builds the same; None: nothing to keep."""
        return None

    @choice.setter
    def choice(self, value: dict[str, Any] | None) -> None:
        """Restore a checkpoint's ``choice`` before ``prepare`` (nothing to restore here)."""

    def adopt(self, choice: dict[str, Any]) -> None:
        """Take another process's ``choice`` in place of this one's (DDP: rank 0's)."""

    @property
    def builder(self) -> SamplerTuning:
        """The sampler whose ``build_index`` makes this one's indexes (a build worker runs a
        copy of it): itself, or ``auto``'s chosen backend."""
        return self
