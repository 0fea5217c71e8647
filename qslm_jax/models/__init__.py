"""Model families (SpikeGPT, SpikingBERT, the BERT teacher); importing the package registers them
(:mod:`qslm_jax.models.registry`)."""

from qslm_jax.models import registry as registry
