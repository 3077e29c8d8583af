"""One source row -> a :class:`~compo.types.PreferencePair` or an
:class:`~compo.types.UnpairedExample`: parsing and validating a record, whatever file it came from
(loading files: :mod:`compo.data`; reading them into records: :mod:`compo.readers`).

The public schemas of a preference pair:

* string fields ``prompt``, ``chosen``, ``rejected`` (e.g. UltraFeedback-binarized's ``prompt``);
* ``chosen``/``rejected`` as chat-message lists sharing the prompt turns (HH-RLHF and UltraFeedback
  in their conversational form); the last message of each must be the assistant's reply; a
  ``prompt`` given too must agree with the turns (the same messages, or the last user turn's text);
* ``prompt`` as a message list with one-message ``chosen``/``rejected`` lists (TRL's
  conversational preference format);
* raw HH-RLHF transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` in ``chosen``/``rejected``,
  no ``prompt``).

Unpaired rows (KTO's data, TRL's unpaired preference format): ``prompt`` (a string or chat
messages), ``completion`` (a string, or chat messages ending with the assistant's reply; turns
before it are the prompt, and a ``prompt`` given too must agree with them) and ``label`` (true:
desirable, false: undesirable; also ``"true"``/``"false"`` as text, as in CSV, and 1/0, as numbers
or text, also written 1.0/0.0). :func:`is_unpaired_row` tells the two kinds apart.

Optional fields: ``id`` (default: the ``default_id`` the loader gives, ``<file stem>-<row>``),
``confidence`` in [0, 1] (default 1.0); every other field is kept in ``metadata``.

Each row keeps the types its file gives it: in JSON a reply must be a string (``42`` is an error of
that row), ids are strings or integers; a CSV cell is always text (``42``, ``None``, ``N/A`` and
``007`` are kept as written, also in ``metadata``) except ``confidence``, read as a number (an
empty cell: not given). Parquet columns have the types stored in the file.

A bad record (missing or empty field, wrong type, identical chosen and rejected, text that is not
valid Unicode, a row the reader could not read) raises a :class:`compo.readers.RowError` naming the
field at fault; what happens next (stop, or set the row aside) is the loader's choice.
"""

from __future__ import annotations

import re
from typing import Any

from compo.readers import RowError, given
from compo.types import Message, PreferencePair, UnpairedExample

ROLES = ("system", "user", "assistant")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


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


def _conversation_prompt(
    record: dict[str, Any], turns: list[Message], name: str
) -> str | list[Message]:
    """The prompt of a row whose ``name`` field is a conversation with prompt ``turns``: the
    turns, or the row's ``prompt`` when the turns are empty (TRL's conversational form).

    A ``prompt`` given next to non-empty turns must agree with them (the same messages, or as
    text the last user turn, as in UltraFeedback): otherwise one of the two would be dropped.
    """
    prompt = record.get("prompt")
    if not turns:
        turns = _messages(prompt, "prompt") if isinstance(prompt, list) else _text(record, "prompt")
    elif given(record, "prompt"):
        if isinstance(prompt, list):
            agrees = _messages(prompt, "prompt") == turns
        else:
            asked = [m["content"].strip() for m in turns if m["role"] == "user"][-1:]
            agrees = asked == [_text(record, "prompt").strip()]
        if not agrees:
            raise RowError("prompt", f"differs from the prompt turns of '{name}'")
    if isinstance(turns, list) and not any(m["content"].strip() for m in turns):
        raise RowError("prompt", "is empty")
    return turns


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
    """The prompt (text or turns) and both replies, from whichever pair schema ``record`` uses."""
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
    return _conversation_prompt(record, chosen_turns, "chosen"), chosen_reply, rejected_reply


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


# CSV cells are text; "1.0"/"0.0" (and 1.0/0.0 in JSON) are what pandas writes for a label
# column with a missing value, which makes the column float.
_LABELS = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}


def _label(record: dict[str, Any]) -> bool:
    value = record.get("label")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError("label", "is missing (true: desirable, false: undesirable)")
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    shown = repr(value) if len(repr(value)) <= 20 else f"{repr(value)[:17]}..."
    raise RowError("label", f"expected true or false, got {shown}")


def is_unpaired_row(record: Any) -> bool:
    """Whether a source row is an unpaired example: no reply pair, a ``completion`` or ``label``.

    (A CSV row has every column of the file: empty cells count as absent.)
    """
    return (
        isinstance(record, dict)
        and not given(record, "chosen")
        and not given(record, "rejected")
        and (given(record, "completion") or given(record, "label"))
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
        turns = _conversation_prompt(record, turns, "completion")
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
