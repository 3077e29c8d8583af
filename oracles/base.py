"""Comparison oracles: the verdict type and the two protocols, re-exported from compo's interface.

The definitions live in :mod:`compo.interfaces`, the one compo module oracles depend on; this
module keeps the short import path ``from oracles.base import Verdict, Judgement`` for backends.
A new output-level judge is one module (a class with ``judge``, optionally ``score``) plus one
YAML file with ``_target_``; nothing to register.
"""

from compo.interfaces import (
    AGGREGATIONS,
    ComparisonOracle,
    CompoError,
    Judgement,
    OracleError,
    OutputJudge,
    Verdict,
    aggregate,
)

__all__ = [
    "AGGREGATIONS",
    "ComparisonOracle",
    "CompoError",
    "Judgement",
    "OracleError",
    "OutputJudge",
    "Verdict",
    "aggregate",
]
