"""Zeroth-order optimization of the output layer from comparison oracles (ComPO).

from compo.zo import ComPO
summary = ComPO().run(policy, tokenizer, encoded_pairs, oracle, run_dir)
"""

from compo.zo.directions import GaussianSphere, LowRank, Rademacher, SupportRestricted
from compo.zo.optimizer import ComPO
from compo.zo.scope import Scope

__all__ = [
    "ComPO",
    "GaussianSphere",
    "LowRank",
    "Rademacher",
    "Scope",
    "SupportRestricted",
]
