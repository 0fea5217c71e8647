"""qslm-jax: compression of spiking language models (SpikeGPT, SpikingBERT) in JAX / Flax NNX.

The package's top level exports :func:`generate` (text generation with SpikeGPT as an RNN); everything else lives
in its sub-packages (see README "Architecture").
"""

from qslm_jax.generation import generate

__all__ = ["generate"]
