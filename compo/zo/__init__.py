"""Zeroth-order optimization of the output layer from comparison oracles (ComPO).

from compo.zo import ComPO, run_compo
summary = run_compo(policy, tokenizer, encoded_pairs, oracle, ComPO(), run_dir)
"""

from compo.zo.directions import GaussianSphere, LowRank, Rademacher, SupportRestricted
from compo.zo.optimizer import ComPO, run_compo
from compo.zo.scope import Scope

__all__ = [
    "ComPO",
    "GaussianSphere",
    "LowRank",
    "Rademacher",
    "Scope",
    "SupportRestricted",
    "run_compo",
]
