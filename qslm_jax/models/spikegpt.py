"""SpikeGPT (Zhu, Zhao, Li, Eshraghian, TMLR 2024) in Flax NNX.

The maths is that of ``shared/docs/spikegpt.md``: a binary (spiking) embedding, then per block
``x = x + LIF1(TimeMix(ln1(x)))`` and ``x = x + LIF2(ChannelMix(ln2(x)))``, with the RWKV-4 WKV recurrence
and token shift, and an untied LM head. The tokens are the LIF neurons' time steps.

Both reference forward passes are one parallel forward here; the RNN-mode quirks of the official ``run.py``
are config flags (``binarize_embedding``, ``rescale_every``), see :meth:`SpikeGPTConfig.with_mode`.
The same forward also runs as the RNN it is (``src/model_run.py``): :meth:`SpikeGPT.init_state` and
:meth:`SpikeGPT.step` carry each block's recurrent state (:class:`BlockState`: token-shift inputs, the WKV
numerator, denominator and running exponent, the two LIF membranes) from one token to the next, so a token costs
O(1); :meth:`SpikeGPT.advance` runs a whole chunk in parallel from a state (prompt prefill).

Parameter layout (a contract for the converter and the quantization code): ``emb``, ``ln0``,
``blocks[i].{ln1, ln2, att, ffn}``, ``ln_out``, ``head`` and, when ``n_classes > 0``, ``classifier``.
Linear kernels are ``(in, out)`` (the transpose of PyTorch's weight); ``time_mix_*`` are stored as ``(C,)``
(the checkpoint's ``(1, 1, C)`` reshaped); ``time_decay`` is the raw checkpoint value (decay ``-exp(.)``).
The model holds only ``nnx.Param`` arrays, so ``nnx.split`` / ``nnx.merge`` work under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qslm_jax.errors import ConfigError
from qslm_jax.neurons import lif_multistep, spike

LAYER_NORM_EPS = 1e-5
WKV_INIT_EXPONENT = -1e38  # the reference's MIN_VALUE for the running exponent o
RNN_RESCALE_EVERY = 6
MODES = ("gpt", "rnn")


@dataclass(frozen=True)
class SpikeGPTConfig:
    """Shape and forward-mode settings of a SpikeGPT model.

    ``binarize_embedding``: feed ``H(emb[idx])`` (GPT mode) instead of the float embedding to ``ln0``.
    ``rescale_every`` (RNN mode, 0 = off): divide ``att.output`` and ``ffn.value`` of block i by
    ``2^(i // rescale_every)`` and halve the residual stream after every ``rescale_every``-th block.
    ``n_classes > 0`` adds a ``classifier`` for :meth:`SpikeGPT.classify`.
    """

    n_layer: int
    n_embd: int
    vocab_size: int
    ctx_len: int
    binarize_embedding: bool = True
    rescale_every: int = 0
    n_classes: int = 0

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "vocab_size", "ctx_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SpikeGPTConfig.{name} must be >= 1, found {getattr(self, name)}")
        for name in ("rescale_every", "n_classes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SpikeGPTConfig.{name} must be >= 0, found {getattr(self, name)}")

    @property
    def ffn_dim(self) -> int:
        """Hidden width of ChannelMix: 4C."""
        return 4 * self.n_embd

    @property
    def num_params(self) -> int:
        """Parameter count: ``2VC`` (emb, head) + 4C (ln0, ln_out) + L(13C^2 + 11C) + n_classes*C."""
        c = self.n_embd
        per_block = 13 * c * c + 11 * c
        return 2 * self.vocab_size * c + 4 * c + self.n_layer * per_block + self.n_classes * c

    def output_scale(self, layer: int) -> float:
        """Factor on ``att.output`` and ``ffn.value`` of block ``layer``: ``2^-(layer // rescale_every)``."""
        return 2.0 ** -(layer // self.rescale_every) if self.rescale_every else 1.0

    def halves_after(self, layer: int) -> bool:
        """Whether the residual stream is halved after block ``layer`` (RNN mode, every 6th block)."""
        return bool(self.rescale_every) and (layer + 1) % self.rescale_every == 0

    def with_mode(self, mode: str) -> SpikeGPTConfig:
        """This config with the quirk flags of a reference forward pass (spikegpt.md, "Two forward passes").

        ``"gpt"`` (``src/model.py``): binary embedding, no rescaling. ``"rnn"`` (``run.py``): binary embedding
        only for the 77-symbol character vocabulary, rescaling every 6 blocks.
        """
        if mode == "gpt":
            return dataclasses.replace(self, binarize_embedding=True, rescale_every=0)
        if mode == "rnn":
            return dataclasses.replace(
                self, binarize_embedding=self.vocab_size == 77, rescale_every=RNN_RESCALE_EVERY
            )
        raise ConfigError(f"unknown SpikeGPT forward mode {mode!r}: expected one of {MODES}")

    @classmethod
    def preset(cls, name: str, **overrides) -> SpikeGPTConfig:
        """The named preset of :data:`PRESETS`, with optional field overrides (e.g. ``n_classes=2``)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown SpikeGPT preset {name!r}: expected one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, SpikeGPTConfig] = {
    # the released SpikeGPT-216M (ridger/SpikeGPT-OpenWebText-216M)
    "spikegpt216m": SpikeGPTConfig(n_layer=18, n_embd=768, vocab_size=50277, ctx_len=1024),
    # embedded / CPU default (preliminary size)
    "spikegpt-small": SpikeGPTConfig(n_layer=4, n_embd=128, vocab_size=50277, ctx_len=128),
    # CLI smoke tests with the real GPT-NeoX tokenizer (seconds on a CPU)
    "spikegpt-micro": SpikeGPTConfig(n_layer=2, n_embd=16, vocab_size=50277, ctx_len=32),
    # for tests
    "spikegpt-tiny": SpikeGPTConfig(n_layer=2, n_embd=32, vocab_size=100, ctx_len=32),
}


def token_shift(h: jax.Array, previous: jax.Array | None = None) -> jax.Array:
    """``shift(h)[:, t] = h[:, t-1]`` (h is ``(B, T, C)``); at ``t = 0`` the ``(B, C)`` ``previous`` (the
    input of the token before this chunk), zeros for a fresh sequence."""
    first = jnp.zeros_like(h[:, :1]) if previous is None else previous[:, None].astype(h.dtype)
    return jnp.concatenate([first, h[:, :-1]], axis=1)


def _mix(h: jax.Array, shifted: jax.Array, mu: nnx.Param) -> jax.Array:
    """``mix(h, mu) = h*mu + shift(h)*(1-mu)``."""
    mu = mu[...]
    return h * mu + shifted * (1.0 - mu)


class WKVState(NamedTuple):
    """The WKV recurrence's state after a token (each ``(B, C)``): numerator ``p`` and denominator ``q``,
    both scaled by ``e^{-o}``, and the running maximum exponent ``o``."""

    num: jax.Array
    den: jax.Array
    exponent: jax.Array


def wkv_init(shape: tuple[int, ...], dtype=jnp.float32) -> WKVState:
    """The state before the first token: ``(p, q, o) = (0, 0, -1e38)`` (``model_run.py`` starts ``o`` at -1e30;
    both make ``e^{o - .}`` exactly 0 in float32, so the outputs are the same)."""
    zeros = jnp.zeros(shape, dtype)
    return WKVState(zeros, zeros, jnp.full(shape, WKV_INIT_EXPONENT, dtype))


def wkv(w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array,
        state: WKVState | None = None) -> tuple[jax.Array, WKVState]:
    """RWKV-4 WKV over the time axis 1 of ``k, v`` (``(B, T, C)``), per channel, as a ``lax.scan``.

    ``y_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})``
    in the stable (p, q, o) form of spikegpt.md: ``o`` is the running maximum exponent, ``p`` and ``q`` the
    numerator and denominator scaled by ``e^{-o}``. ``w = -exp(time_decay)`` (< 0), ``u = time_first``.
    Starts from ``state`` (default :func:`wkv_init`: a fresh sequence); returns ``y`` and the state after
    the last token.
    """

    def step(carry, kv_t):
        p, q, o = carry
        k_t, v_t = kv_t
        uk = u + k_t
        no = jnp.maximum(o, uk)
        a, b = jnp.exp(o - no), jnp.exp(uk - no)
        y = (a * p + b * v_t) / (a * q + b)
        wo = w + o
        no = jnp.maximum(wo, k_t)
        a, b = jnp.exp(wo - no), jnp.exp(k_t - no)
        return WKVState(a * p + b * v_t, a * q + b, no), y

    init = wkv_init(k.shape[:1] + k.shape[2:], k.dtype) if state is None else state
    last, y = jax.lax.scan(step, init, (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
    return jnp.swapaxes(y, 0, 1), last


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=False, rngs=rngs)


def _layer_norm(n: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # two-pass variance, like torch.nn.LayerNorm
    return nnx.LayerNorm(n, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


def _ramp(n: int, start: float, stop: float) -> nnx.Param:
    return nnx.Param(jnp.linspace(start, stop, n, dtype=jnp.float32))


class TimeMixState(NamedTuple):
    """TimeMix's state after a token: the token-shift input ``shift`` (its ``ln1`` output, ``(B, C)``) and the
    WKV state."""

    shift: jax.Array
    wkv: WKVState


class BlockState(NamedTuple):
    """One block's recurrent state after a token (every array ``(B, C)``; ``model_run.py``'s ``xx``/``aa``/
    ``bb``/``pp`` per sub-block plus the LIF membranes): TimeMix's state, LIF1's membrane, ChannelMix's
    token-shift input (its ``ln2`` output) and LIF2's membrane."""

    att: TimeMixState
    lif1: jax.Array
    ffn_shift: jax.Array
    lif2: jax.Array


def block_init_state(batch: int, n_embd: int, dtype=jnp.float32) -> BlockState:
    """A block's state before the first token: zero token-shift inputs and membranes, :func:`wkv_init`."""
    zeros = jnp.zeros((batch, n_embd), dtype)
    return BlockState(TimeMixState(zeros, wkv_init((batch, n_embd), dtype)), zeros, zeros, zeros)


class TimeMix(nnx.Module):
    """SRWKV token mixer: ``Wo·(sigmoid(Wr·mix_r) * WKV(-exp(time_decay), time_first, Wk·mix_k, Wv·mix_v))``.

    Fresh parameters are a simple deterministic init (decay ramp, zero bonus, mixing ramp), not the
    reference's; real weights come from :func:`converters.spikegpt.load_spikegpt`.
    """

    def __init__(self, n_embd: int, *, rngs: nnx.Rngs):
        self.time_decay = _ramp(n_embd, -5.0, 3.0)
        self.time_first = nnx.Param(jnp.zeros((n_embd,), jnp.float32))
        self.time_mix_k = _ramp(n_embd, 1.0, 0.1)
        self.time_mix_v = _ramp(n_embd, 1.0, 0.2)
        self.time_mix_r = _ramp(n_embd, 1.0, 0.3)
        self.key = _linear(n_embd, n_embd, rngs)
        self.value = _linear(n_embd, n_embd, rngs)
        self.receptance = _linear(n_embd, n_embd, rngs)
        self.output = _linear(n_embd, n_embd, rngs)

    def __call__(self, h: jax.Array, state: TimeMixState, output_scale: float = 1.0
                 ) -> tuple[jax.Array, TimeMixState]:
        """The mixer on the LayerNorm output ``h`` (B, T, C) continuing from ``state``, and the state after the
        last token; ``output_scale`` multiplies ``Wo``'s output."""
        shifted = token_shift(h, state.shift)
        k = self.key(_mix(h, shifted, self.time_mix_k))
        v = self.value(_mix(h, shifted, self.time_mix_v))
        r = self.receptance(_mix(h, shifted, self.time_mix_r))
        y, wkv_state = wkv(-jnp.exp(self.time_decay[...]), self.time_first[...], k, v, state.wkv)
        out = self.output(jax.nn.sigmoid(r) * y)
        return (out if output_scale == 1.0 else out * output_scale), TimeMixState(h[:, -1], wkv_state)


class ChannelMix(nnx.Module):
    """SRFFN: ``sigmoid(Wr·mix_r) * (Wv·relu(Wk·mix_k)^2)`` with ``Wk: C -> 4C``, ``Wv: 4C -> C``."""

    def __init__(self, n_embd: int, *, rngs: nnx.Rngs):
        self.time_mix_k = _ramp(n_embd, 1.0, 0.1)
        self.time_mix_r = _ramp(n_embd, 1.0, 0.1)
        self.key = _linear(n_embd, 4 * n_embd, rngs)
        self.receptance = _linear(n_embd, n_embd, rngs)
        self.value = _linear(4 * n_embd, n_embd, rngs)

    def __call__(self, h: jax.Array, previous: jax.Array, output_scale: float = 1.0
                 ) -> tuple[jax.Array, jax.Array]:
        """The feed-forward on the LayerNorm output ``h`` after the token-shift input ``previous`` (B, C), and
        the last token's ``h`` (the next chunk's ``previous``); ``output_scale`` multiplies ``Wv``'s output."""
        shifted = token_shift(h, previous)
        kk = jnp.square(jax.nn.relu(self.key(_mix(h, shifted, self.time_mix_k))))
        kv = self.value(kk)
        if output_scale != 1.0:
            kv = kv * output_scale
        return jax.nn.sigmoid(self.receptance(_mix(h, shifted, self.time_mix_r))) * kv, h[:, -1]


class BlockTrace(NamedTuple):
    """Input currents and output spikes (each ``(B, T, C)``) of a block's two LIF neurons."""

    lif1_in: jax.Array
    lif1_spk: jax.Array
    lif2_in: jax.Array
    lif2_spk: jax.Array


class Block(nnx.Module):
    """One SpikeGPT block: ``x += LIF1(TimeMix(ln1 x))``, then ``x += LIF2(ChannelMix(ln2 x))``."""

    def __init__(self, n_embd: int, *, rngs: nnx.Rngs):
        self.ln1 = _layer_norm(n_embd, rngs)
        self.ln2 = _layer_norm(n_embd, rngs)
        self.att = TimeMix(n_embd, rngs=rngs)
        self.ffn = ChannelMix(n_embd, rngs=rngs)

    def __call__(self, x: jax.Array, state: BlockState, output_scale: float = 1.0
                 ) -> tuple[jax.Array, BlockTrace, BlockState]:
        """The updated residual stream ``(B, T, C)`` continuing from ``state``, the block's LIF currents and
        spikes, and its state after the last token."""
        a, att_state = self.att(self.ln1(x), state.att, output_scale)
        s1, lif1 = lif_multistep(a, membrane=state.lif1, return_membrane=True)
        x = x + s1
        f, ffn_shift = self.ffn(self.ln2(x), state.ffn_shift, output_scale)
        s2, lif2 = lif_multistep(f, membrane=state.lif2, return_membrane=True)
        return x + s2, BlockTrace(a, s1, f, s2), BlockState(att_state, lif1, ffn_shift, lif2)


class SpikeGPT(nnx.Module):
    """SpikeGPT language model (and sequence classifier when ``config.n_classes > 0``).

    ``model(idx)`` gives next-token logits ``(B, T, V)`` for token ids ``idx`` ``(B, T)``:
    ``head · ln_out(blocks(ln0(H(emb[idx]))))`` (spikegpt.md, "GPT-mode forward"; flags select RNN mode).
    """

    def __init__(self, config: SpikeGPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config.n_embd
        self.emb = nnx.Embed(config.vocab_size, c, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.ln0 = _layer_norm(c, rngs)
        self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(config.n_layer)])
        self.ln_out = _layer_norm(c, rngs)
        self.head = _linear(c, config.vocab_size, rngs)
        if config.n_classes > 0:
            self.classifier = _linear(c, config.n_classes, rngs)

    def with_mode(self, mode: str) -> SpikeGPT:
        """This model's parameters (shared, not copied) under the config of forward ``mode`` ("gpt" or "rnn",
        :meth:`SpikeGPTConfig.with_mode`)."""
        config = self.config.with_mode(mode)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: SpikeGPT(config, rngs=nnx.Rngs(0))))
        return nnx.merge(graphdef, nnx.state(self))

    def init_state(self, batch: int) -> tuple[BlockState, ...]:
        """The recurrent state of ``batch`` fresh sequences: one :func:`block_init_state` per block."""
        return tuple(block_init_state(batch, self.config.n_embd) for _ in self.blocks)

    def advance(self, idx: jax.Array, state: tuple[BlockState, ...]
                ) -> tuple[jax.Array, list[BlockTrace], tuple[BlockState, ...]]:
        """Run the tokens ``idx`` ``(B, T)`` after those that led to ``state``: ``ln_out`` of the final residual
        stream ``(B, T, C)``, every block's :class:`BlockTrace` and the state after the last token.

        Splitting a sequence into chunks and advancing chunk by chunk gives the outputs of the whole sequence
        (each chunk is parallel over its tokens, the recurrences carry across chunks).
        """
        e = self.emb(idx)
        x = self.ln0(spike(e) if self.config.binarize_embedding else e)
        traces, states = [], []
        for i, (block, block_state) in enumerate(zip(self.blocks, state, strict=True)):
            x, trace, block_state = block(x, block_state, self.config.output_scale(i))
            if self.config.halves_after(i):
                x = x / 2
            traces.append(trace)
            states.append(block_state)
        return self.ln_out(x), traces, tuple(states)

    def step(self, tokens: jax.Array, state: tuple[BlockState, ...]
             ) -> tuple[jax.Array, tuple[BlockState, ...]]:
        """RNN mode (``model_run.py``'s ``forward`` for one token per sequence): next-token logits ``(B, V)``
        for ``tokens`` ``(B,)`` following ``state``, and the new state. Feeding a sequence token by token from
        :meth:`init_state` gives the logits of ``model(idx)`` (with this config's quirk flags)."""
        h, _, state = self.advance(tokens[:, None], state)
        return self.head(h[:, 0]), state

    def features(self, idx: jax.Array) -> tuple[jax.Array, list[BlockTrace]]:
        """``ln_out`` of the final residual stream ``(B, T, C)`` and every block's :class:`BlockTrace`
        (fresh sequences: :meth:`advance` from :meth:`init_state`)."""
        h, traces, _ = self.advance(idx, self.init_state(idx.shape[0]))
        return h, traces

    def __call__(self, idx: jax.Array, *, return_spike_rates: bool = False):
        """Logits ``(B, T, V)``; with ``return_spike_rates`` also :func:`spike_rates` ``(n_layer, 2)``."""
        h, traces = self.features(idx)
        logits = self.head(h)
        return (logits, spike_rates(traces)) if return_spike_rates else logits

    def classify(
        self, idx: jax.Array, attention_mask: jax.Array | None = None, *, return_spike_rates: bool = False
    ):
        """Class logits ``(B, n_classes)``: ``classifier(mean_t ln_out(x)_t)`` over positions with mask 1.

        Padding must be on the right (the model is causal, so padding never changes earlier positions).
        """
        if self.config.n_classes < 1:
            raise ConfigError(
                "this SpikeGPT has no classifier (n_classes=0): build it with a config with n_classes > 0, "
                "e.g. SpikeGPTConfig.preset('spikegpt216m', n_classes=2)"
            )
        h, traces = self.features(idx)
        mask = jnp.ones(idx.shape, h.dtype) if attention_mask is None else attention_mask.astype(h.dtype)
        pooled = jnp.einsum("btc,bt->bc", h, mask) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        logits = self.classifier(pooled)
        return (logits, spike_rates(traces, mask)) if return_spike_rates else logits

    def lif_trace(self, idx: jax.Array) -> dict[str, jax.Array]:
        """Each LIF neuron's input current and spikes, keyed ``blocks_{i}_lif{1,2}_{in,spk}`` as fixtures."""
        _, traces = self.features(idx)
        out = {}
        for i, trace in enumerate(traces):
            for field, value in trace._asdict().items():
                neuron, kind = field.split("_")
                out[f"blocks_{i}_{neuron}_{kind}"] = value
        return out


def spike_rates(traces: list[BlockTrace], mask: jax.Array | None = None) -> jax.Array:
    """Mean firing rate of each block's two LIF neurons, ``(n_layer, 2)`` (columns lif1, lif2).

    Averaged over batch, channels and the positions where ``mask`` (``(B, T)``) is 1 (all when None).
    """

    def rate(s: jax.Array) -> jax.Array:
        if mask is None:
            return s.mean()
        return jnp.einsum("btc,bt->", s, mask) / (jnp.maximum(mask.sum(), 1.0) * s.shape[-1])

    return jnp.stack([jnp.stack([rate(t.lif1_spk), rate(t.lif2_spk)]) for t in traces])

