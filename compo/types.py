"""The data types every stage shares: a preference pair, an unpaired example and a chat message.

They live apart from :mod:`compo.data` (files) and :mod:`compo.encoding` (tokens) so that neither
has to import the other, and so :mod:`compo.interfaces` can hand them to oracles without either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass
class PreferencePair:
    """One preference judgement: ``chosen`` is preferred to ``rejected`` as a reply to ``prompt``.

    Attributes:
        id: Unique within a data set.
        prompt: A plain string, or the chat messages that precede the reply.
        chosen: The preferred reply.
        rejected: The other reply.
        confidence: How much the label is trusted, in [0, 1] (e.g. from click counts).
        metadata: Every other field of the source row.
    """

    id: str
    prompt: str | list[Message]
    chosen: str
    rejected: str
    confidence: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The row as read: metadata's fields beside the others, so the row loads back as is."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "confidence": self.confidence,
            **self.metadata,
        }


@dataclass
class UnpairedExample:
    """One unpaired judgement, KTO's data: ``completion`` is a desirable (``label`` true) or an
    undesirable (false) reply to ``prompt`` (thumbs up/down, a click or a skip).

    Attributes:
        id: Unique within a data set.
        prompt: A plain string, or the chat messages that precede the reply.
        completion: The reply.
        label: True when the reply is desirable.
        confidence: How much the label is trusted, in [0, 1].
        metadata: Every other field of the source row.
    """

    id: str
    prompt: str | list[Message]
    completion: str
    label: bool
    confidence: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The row as read: metadata's fields beside the others, so the row loads back as is."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "completion": self.completion,
            "label": self.label,
            "confidence": self.confidence,
            **self.metadata,
        }
