"""Zoo models: Pyro model/guide pairs (import name ``jointkl.models``).

Every class here subclasses :class:`jointkl.zoo.ZooModel` and registers itself under its
``name`` (``jointkl models`` lists them; ``jointkl fit <name>`` fits one on its default data).
The models depend on the core (:mod:`jointkl.zoo`, :mod:`jointkl.settings`, the data and
distributions) and never on the engines of ``jointkl.inference``.
"""

from jointkl.models.bernoulli_mixture import BernoulliMixture
from jointkl.models.crf_tagger import CRFTagger
from jointkl.models.energy import EnergyModel
from jointkl.models.gmm import GaussianMixture
from jointkl.models.hmm import HMM
from jointkl.models.infomax import InfoMax
from jointkl.models.skipgram import SkipGram
from jointkl.models.vae import VAE

__all__ = [
    "BernoulliMixture",
    "CRFTagger",
    "EnergyModel",
    "GaussianMixture",
    "HMM",
    "InfoMax",
    "SkipGram",
    "VAE",
]
