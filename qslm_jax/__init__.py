"""qslm-jax: compression of spiking language models (SpikeGPT, SpikingBERT) in JAX / Flax NNX.

The package's top level exports :func:`generate` (text generation with SpikeGPT as an RNN); everything else lives
in its sub-packages (see README "Architecture"). ``generate`` is imported on first use, so importing a light
sub-module (``qslm_jax.errors``) does not load JAX: the command lines build their parsers without it.
"""

__all__ = ["generate"]


def __getattr__(name: str):
    """``qslm_jax.generate``, imported on first access (PEP 562)."""
    if name == "generate":
        from qslm_jax.generation import generate

        return generate
    raise AttributeError(f"module 'qslm_jax' has no attribute {name!r}")
