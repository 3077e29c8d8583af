"""The held-out pairs: set aside before any stage sees the data, measured before and after.

The accuracy on the pairs DPO trained on rewards overfitting, so a sweep needs pairs no stage
trains on. They come from a second file (``data.eval_path``) or from a share of the prompts of
``data.path`` (``data.eval_fraction``), drawn by a local generator seeded from the run seed and
grouped by prompt: every pair of a held-out prompt is held out, so no prompt is on both sides (two
replies to one question share most of what the model learns from it).

The held-out pairs never reach the splitter, the first-order stage or ComPO: :class:`LoadResult`
(:mod:`compo.data`) carries them apart from the training pairs, the recipe writes them to
``split/heldout.jsonl`` and hands them only to the evaluator (``eval.heldout.*``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from compo import distributed
from compo.errors import DataError
from compo.rundir import RunDir
from compo.types import PreferencePair

log = logging.getLogger(__name__)

HELDOUT_FILE = "split/heldout"


def prompt_key(pair: PreferencePair) -> str:
    """The prompt as one string (chat messages as canonical JSON): equal keys, one prompt."""
    if isinstance(pair.prompt, str):
        return pair.prompt
    return json.dumps(pair.prompt, sort_keys=True, ensure_ascii=False)


def split_by_prompt(
    pairs: Sequence[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Holds out ``ceil(fraction * prompts)`` prompts with all their pairs, drawn at random.

    Args:
        pairs: The loaded pairs, in file order.
        fraction: Share of the distinct prompts to hold out, in (0, 1).
        seed: Seeds the local generator (the run seed): the same data and seed give the same split
            on every machine.

    Returns:
        ``(training pairs, held-out pairs)``, each in file order.

    Raises:
        DataError: Holding out that share would leave no prompt to train on.
    """
    groups: dict[str, list[int]] = {}  # insertion order: first appearance in the file
    for i, pair in enumerate(pairs):
        groups.setdefault(prompt_key(pair), []).append(i)
    keys = list(groups)
    n_held = math.ceil(fraction * len(keys))
    if n_held >= len(keys):
        raise DataError(
            f"data.eval_fraction={fraction}: holding out {n_held} of {len(keys)} distinct prompts "
            "leaves none to train on; lower it or give more pairs"
        )
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {keys[j] for j in order[:n_held]}
    train = [p for p in pairs if prompt_key(p) not in held]
    heldout = [p for p in pairs if prompt_key(p) in held]
    return train, heldout


def record_heldout(
    out: RunDir, train: Sequence[PreferencePair], heldout: Sequence[PreferencePair]
) -> dict[str, Any]:
    """Writes ``split/heldout.jsonl`` and returns the ``data.heldout.*`` metrics.

    With no held-out pairs, a ``split/heldout.jsonl`` left by an earlier run in the same dir is
    removed (it would describe a split this run did not make) and no metric is returned.
    A held-out prompt that also occurs among the training pairs (possible only with a separate
    ``data.eval_path``) is counted and warned about: its pairs do not measure generalisation.
    """
    if not heldout:
        if distributed.is_main():  # other ranks write (and delete) nothing in the run dir
            (out.path / f"{HELDOUT_FILE}.jsonl").unlink(missing_ok=True)
        return {}
    out.write_rows(HELDOUT_FILE, [p.to_dict() for p in heldout])
    held_prompts = {prompt_key(p) for p in heldout}
    shared = count_shared(
        held_prompts,
        {prompt_key(p) for p in train},
        "data",
        "the training pairs",
        "data.heldout.n_prompts_shared",
    )
    log.info("data: %d pairs held out (%d prompts)", len(heldout), len(held_prompts))
    return {"n_pairs": len(heldout), "n_prompts": len(held_prompts), "n_prompts_shared": shared}


def count_shared(held: set, trained: set, stage: str, where: str, metric: str) -> int:
    """How many held-out prompts are also trained on; one warning line when any.

    Args:
        held: The held-out prompts (any hashable key, e.g. :func:`prompt_key` or token ids).
        trained: The prompts a stage trains on, keyed the same way.
        stage: Prefix of the warning (``data``, ``compo``).
        where: What holds ``trained``, for the warning.
        metric: The metric that records the count, named in the warning.
    """
    shared = held & trained
    if shared:
        log.warning(
            "%s: %d of %d held-out prompts also occur in %s; their held-out metrics do not "
            "measure generalisation (%s)",
            stage, len(shared), len(held), where, metric,
        )  # fmt: skip
    return len(shared)
