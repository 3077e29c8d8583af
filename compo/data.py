"""Preference pairs: loading and validating files (reading them: :mod:`compo.readers`;
tokenization: :mod:`compo.encoding`).

Supported files: JSONL, JSON (an array of objects, or one object per line), CSV and Parquet; also a
directory written by ``datasets.save_to_disk`` and a Hugging Face hub dataset id (with a split; see
:mod:`compo.sources`), whose rows are validated the same way. The public schemas:

* string fields ``prompt``, ``chosen``, ``rejected`` (e.g. UltraFeedback-binarized's ``prompt``);
* ``chosen``/``rejected`` as chat-message lists sharing the prompt turns (HH-RLHF and UltraFeedback
  in their conversational form); the last message of each must be the assistant's reply;
* ``prompt`` as a message list with one-message ``chosen``/``rejected`` lists (TRL's
  conversational preference format);
* raw HH-RLHF transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` in ``chosen``/``rejected``,
  no ``prompt``).

Unpaired rows (KTO's data, TRL's unpaired preference format): ``prompt`` (a string or chat
messages), ``completion`` (a string, or chat messages ending with the assistant's reply; turns
before it are the prompt when there is no ``prompt``) and ``label`` (true: desirable, false:
undesirable; also ``"true"``/``"false"`` as text, as in CSV, and 1/0). A file holds one kind: its
first valid row decides, and a row of the other kind is a bad row; :func:`load_pairs` reads files
of unpaired rows only when asked (``unpaired=True``; :class:`compo.types.UnpairedExample` items).

Optional fields: ``id`` (default ``<file stem>-<row>``), ``confidence`` in [0, 1] (default 1.0);
every other field is kept in ``metadata``. Rows are numbered from 1 in file order (for JSONL
without blank lines, the row is the line number).

Each row keeps the types its file gives it: in JSON a reply must be a string (``42`` is an error of
that row), ids are strings or integers; a CSV cell is always text (``42``, ``None``, ``N/A`` and
``007`` are kept as written, also in ``metadata``) except ``confidence``, read as a number (an
empty cell: not given). Parquet columns have the types stored in the file. Files are read afresh on
every load: nothing is cached.

A bad row (missing or empty field, wrong type, identical chosen and rejected, undecodable bytes,
invalid JSON) stops the load with one line naming file, row and field, or, with
``on_error="skip"``, is returned in :attr:`LoadResult.rejected` with its reason.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compo import settings
from compo.encoding import CHAT_TEMPLATE_MODES, encode_rows
from compo.errors import DataError
from compo.heldout import split_by_prompt
from compo.readers import RowError, read_source
from compo.types import Message, PreferencePair, UnpairedExample

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ON_ERROR = ("raise", "skip")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass
class RejectedRow:
    """A row left out under ``on_error=skip``, with why."""

    source: str
    row: int
    field: str | None
    reason: str
    record: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "row": self.row,
            "field": self.field,
            "reason": self.reason,
            "record": self.record,
        }


@dataclass
class LoadResult:
    """The valid rows of a file (preference pairs, or unpaired examples) and the rejected ones."""

    pairs: list[PreferencePair] | list[UnpairedExample]
    rejected: list[RejectedRow]
    heldout: list[PreferencePair] = field(default_factory=list)

    @property
    def unpaired(self) -> bool:
        """Whether the file holds unpaired rows (``pairs`` are UnpairedExample items)."""
        return bool(self.pairs) and isinstance(self.pairs[0], UnpairedExample)


# --------------------------------------------------------------------------------------------
# Validating records
# --------------------------------------------------------------------------------------------


def _text(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if value is None:
        raise RowError(name, "is missing")
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(name, "is empty")
    return value


def _messages(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError(name, "expected a non-empty list of chat messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {"role", "content"} - {"name"}:
            raise RowError(name, f"message {i}: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(name, f"message {i}: role {role!r} is not one of {list(ROLES)}")
        if not isinstance(content, str):
            raise RowError(name, f"message {i}: content must be a string")
        out.append({"role": role, "content": content})
    return out


def _parse_hh_transcript(text: str, name: str) -> list[Message]:
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(
            name, "expected an HH-RLHF transcript ('\\n\\nHuman: ... \\n\\nAssistant: ...')"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[r], "content": c.strip()}
        for r, c in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _split_conversation(messages: list[Message], name: str) -> tuple[list[Message], str]:
    if messages[-1]["role"] != "assistant":
        raise RowError(name, "the last message must be the assistant's reply")
    reply = messages[-1]["content"]
    if not reply.strip():
        raise RowError(name, "the assistant's reply is empty")
    return messages[:-1], reply


def _confidence(record: dict[str, Any]) -> float:
    value = record.get("confidence")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        got = repr(value) if isinstance(value, str) else type(value).__name__
        raise RowError("confidence", f"expected a number, got {got}")
    if not 0.0 <= value <= 1.0:  # false for NaN; no float() of a 400-digit integer
        shown = str(value) if len(str(value)) <= 20 else f"{str(value)[:17]}..."
        raise RowError("confidence", f"must be in [0, 1], got {shown}")
    return float(value)


def _prompt_and_replies(record: dict[str, Any]) -> tuple[str | list[Message], str, str]:
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise RowError(name, "is missing")
        # A JSON number is not a reply: the file says it is a number, so the row is at fault (a
        # CSV cell is always text, so "42" there is a valid reply).
        if not isinstance(value, str | list):
            raise RowError(name, f"expected a string or chat messages, got {type(value).__name__}")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None and chosen.startswith("\n\nHuman:"):
            chosen_msgs = _parse_hh_transcript(chosen, "chosen")
            rejected_msgs = _parse_hh_transcript(rejected, "rejected")
        else:
            prompt_value = (
                _messages(prompt, "prompt") if isinstance(prompt, list) else _text(record, "prompt")
            )
            return prompt_value, _text(record, "chosen"), _text(record, "rejected")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen_msgs, rejected_msgs = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    else:
        raise RowError(
            "rejected", "chosen and rejected must both be strings or both be message lists"
        )
    chosen_turns, chosen_reply = _split_conversation(chosen_msgs, "chosen")
    rejected_turns, rejected_reply = _split_conversation(rejected_msgs, "rejected")
    if chosen_turns != rejected_turns:
        raise RowError("rejected", "its prompt turns differ from those of chosen")
    if chosen_turns:
        turns: str | list[Message] = chosen_turns
    elif isinstance(prompt, list):
        turns = _messages(prompt, "prompt")
    else:
        turns = _text(record, "prompt")
    if isinstance(turns, list) and not any(m["content"].strip() for m in turns):
        raise RowError("prompt", "is empty")
    return turns, chosen_reply, rejected_reply


def _check_unicode(value: Any, field: str | None) -> None:
    """Raises RowError for a lone surrogate (``"\\ud800"`` in JSON): not text any tokenizer or
    UTF-8 file can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RowError(
                field, f"holds {value[exc.start]!r}, which is not valid Unicode text"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(item, field or str(key))
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item, field)


def as_object(record: Any) -> dict[str, Any]:
    """A source row as a dict; raises its RowError (unreadable row) or one for a non-object."""
    if isinstance(record, RowError):
        raise record
    if not isinstance(record, dict):
        raise RowError(None, f"expected an object, got {type(record).__name__}")
    return record


def pair_from_record(record: Any, default_id: str) -> PreferencePair:
    """Validates one source row and turns it into a :class:`PreferencePair`.

    Args:
        record: The row as read from the file.
        default_id: Id to use when the row has none.

    Raises:
        RowError: Naming the field at fault and why.
    """
    record = as_object(record)
    _check_unicode(record, None)
    prompt, chosen, rejected = _prompt_and_replies(record)
    if chosen.strip() == rejected.strip():
        raise RowError("rejected", "is identical to chosen")
    metadata = {
        k: v
        for k, v in record.items()
        if k not in {"id", "prompt", "chosen", "rejected", "confidence"}
    }
    return PreferencePair(
        id=_row_id(record, default_id),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        confidence=_confidence(record),
        metadata=metadata,
    )


def _row_id(record: dict[str, Any], default_id: str) -> str:
    raw_id = record.get("id")
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int)):
        raise RowError("id", f"expected a string or integer, got {type(raw_id).__name__}")
    return str(raw_id) if raw_id is not None and str(raw_id) else default_id


_LABELS = {"true": True, "false": False}


def _label(record: dict[str, Any]) -> bool:
    value = record.get("label")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError("label", "is missing (true: desirable, false: undesirable)")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:  # CSV cells are text
        return _LABELS[value.strip().lower()]
    shown = repr(value) if len(repr(value)) <= 20 else f"{repr(value)[:17]}..."
    raise RowError("label", f"expected true or false, got {shown}")


def _given(record: dict[str, Any], name: str) -> bool:
    value = record.get(name)
    return value is not None and not (isinstance(value, str) and not value.strip())


def is_unpaired_row(record: Any) -> bool:
    """Whether a source row is an unpaired example: no reply pair, a ``completion`` or ``label``.

    (A CSV row has every column of the file: empty cells count as absent.)
    """
    return (
        isinstance(record, dict)
        and not _given(record, "chosen")
        and not _given(record, "rejected")
        and (_given(record, "completion") or _given(record, "label"))
    )


def example_from_record(record: Any, default_id: str) -> UnpairedExample:
    """Validates one unpaired source row and turns it into an :class:`UnpairedExample`.

    Args:
        record: The row as read from the file.
        default_id: Id to use when the row has none.

    Raises:
        RowError: Naming the field at fault and why.
    """
    record = as_object(record)
    _check_unicode(record, None)
    completion, prompt = record.get("completion"), record.get("prompt")
    if isinstance(completion, list):  # TRL's conversational form, or a whole conversation
        turns, reply = _split_conversation(_messages(completion, "completion"), "completion")
        if not turns:
            turns = (
                _messages(prompt, "prompt") if isinstance(prompt, list) else _text(record, "prompt")
            )
        if isinstance(turns, list) and not any(m["content"].strip() for m in turns):
            raise RowError("prompt", "is empty")
    elif completion is None or isinstance(completion, str):
        turns = _messages(prompt, "prompt") if isinstance(prompt, list) else _text(record, "prompt")
        reply = _text(record, "completion")
    else:
        raise RowError(
            "completion", f"expected a string or chat messages, got {type(completion).__name__}"
        )
    keys = {"id", "prompt", "completion", "label", "confidence"}
    return UnpairedExample(
        id=_row_id(record, default_id),
        prompt=turns,
        completion=reply,
        label=_label(record),
        confidence=_confidence(record),
        metadata={k: v for k, v in record.items() if k not in keys},
    )


_KINDS = {False: "a preference pair", True: "an unpaired row (prompt, completion, label)"}


def load_pairs(
    path: str | Path | None = None,
    on_error: str = "raise",
    limit: int | None = None,
    split: str = "train",
    unpaired: bool = False,
) -> LoadResult:
    """Loads and validates a preference file (or ``save_to_disk`` directory, or hub dataset).

    Args:
        path: The file, directory or hub id (see :func:`read_source`); None means the embedded
            default data set.
        on_error: ``raise`` stops at the first bad row with a :class:`DataError` naming file, row
            and field; ``skip`` leaves bad rows out and returns them in ``rejected``.
        limit: Keep only the first ``limit`` valid pairs (None keeps all).
        split: The split of a hub dataset or saved ``DatasetDict``.
        unpaired: Also read a file of unpaired rows (the result's ``pairs`` are then
            :class:`UnpairedExample` items); otherwise such a file is a DataError.

    Returns:
        The valid pairs (or unpaired examples) and the rejected rows.

    Raises:
        DataError: On an unreadable file, a bad row (``on_error=raise``), no valid row at all, or
            unpaired rows when they are not asked for.
    """
    if on_error not in ON_ERROR:
        raise DataError(f"data.on_error: {on_error!r} is not one of {list(ON_ERROR)}")
    source, stem, records = read_source(path, split)
    pairs: list[PreferencePair] = []
    rejected: list[RejectedRow] = []
    seen: set[str] = set()
    first: tuple[bool, int] | None = None  # (unpaired?, row) of the first valid row: its kind
    for row, record in records:
        try:
            kind = is_unpaired_row(record)
            if first is not None and kind != first[0]:
                raise RowError(
                    None,
                    f"is {_KINDS[kind]}, but row {first[1]} is {_KINDS[first[0]]}: a file holds "
                    "one kind (write a pair as two unpaired rows, chosen with label true and "
                    "rejected with label false, or use two files)",
                )
            parse = example_from_record if kind else pair_from_record
            pair = parse(record, default_id=f"{stem}-{row}")
            if pair.id in seen:
                raise RowError("id", f"duplicate id {pair.id!r}")
        except RowError as err:
            if on_error == "raise":
                raise DataError(
                    err.describe(source, row) + " (data.on_error=skip sets such rows aside)"
                ) from None
            kept = record if not isinstance(record, RowError) else None
            rejected.append(RejectedRow(str(source), row, err.field, err.reason, kept))
            continue
        if first is None:
            first = (kind, row)
            if kind and not unpaired:
                raise DataError(
                    f"{source}: holds unpaired rows (prompt, completion, label; row {row}), but "
                    "preference pairs (prompt, chosen, rejected) are needed here"
                )
        seen.add(pair.id)
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError(f"{source}: no valid row ({len(rejected)} rows rejected)")
    if rejected:
        log.warning("%s: %d bad rows set aside (see rejected_rows.jsonl)", source, len(rejected))
    return LoadResult(pairs, rejected)


@dataclass
class DataSpec:
    """The ``data`` config group: which file and how to read and tokenize it.

    Args:
        path: Preference file, ``save_to_disk`` directory or hub dataset id; None means the
            embedded default set.
        split: The split of a hub dataset or saved ``DatasetDict``.
        on_error: ``raise`` or ``skip`` (bad rows to ``rejected_rows.jsonl``).
        max_length: Longest prompt + reply in tokens.
        max_prompt_length: Longest prompt in tokens.
        chat_template: ``auto``, ``always`` or ``never``.
        limit: Use only the first ``limit`` valid pairs of ``path``.
        eval_path: A file of held-out pairs (same formats and checks as ``path``), or None.
        eval_fraction: Share of ``path``'s prompts held out with all their pairs, in (0, 1), or
            None. At most one of ``eval_path`` and ``eval_fraction``; neither: no held-out set.
        seed: Seeds the draw of the held-out prompts (the run seed).
    """

    path: str | None = None
    split: str = "train"
    on_error: str = "raise"
    max_length: int = 512
    max_prompt_length: int = 256
    chat_template: str = "auto"
    limit: int | None = None
    eval_path: str | None = None
    eval_fraction: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        settings.text("data.path", self.path, optional=True)
        settings.text("data.split", self.split)
        settings.choice("data.on_error", self.on_error, ON_ERROR)
        settings.choice("data.chat_template", self.chat_template, CHAT_TEMPLATE_MODES)
        settings.number("data.max_length", self.max_length, integer=True, ge=1)
        settings.number(
            "data.max_prompt_length", self.max_prompt_length, integer=True, ge=1, lt=self.max_length
        )
        settings.number("data.limit", self.limit, integer=True, ge=1, optional=True)
        if settings.text("data.eval_path", self.eval_path, optional=True) == "":
            raise settings.SettingError("data.eval_path is empty; give a file, or null for none")
        settings.number("data.eval_fraction", self.eval_fraction, gt=0, lt=1, optional=True)
        settings.seed("data.seed", self.seed)
        if self.eval_path is not None and self.eval_fraction is not None:
            raise settings.SettingError(
                "data.eval_path and data.eval_fraction are both set; choose one (a held-out "
                "file, or a share of data.path's prompts)"
            )

    def load(self) -> LoadResult:
        """The pairs of ``path`` (or its unpaired examples: the stages check they can use them),
        with the held-out pairs (if any) set apart."""
        loaded = load_pairs(self.path, self.on_error, self.limit, self.split, unpaired=True)
        if loaded.unpaired and (self.eval_path is not None or self.eval_fraction is not None):
            raise settings.SettingError(
                "data.eval_path / data.eval_fraction: held-out evaluation needs preference pairs "
                f"and {self.path} holds unpaired rows; set both to null"
            )
        if self.eval_path is not None:
            extra = load_pairs(self.eval_path, self.on_error)
            loaded.heldout, loaded.rejected = extra.pairs, loaded.rejected + extra.rejected
        elif self.eval_fraction is not None:
            loaded.pairs, loaded.heldout = split_by_prompt(
                loaded.pairs, self.eval_fraction, self.seed
            )
        return loaded

    def encode(self, pairs: list[PreferencePair] | list[UnpairedExample], tokenizer: Any):
        return encode_rows(
            pairs, tokenizer, self.max_length, self.max_prompt_length, self.chat_template
        )
