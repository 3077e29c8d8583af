"""An on-disk, content-addressed cache of the starting policy's reference pass.

Every run scores every training pair under the starting policy (the reference pass: ~4 minutes for
360 pairs of SmolLM2-135M on one CPU thread) and, under ``dpo.scope=last_k``, records the frozen
trunk's hidden states on the way (:class:`compo.trunk.FrozenTrunkCache`). The jobs of a sweep or a
benchmark repeat that pass on the same pairs with the same starting model; with
``reference_cache=<dir>`` the first one stores its result and the others load it.

An entry's key is the sha256 of everything its numbers depend on (:func:`key_parts`), so a hit
returns what the pass would have computed, bit for bit. The trunk's split point is part of the
key: an entry without trunk states (or with another split's) never serves a run that needs them.

An entry is two files, each written atomically: ``<key>.<sha16>.safetensors`` (the scores and the
trunk states; never pickle) and ``<key>.json`` (the key parts, readable, and the data file's name
and sha256), the JSON last: it is the commit point. The data file is named after its content, so
two jobs writing one entry at once never pair one's JSON with the other's data: the last JSON
rename wins and names a complete file. Loading checks the key, the sha256 and every tensor's shape;
an entry failing a check is one warning, then recomputed and overwritten, never used.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from compo import distributed, settings, state
from compo.rundir import atomic_write_bytes, atomic_write_json
from compo.scoring import SequenceScores

log = logging.getLogger(__name__)

Scores = tuple[SequenceScores, ...]  # (chosen, rejected) of pairs; (completion,) of examples
States = dict[tuple[int, ...], Tensor]  # FrozenTrunkCache.states: token ids -> first-block input

# Bumped when the entry layout or the meaning of a key part changes: older entries then miss.
FORMAT = 1
# compo's own code that computes the numbers: an edit there makes every older entry miss.
_CODE = ("scoring.py", "trunk.py")
# The per-sequence fields of SequenceScores (the reference pass asks for no hidden states).
_FIELDS = ("sum_logps", "mean_logps", "n_tokens", "head_logps")
_REQUIRED = _FIELDS[:3]


class _Unusable(Exception):
    """An entry that must not be used (the message says why)."""


class ReferenceCache:
    """A directory of reference-pass entries, shared by any number of runs.

    Args:
        path: The directory; created on the first write.
        key: The setting's name, for error messages.

    Raises:
        SettingError: ``path`` is empty, exists and is not a directory, or cannot be written
            (checked on the nearest existing ancestor when it does not exist yet).
    """

    def __init__(self, path: str | os.PathLike, key: str = "reference_cache") -> None:
        if not isinstance(path, os.PathLike):
            settings.text(key, path)
        if not str(path).strip():
            raise settings.SettingError(f"{key} must be a directory or null, got ''")
        self.path = Path(path).expanduser()
        # Checked now, not at the first write: a bad path must fail before a minute of work.
        full = self.path.absolute()
        existing = next(p for p in (full, *full.parents) if p.exists())
        if not existing.is_dir():
            where = "" if existing == full else f" ({existing} is a file)"
            raise settings.SettingError(f"{key}={path}: not a directory{where}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise settings.SettingError(f"{key}={path}: {existing} is not writable")

    @classmethod
    def at(
        cls, path: str | os.PathLike | None, key: str = "reference_cache"
    ) -> ReferenceCache | None:
        """The cache at ``path``, or None (the cache is off) when ``path`` is None."""
        return None if path is None else cls(path, key)

    def fetch(
        self,
        model: Any,
        encoded: Sequence,
        pad_token_id: int,
        batch_size: int,
        trunk: Any,
        compute: Callable[[], Scores],
    ) -> tuple[Scores, bool]:
        """The scores of the pass ``compute`` runs: loaded from the entry of its key, or computed
        and stored.

        Args:
            model: The model ``compute`` scores with (the starting policy).
            encoded: The encoded pairs (or unpaired examples) it scores.
            pad_token_id: Padding id.
            batch_size: Sequences per forward pass.
            trunk: The :class:`compo.trunk.FrozenTrunkCache` the pass fills, or None. On a hit it
                is filled from the entry, as the pass would have filled it.
            compute: Runs the pass (filling ``trunk``) and returns its scores.

        Returns:
            ``(scores, hit)``.
        """
        parts = key_parts(model, encoded, pad_token_id, batch_size, trunk)
        key = state.fingerprint(parts)
        k = len(encoded[0].replies) if encoded else 2
        what = f"{len(encoded)} {'pairs' if k == 2 else 'examples'}"
        device = model.get_output_embeddings().weight.device
        found = self._load(key, len(encoded), k, trunk is not None, device)
        if found is not None:
            scores, states = found
            if trunk is not None:
                trunk.states.update(states)
            log.info("reference: reused %s/%s (%s)", self.path, key[:12], what)
            return scores, True
        before = dict(trunk.states) if trunk is not None else {}
        scores = compute()
        if distributed.is_main():  # every rank computed the same; one writes it
            recorded = None
            if trunk is not None:  # what this pass recorded (new or overwritten), nothing older
                recorded = {ids: s for ids, s in trunk.states.items() if before.get(ids) is not s}
            self._store(key, parts, scores, recorded, what)
        return scores, False

    def _load(
        self, key: str, n: int, k: int, with_trunk: bool, device: torch.device
    ) -> tuple[Scores, States | None] | None:
        index = self.path / f"{key}.json"
        if not index.is_file():
            return None
        try:
            return self._read(index, key, n, k, with_trunk, device)
        # Whatever is wrong with an entry (edited, truncated, half-deleted, another version's
        # layout), the run recomputes: a cache must never be the reason a run fails.
        except Exception as exc:
            reason = str(exc) if isinstance(exc, _Unusable) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "reference: cache entry %s/%s is unusable (%s); recomputing it",
                self.path, key[:12], reason,
            )  # fmt: skip
            return None

    def _read(
        self, index: Path, key: str, n: int, k: int, with_trunk: bool, device: torch.device
    ) -> tuple[Scores, States | None]:
        record = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise _Unusable("not an entry of this version")
        if record.get("key") != key or state.fingerprint(record.get("parts")) != key:
            raise _Unusable("its key parts do not match its name")
        name = record.get("file")
        if not isinstance(name, str) or Path(name).name != name or not name.startswith(key):
            raise _Unusable("it names no data file of its own")
        data = (self.path / name).read_bytes()
        if state.sha256_bytes(data) != record.get("sha256"):
            raise _Unusable(f"{name} does not match its sha256")
        tensors = safetensors_load(data)
        scores = _scores_from(tensors, n, k, device)
        if not with_trunk:
            return scores, None
        if "trunk.states" not in tensors:
            raise _Unusable("it holds no trunk states")
        return scores, _states_from(tensors, device)

    def _store(
        self, key: str, parts: dict, scores: Scores, states: States | None, what: str
    ) -> None:
        data = safetensors_save(_tensors_of(scores, states))
        digest = state.sha256_bytes(data)
        name = f"{key}.{digest[:16]}.safetensors"
        record = {
            "format": FORMAT,
            "key": key,
            "parts": parts,
            "file": name,
            "sha256": digest,
            "bytes": len(data),
            "trunk_sequences": len(states) if states is not None else None,
        }
        try:
            atomic_write_bytes(self.path / name, data)
            atomic_write_json(self.path / f"{key}.json", record)  # the commit point
        except OSError as exc:  # a full disk costs the next run a pass, not this run its result
            log.warning(
                "reference: could not store %s/%s (%s); the run goes on without it",
                self.path, key[:12], exc,
            )  # fmt: skip
            return
        size = f"{len(data) / 1e6:.1f} MB" if len(data) >= 1e5 else f"{len(data) / 1e3:.1f} kB"
        log.info("reference: stored %s/%s (%s, %s)", self.path, key[:12], what, size)


def key_parts(
    model: Any, encoded: Sequence, pad_token_id: int, batch_size: int, trunk: Any = None
) -> dict[str, Any]:
    """Everything the reference pass's numbers depend on, readable (digests of the large parts).

    Its sha256 (:func:`compo.state.fingerprint`) is the entry's key. It holds no path, no
    setting beyond these and no secret: it is written next to the entry.

    Args:
        model: The model scoring the pairs.
        encoded: The encoded pairs (or unpaired examples), in order.
        pad_token_id: Padding id.
        batch_size: Sequences per forward pass (padding changes the float result in the last
            bits).
        trunk: The :class:`compo.trunk.FrozenTrunkCache` the pass fills, or None.
    """
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    sequences = [[list(p.prompt_ids), *(list(r) for r in p.replies)] for p in encoded]
    return {
        "format": FORMAT,
        "weights": state.digest_named_tensors(named),
        "model": {
            "class": type(model).__name__,
            "config": state.fingerprint(config),
            "attention": getattr(model.config, "_attn_implementation", None),
            "dtypes": sorted({str(t.dtype) for _, t in named if t.is_floating_point()}),
            "device": model.get_output_embeddings().weight.device.type,
            "training": model.training,  # dropout
        },
        "runtime": {
            "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"),
            "threads": torch.get_num_threads(),  # CPU kernels may split sums by thread count
            "code": _code_digest(),
        },
        "pad_token_id": pad_token_id,
        "batch_size": batch_size,
        "sequences": {
            "n": len(encoded),
            "replies": len(encoded[0].replies) if encoded else 0,
            "sha256": state.fingerprint({"ids": sequences}),
        },
        "trunk": None if trunk is None else {"last_k": len(trunk.top), "blocks": len(trunk.blocks)},
    }


@functools.cache
def _code_digest() -> str:
    here = Path(__file__).resolve().parent
    return state.fingerprint({n: state.sha256_bytes((here / n).read_bytes()) for n in _CODE})


def _tensors_of(scores: Scores, states: States | None) -> dict[str, Tensor]:
    out = {}
    for j, each in enumerate(scores):
        for field in _FIELDS:
            value = getattr(each, field)
            if value is not None:  # copies: the replies' scores are views of one tensor, and
                # safetensors refuses tensors sharing memory
                out[f"scores.{j}.{field}"] = (
                    value.detach().cpu().clone(memory_format=torch.contiguous_format)
                )
    if states is not None:
        ids = list(states)
        out["trunk.ids"] = torch.tensor([t for seq in ids for t in seq], dtype=torch.long)
        out["trunk.lengths"] = torch.tensor([len(seq) for seq in ids], dtype=torch.long)
        out["trunk.states"] = torch.cat([states[seq].detach().cpu() for seq in ids])
    return out


def _scores_from(tensors: dict[str, Tensor], n: int, k: int, device: torch.device) -> Scores:
    expected = {f"scores.{j}.{f}" for j in range(k) for f in _FIELDS}
    extra = {name for name in tensors if name.startswith("scores.")} - expected
    if extra:
        raise _Unusable(f"unexpected tensors {sorted(extra)}")
    scores = []
    for j in range(k):
        fields = {f: tensors.get(f"scores.{j}.{f}") for f in _FIELDS}
        if any(fields[f] is None for f in _REQUIRED):
            raise _Unusable(f"reply {j}'s scores are missing")
        for f, value in fields.items():
            if value is not None and tuple(value.shape) != (n,):
                raise _Unusable(f"scores.{j}.{f} has shape {tuple(value.shape)}, not ({n},)")
        moved = {f: v.to(device) if v is not None else None for f, v in fields.items()}
        scores.append(SequenceScores(**moved))
    return tuple(scores)


def _states_from(tensors: dict[str, Tensor], device: torch.device) -> States:
    ids, lengths, hidden = (tensors.get(f"trunk.{f}") for f in ("ids", "lengths", "states"))
    if ids is None or lengths is None or hidden.ndim != 2 or ids.ndim != 1 or lengths.ndim != 1:
        raise _Unusable("malformed trunk states")
    if bool((lengths <= 0).any()) or not int(lengths.sum()) == ids.numel() == hidden.shape[0]:
        raise _Unusable("the trunk states do not match their token ids")
    sizes = lengths.tolist()
    hidden = hidden.to(device)
    return {
        tuple(seq.tolist()): h for seq, h in zip(ids.split(sizes), hidden.split(sizes), strict=True)
    }
