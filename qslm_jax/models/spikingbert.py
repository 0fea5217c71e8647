"""SpikingBERT (Bal & Sengupta, AAAI 2024) in Flax NNX: an IF network of 4 spiking BERT encoder blocks.

The maths is ``shared/docs/spikingbert.md``. Neuron layer 0 is the embedding neuron; block ``b`` adds the
six layers ``6b+1 .. 6b+6`` (key, value, attention, self-output, intermediate, output), each fed by the
same BERT modules (:class:`~qslm_jax.models.bert.EncoderBlock`) applied to the previous layers' spikes.
Three views of the same network share one layer program (:meth:`SpikingBERT._encoder`):

* :meth:`SpikingBERT.simulate`: the IF simulation over ``T`` steps (one ``lax.scan``, zero delay between
  layers inside a step), giving average spiking rates (ASRs), logits and summed attention scores;
* :meth:`SpikingBERT.steady_state`: the clipped surrogate ``f`` (rates instead of spikes, each layer clipped
  to [0, 1] after dividing by ``vth``) used for gradients;
* :meth:`SpikingBERT.train_forward`: taps with the SNN's forward value and the surrogate's gradient
  (straight-through, exact without feedback; with feedback an implicit ``fixed_point`` solver is plugged in),
  the surrogate linearised either along its own forward pass (the reference) or at the SNN's equilibrium
  rates of every layer (``gradient_at="equilibrium"``).

No weight is cached: every forward reads the Linear kernels from the module, so a model rebuilt with
``nnx.merge(graphdef, transformed_state)`` (e.g. quantized encoder kernels, see :func:`is_encoder_kernel`)
runs under ``jit`` / ``grad`` with the transformed weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qslm_jax.errors import ConfigError
from qslm_jax.models.bert import Embeddings, EncoderBlock, mask_bias
from qslm_jax.neurons import if_step

NEURONS_PER_BLOCK = 6
SPIKING_MASK_VALUE = -10000.0  # the reference's (1 - m) * -10000 attention bias
LAYER_NORM_EPS = 1e-12
ENCODER_LINEARS = ("query", "key", "value", "attention_output", "intermediate", "output")
GRADIENT_POINTS = ("surrogate", "equilibrium")

# fire(layer_index, input_current) -> the layer's activity (spikes in the SNN, clipped rates in f).
FireFn = Callable[[int, jax.Array], jax.Array]
# fixed_point(g, z0, params) -> z: the fixed point z = g(z, params) found from z0, with its implicit gradient
# (e.g. qslm_jax.equilibrium.implicit.fixed_point).
FixedPointFn = Callable[[Callable[[jax.Array, Any], jax.Array], jax.Array, Any], jax.Array]


@dataclass(frozen=True)
class SpikingBERTConfig:
    """SpikingBERT shape and simulation settings (spikingbert.md, "Architecture")."""

    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 30522
    max_positions: int = 512
    type_vocab: int = 2
    num_classes: int = 2
    T: int = 100
    vth: float = 1.0
    feedback: bool = False
    num_blocks: int = 4
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ConfigError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.T < 1 or self.vth <= 0 or self.num_blocks < 1 or self.num_classes < 1:
            raise ConfigError(
                f"expected T >= 1, vth > 0, num_blocks >= 1, num_classes >= 1; found T={self.T}, "
                f"vth={self.vth}, num_blocks={self.num_blocks}, num_classes={self.num_classes}"
            )

    @property
    def num_neuron_layers(self) -> int:
        """Embedding neuron + 6 per block (25 for 4 blocks)."""
        return 1 + NEURONS_PER_BLOCK * self.num_blocks

    @property
    def tap_layers(self) -> tuple[int, ...]:
        """Neuron layers whose ASRs are the KD taps: the embedding neuron and each block's output."""
        return tuple(range(0, self.num_neuron_layers, NEURONS_PER_BLOCK))

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """Feature width of every neuron layer (intermediate layers are ``intermediate`` wide)."""
        block = (self.hidden,) * 4 + (self.intermediate, self.hidden)
        return (self.hidden, *block * self.num_blocks)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SpikingBERTConfig:
        """A named shape: ``full`` (bert-base width), ``small`` (CPU-sized: the extreme-KD student), ``micro``
        (CLI checks with the real tokenizer), ``tiny`` (the test fixture's)."""
        if name not in SPIKINGBERT_PRESETS:
            raise ConfigError(f"unknown SpikingBERT preset {name!r}: expected one of {sorted(SPIKINGBERT_PRESETS)}")
        return cls(**{**SPIKINGBERT_PRESETS[name], **overrides})


SPIKINGBERT_PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(hidden=768, heads=12, intermediate=3072, vocab=30522, max_positions=512),
    # the extreme-KD student's shape (experiments.extreme_kd defaults): 4 blocks x 128, bert-base-uncased vocabulary
    "small": dict(hidden=128, heads=4, intermediate=512, vocab=30522, max_positions=64, T=16),
    # CLI smoke tests with the real bert-base-uncased tokenizer (seconds on a CPU)
    "micro": dict(hidden=16, heads=2, intermediate=32, vocab=30522, max_positions=64, T=4, num_blocks=2),
    "tiny": dict(hidden=32, heads=4, intermediate=64, vocab=100, max_positions=64, num_classes=3, T=16),
}


def is_encoder_kernel(path: Sequence[Any]) -> bool:
    """True for the state path of an encoder Linear kernel, e.g. ``('blocks', 2, 'value', 'kernel')``.

    These are the weights the 1/1.58-bit training quantizes (extreme_kd.md, "Quantizers").
    """
    return (len(path) == 4 and path[0] == "blocks" and path[2] in ENCODER_LINEARS and path[3] == "kernel")


def clip_rate(x: jax.Array) -> jax.Array:
    """``clamp(x, 0, 1)`` with PyTorch's gradient: 1 on the closed interval [0, 1], 0 outside.

    (``jnp.clip`` gives 1/2 at the end points.)
    """
    return jnp.where(x < 0.0, 0.0, jnp.where(x > 1.0, 1.0, x))


class SpikingBERTOutput(NamedTuple):
    """Eval-mode result of :meth:`SpikingBERT.simulate`.

    ``asrs``: all neuron layers' average spiking rates ``a_l = (1/T) sum_t s_l[t]``; ``taps``: the ASRs of
    the tap layers (``a_0, a_6, .., a_24``); ``reps``: ``fit_dense(tap)``; ``attention_scores``: per block,
    the pre-softmax scores (mask included) summed over T; ``logits = classifier(relu(a_24[:, 0]))``.
    """

    logits: jax.Array
    asrs: tuple[jax.Array, ...]
    taps: tuple[jax.Array, ...]
    reps: tuple[jax.Array, ...]
    attention_scores: tuple[jax.Array, ...]


class SteadyState(NamedTuple):
    """Result of the surrogate ``f``: every layer's clipped rate and each block's pre-softmax scores."""

    rates: tuple[jax.Array, ...]
    attention_scores: tuple[jax.Array, ...]


class TrainOutput(NamedTuple):
    """Training forward: taps with the SNN's value and the surrogate's gradient, their ``fit_dense``
    projections, logits, and the surrogate's pre-softmax attention scores (for attention KD)."""

    logits: jax.Array
    taps: tuple[jax.Array, ...]
    reps: tuple[jax.Array, ...]
    attention_scores: tuple[jax.Array, ...]


class SpikingBERT(nnx.Module):
    """The SpikingBERT student: embeddings, ``num_blocks`` encoder blocks, feedback, KD and class heads.

    Attribute names are the project's contract: ``embeddings`` (``word``, ``position``, ``token_type``,
    ``layer_norm``), ``blocks`` (state paths ``('blocks', b, ...)``), ``feedback`` (H -> H, no bias; used only
    when ``config.feedback``), ``fit_dense`` (H -> H) and ``classifier`` (H -> C).
    """

    def __init__(self, config: SpikingBERTConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embeddings = Embeddings(c.vocab, c.hidden, c.max_positions, c.type_vocab, eps=LAYER_NORM_EPS,
                                     pad_token_id=c.pad_token_id, rngs=rngs)
        self.blocks = nnx.List([
            EncoderBlock(c.hidden, c.heads, c.intermediate, eps=LAYER_NORM_EPS, rngs=rngs)
            for _ in range(c.num_blocks)
        ])
        self.feedback = nnx.Linear(c.hidden, c.hidden, use_bias=False, rngs=rngs)
        self.fit_dense = nnx.Linear(c.hidden, c.hidden, rngs=rngs)
        self.classifier = nnx.Linear(c.hidden, c.num_classes, rngs=rngs)

    def _encoder(self, a0: jax.Array, bias: jax.Array, fire: FireFn):
        """Run neuron layers 1..6n in order from the embedding activity ``a0``.

        Per block (j = 6b, x = activity of layer j): key ``W_K x``, value ``W_V x``, attention
        ``softmax(q k^T / sqrt d + bias) v`` with ``q = W_Q x`` (not spiking), self-output
        ``LN(W_O a + x)``, intermediate ``GELU(W_1 so)``, output ``LN(W_2 i + so)``; ``fire`` turns each
        current into the layer's activity. Returns (activities of all layers, pre-softmax scores per block).
        """
        acts = [a0]
        scores = []
        for b, block in enumerate(self.blocks):
            j = NEURONS_PER_BLOCK * b
            x = acts[-1]
            k = fire(j + 1, block.key(x))
            v = fire(j + 2, block.value(x))
            context, s = block.attend(x, k, v, bias)
            a = fire(j + 3, context)
            so = fire(j + 4, block.self_output(a, x))
            inner = fire(j + 5, block.feed_forward_in(so))
            out = fire(j + 6, block.feed_forward_out(inner, so))
            acts += [k, v, a, so, inner, out]
            scores.append(s)
        return acts, scores

    def _inputs(self, input_ids, segment_ids, attention_mask):
        """Embedding current ``I_0 = LN(word + pos + type)`` and the (1 - m) * -10000 attention bias."""
        if segment_ids is None:
            segment_ids = jnp.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        return self.embeddings(input_ids, segment_ids), mask_bias(attention_mask, SPIKING_MASK_VALUE)

    def heads(self, taps: Sequence[jax.Array]) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """KD and class heads on the tap ASRs: ``reps = fit_dense(tap_m)`` and
        ``logits = classifier(relu(tap_last[:, 0]))`` (CLS position; relu'(0) = 0, as the reference)."""
        reps = tuple(self.fit_dense(t) for t in taps)
        return reps, self.classifier(jax.nn.relu(taps[-1][:, 0]))

    def simulate_rates(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
                       attention_mask: jax.Array | None = None, *, surrogate_spikes: bool = False):
        """IF simulation over T steps as one ``lax.scan``; returns (all layers' ASRs, attention scores summed
        over T).

        Per step, layer by layer: ``u += I_l[t]; s = 1[u >= vth]; u -= vth * s``. The embedding neuron gets
        the constant ``I_0`` (plus ``W_fb s_last[t-1]`` with feedback). Only running sums are carried, so
        the forward's memory does not grow with T. With ``surrogate_spikes`` the spike has the ATan surrogate
        derivative (:func:`qslm_jax.neurons.if_step` with ``surrogate=True``; same values), so
        differentiating the result is back-propagation through time over all T steps (the baseline that
        equilibrium training avoids).
        """
        c = self.config
        emb, bias = self._inputs(input_ids, segment_ids, attention_mask)
        zeros = tuple(jnp.zeros((*emb.shape[:-1], w), emb.dtype) for w in c.layer_widths)
        batch, length = input_ids.shape
        score_zeros = tuple(jnp.zeros((batch, c.heads, length, length), emb.dtype) for _ in range(c.num_blocks))

        def step(carry, _):
            membranes, counts, score_sums, last_spikes = carry
            new_membranes = [None] * len(membranes)

            def fire(layer: int, current: jax.Array) -> jax.Array:
                new_membranes[layer], s = if_step(membranes[layer], current, c.vth, surrogate=surrogate_spikes)
                return s

            current0 = emb + self.feedback(last_spikes) if c.feedback else emb
            spikes, scores = self._encoder(fire(0, current0), bias, fire)
            counts = tuple(n + s for n, s in zip(counts, spikes, strict=True))
            score_sums = tuple(a + s for a, s in zip(score_sums, scores, strict=True))
            return (tuple(new_membranes), counts, score_sums, spikes[-1]), None

        carry = (zeros, zeros, score_zeros, zeros[-1])
        (_, counts, score_sums, _), _ = jax.lax.scan(step, carry, None, length=c.T)
        return tuple(n * (1.0 / c.T) for n in counts), score_sums

    def simulate(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> SpikingBERTOutput:
        """Eval forward: simulate the IF network for ``config.T`` steps (spikingbert.md, "Architecture").

        ``input_ids``, ``segment_ids``, ``attention_mask``: (B, L) integer arrays (segments default to 0,
        the mask to all ones).
        """
        asrs, scores = self.simulate_rates(input_ids, segment_ids, attention_mask)
        taps = tuple(asrs[l] for l in self.config.tap_layers)
        reps, logits = self.heads(taps)
        return SpikingBERTOutput(logits, asrs, taps, reps, scores)

    __call__ = simulate

    def steady_state(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
                     attention_mask: jax.Array | None = None,
                     feedback_rate: jax.Array | None = None) -> SteadyState:
        """The surrogate ``f``: ``a_0 = clip((I_0 [+ W_fb z]) / vth)``, then every layer
        ``a_l = clip(module_l(rates of its inputs) / vth)`` with ``clip`` to [0, 1] (spikingbert.md,
        "Steady-state function"). ``feedback_rate`` ``z`` (the last layer's rate) enters only when given.
        """
        return self._surrogate(input_ids, segment_ids, attention_mask, feedback_rate)

    def _surrogate(self, input_ids, segment_ids, attention_mask, feedback_rate, pinned=None) -> SteadyState:
        """:meth:`steady_state`; with ``pinned`` rates (one per layer) every layer's value is
        ``pinned_l + f_l - stop_gradient(f_l)``: the value of ``pinned``, the derivative of the clipped rate
        at the current ``pinned`` inputs produce (the surrogate linearised at those rates)."""
        emb, bias = self._inputs(input_ids, segment_ids, attention_mask)
        vth = self.config.vth

        def fire(layer: int, current: jax.Array) -> jax.Array:
            rate = clip_rate(current / vth)
            return rate if pinned is None else pinned[layer] + (rate - jax.lax.stop_gradient(rate))

        current0 = emb if feedback_rate is None else self.feedback(feedback_rate) + emb
        rates, scores = self._encoder(fire(0, current0), bias, fire)
        return SteadyState(tuple(rates), tuple(scores))

    def train_forward(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
                      attention_mask: jax.Array | None = None, *,
                      fixed_point: FixedPointFn | None = None, gradient_at: str = "surrogate") -> TrainOutput:
        """Training forward (equilibrium training, extreme_kd.md): value from the SNN, gradient from ``f``.

        The IF simulation runs on ``stop_gradient`` weights (no residuals, memory constant in T) giving
        ``a*``; each tap is ``a*_k + (f_k - stop_gradient(f_k))``: the same gradient as
        ``f_k + stop_gradient(a*_k - f_k)`` but with exactly the SNN's value. Without feedback ``f`` does not
        depend on ``a*``, so this straight-through form is the exact implicit gradient. With
        ``config.feedback`` the surrogate's feedback input ``z`` (the last layer's rate) is
        ``fixed_point(g, a*_last, params)``, the equilibrium ``z = g(z, params)`` of ``g`` = the last layer of
        ``f`` fed back, found from the SNN's ``a*_last``; its gradient solves the adjoint
        ``beta = (dg/dz)^T beta + dL/dz`` (spikingbert.md, "Steady-state function"; the IDE formulation of
        Xiao et al., NeurIPS 2021). With ``gradient_at="equilibrium"`` ``g``'s value is pinned to ``a*_last``,
        so the forward solve ends at once and ``z = a*_last``: the implicit gradient at the SNN's equilibrium.

        ``gradient_at`` says where ``f`` is linearised:

        * ``"surrogate"`` (the reference implementation): along ``f``'s own forward pass, every layer fed by
          the surrogate rates of the layers before it;
        * ``"equilibrium"``: at the SNN's equilibrium, every layer ``a*_l = f_l(a*_inputs)`` differentiated at
          the ASRs its inputs really have (the implicit function theorem applied layer by layer; the
          "differentiation on spike representation" of Meng et al., CVPR 2022). The two agree when the
          surrogate's rates equal the SNN's (large T); at small T the surrogate's rates drift from the
          SNN's with depth and its gradient stops describing the network being trained.
        """
        if gradient_at not in GRADIENT_POINTS:
            raise ConfigError(f"gradient_at must be one of {GRADIENT_POINTS}, found {gradient_at!r}")
        graphdef, state = nnx.split(self)
        frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
        asrs, _ = frozen.simulate_rates(input_ids, segment_ids, attention_mask)
        asrs = jax.lax.stop_gradient(asrs)
        pinned = asrs if gradient_at == "equilibrium" else None

        z = None
        if self.config.feedback:
            if fixed_point is None:
                raise ConfigError(
                    "config.feedback=True needs an implicit solver: pass train_forward(..., "
                    "fixed_point=qslm_jax.equilibrium.implicit.fixed_point)"
                )
            graphdef, params, rest = nnx.split(self, nnx.Param, ...)

            def g(z_in: jax.Array, p: Any) -> jax.Array:
                model = nnx.merge(graphdef, p, rest)
                return model._surrogate(input_ids, segment_ids, attention_mask, z_in, pinned).rates[-1]

            z = fixed_point(g, asrs[-1], params)
        f = self._surrogate(input_ids, segment_ids, attention_mask, z, pinned)
        taps = tuple(asrs[l] + (f.rates[l] - jax.lax.stop_gradient(f.rates[l])) for l in self.config.tap_layers)
        reps, logits = self.heads(taps)
        return TrainOutput(logits, taps, reps, f.attention_scores)
