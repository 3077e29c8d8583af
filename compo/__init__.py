"""compo: zeroth-order preference alignment from comparison oracles (ComPO).

The library is a flat set of nouns: ``data`` (preference pairs), ``models`` (policy and reference
loading), ``scoring`` (sequence log-probabilities), ``evaluate`` (metrics) and ``rundir`` (what a
run writes). ``cli`` is the Hydra entry point and the only module that sees a config object.
"""

from compo.errors import CompoError

__all__ = ["CompoError"]
__version__ = "0.1.0"
