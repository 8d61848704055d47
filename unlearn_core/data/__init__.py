"""What training reads: forget targets on disk, masks, surrogates, the remember set and the seed rule.

The three sets training takes are handed on here, where the module that held them used to be.
"""

from .sets import ForgetTargets, RememberSet, UnlearnData

__all__ = ["ForgetTargets", "RememberSet", "UnlearnData"]
