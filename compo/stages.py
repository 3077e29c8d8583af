"""The contract between the recipe (:mod:`compo.pipeline`) and its stages.

A run is a :class:`Job` (the policy, its tokenizer, the pairs, their reference scores, the run
dir) handed to four stages in turn: a :class:`Splitter`, a :class:`FirstOrderStage` (DPO and its
variants), a :class:`ZerothOrderStage` (ComPO, with its comparison oracle) and an
:class:`Evaluator`. Each is a Protocol with a do-nothing implementation, which is what a config
group's ``none`` option builds, so the recipe never asks whether a stage is there. Stages return
their metrics as an :class:`Outcome`; the recipe alone writes them.

A data file may hold unpaired examples (prompt, completion, label: KTO's data) instead of pairs.
Each stage says whether it can use them (``unpaired_fix``: None, or the setting that would make
it); :func:`check_unpaired` refuses such a file in one line before any model is loaded.

:class:`ReferenceScores` owns the starting policy's scores of every pair: computed once, on first
use (by ``eval.before``, the splitter or the first-order stage, whichever asks first), through the
first-order stage's frozen-trunk recorder so its later passes skip the frozen blocks, and through
the evaluator's on-disk cache (``reference_cache``) so the jobs of a sweep share one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from compo import settings
from compo.errors import DataError
from compo.interfaces import ComparisonOracle
from compo.reference import ReferenceScores
from compo.reference_cache import ReferenceCache
from compo.splitter import Split

if TYPE_CHECKING:
    from compo.data import DataSpec
    from compo.encoding import EncodedPair
    from compo.rundir import RunDir
    from compo.types import PreferencePair


@dataclass
class Job:
    """What every stage works on.

    ``pairs``, ``encoded`` and ``reference`` are the training pairs. ``heldout`` owns the starting
    policy's scores of the held-out pairs (``data.eval_path`` / ``data.eval_fraction``), or is None
    without a held-out set: only the evaluator reads it (``eval.before`` computes it, before any
    stage changes the policy).
    """

    policy: Any
    tokenizer: Any
    data: DataSpec
    pairs: list[PreferencePair]
    encoded: list[EncodedPair]
    reference: ReferenceScores
    out: RunDir
    heldout: ReferenceScores | None = None

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id


@dataclass
class Outcome:
    """A stage's metrics (``group -> {name: value}``), whether it changed the policy, and
    directories to put inside ``checkpoint/`` by name (a LoRA adapter: ``adapter``)."""

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed: bool = False
    files: dict[str, Path] = field(default_factory=dict)


@runtime_checkable
class Splitter(Protocol):
    """Sends each pair to the clean side (first-order stage) or the ambiguous side (ComPO)."""

    #: None when the stage takes unpaired examples, else the setting that would (splitter=none).
    unpaired_fix: str | None

    def split(
        self,
        model: Any,
        pairs: Sequence,
        encoded: Sequence,
        pad_token_id: int,
        reference: ReferenceScores | None = None,
    ) -> Split: ...


@runtime_checkable
class FirstOrderStage(Protocol):
    """Trains on the clean pairs with a gradient (DPO, IPO, cDPO, rDPO, SimPO)."""

    #: None when the stage trains on unpaired examples, else the setting that would (dpo=kto).
    unpaired_fix: str | None

    def frozen_trunk(self, model: Any) -> Any:
        """An empty cache of the blocks this stage leaves frozen (filled by the reference pass,
        see :mod:`compo.reference`), or None."""
        ...

    def fit(self, job: Job, rows: Sequence[int]) -> Outcome:
        """Trains ``job.policy`` in place on the pairs at ``rows``."""
        ...


@runtime_checkable
class ZerothOrderStage(Protocol):
    """Updates the policy from an oracle's comparisons on the ambiguous pairs (ComPO)."""

    #: Whether :meth:`fit` asks a comparison oracle (``oracle=none`` is refused then).
    needs_oracle: bool
    #: None when the stage takes unpaired examples, else the setting that would (optimizer=none).
    unpaired_fix: str | None

    def fit(self, job: Job, rows: Sequence[int], oracle: ComparisonOracle) -> Outcome:
        """Updates ``job.policy`` in place from ``oracle``'s verdicts on the pairs at ``rows``."""
        ...


@runtime_checkable
class Evaluator(Protocol):
    """Measures the policy before and after training."""

    def reference(
        self, model: Any, encoded: Sequence, pad_token_id: int, trunk: Any = None
    ) -> ReferenceScores:
        """The owner of the starting policy's scores (filling ``trunk`` on the way)."""
        ...

    def before(self, job: Job) -> Outcome: ...

    def after(self, job: Job, split: Split) -> Outcome: ...


# The do-nothing stages accept and ignore settings: an experiment file that switches a stage off
# may still carry that stage's keys from the file it extends (bb_dpo.yaml extends bb_base.yaml).


class NoSplitter:
    """``splitter=none``: every pair (or unpaired example) is clean."""

    unpaired_fix = None

    def __init__(self, **ignored: Any) -> None:
        pass

    def split(self, model, pairs, encoded, pad_token_id, reference=None) -> Split:
        return Split.all_clean(len(encoded))


class NoFirstOrder:
    """``dpo=none``: no first-order training."""

    unpaired_fix = None

    def __init__(self, **ignored: Any) -> None:
        pass

    def frozen_trunk(self, model: Any) -> Any:
        return None

    def fit(self, job: Job, rows: Sequence[int]) -> Outcome:
        return Outcome()


class NoZerothOrder:
    """``optimizer=none``: no zeroth-order updates."""

    def __init__(self, **ignored: Any) -> None:
        pass

    needs_oracle = False
    unpaired_fix = None

    def fit(self, job: Job, rows: Sequence[int], oracle: ComparisonOracle) -> Outcome:
        return Outcome()


def check_unpaired(source: Any, stages: dict[str, Any]) -> None:
    """Refuses a file of unpaired examples when a stage needs preference pairs.

    Args:
        source: The data file (``data.path``), for the message.
        stages: Config group -> stage, e.g. ``{"splitter": ..., "dpo": ..., "optimizer": ...}``.

    Raises:
        DataError: One line naming the groups that need pairs and the settings to change.
    """
    fixes = {group: stage.unpaired_fix for group, stage in stages.items() if stage.unpaired_fix}
    if fixes:
        *others, last = fixes
        groups = f"{', '.join(others)} and {last}" if others else last
        raise DataError(
            f"{source} holds unpaired rows (prompt, completion, label), which {groups} cannot use "
            f"as configured (they need preference pairs); set {' '.join(fixes.values())}"
        )


class NoOracle(ComparisonOracle):
    """``oracle=none``: no oracle (an optimizer that needs one refuses it)."""

    def compare(self, deltas: Any) -> list[float]:
        raise RuntimeError("oracle=none cannot compare")


class NoEval:
    """``eval=none``: no evaluation; the reference scores are computed only if a stage asks.

    Args:
        batch_size: Sequences per forward pass of that reference pass.
        reference_cache: A directory where reference passes are stored and reused
            (:mod:`compo.reference_cache`), or None.
    """

    def __init__(self, batch_size: int = 8, reference_cache: str | None = None) -> None:
        self.batch_size = settings.number("eval.batch_size", batch_size, integer=True, ge=1)
        self.cache = ReferenceCache.at(reference_cache)

    def reference(
        self, model: Any, encoded: Sequence, pad_token_id: int, trunk: Any = None
    ) -> ReferenceScores:
        return ReferenceScores(
            model, encoded, pad_token_id, self.batch_size, "reference", trunk, self.cache
        )

    def before(self, job: Job) -> Outcome:
        return Outcome()

    def after(self, job: Job, split: Split) -> Outcome:
        return Outcome()
