"""Zoo models: Pyro model/guide pairs (import name ``jointkl.models``)."""

from jointkl.models.bernoulli_mixture import BernoulliMixture  # noqa: F401
from jointkl.models.crf_tagger import CRFTagger  # noqa: F401
from jointkl.models.energy import EnergyModel  # noqa: F401
from jointkl.models.gmm import GaussianMixture
from jointkl.models.hmm import HMM  # noqa: F401
from jointkl.models.infomax import InfoMax  # noqa: F401
from jointkl.models.skipgram import SkipGram  # noqa: F401
from jointkl.models.vae import VAE  # noqa: F401

__all__ = ["GaussianMixture"]
