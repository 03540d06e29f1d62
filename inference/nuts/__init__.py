"""The No-U-Turn Sampler, jointkl's reference MCMC engine (``jointkl.inference.NUTS``).

* ``potential``: U(θ) = −log p(x, T(θ)) − log|det ∂T/∂θ| of any Pyro model, discrete latents
  with finite support summed out, for all chains in one vectorised model run when the model
  broadcasts correctly (checked), else one run per chain;
* ``trajectory``: one NUTS transition of all chains at once (multinomial sampling, iterative
  doubling, the U-turn criterion), each chain with its own tree under masks;
* ``adaptation``: dual averaging of the step size and Stan's windowed diagonal mass matrix;
* ``engine``: the engine, its settings, the warmup and sampling loop.
"""

from jointkl.inference.nuts.engine import NUTS, NUTSSettings

__all__ = ["NUTS", "NUTSSettings"]
