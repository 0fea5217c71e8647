"""Generate text with a SpikeGPT: ``python -m experiments.generate --prompt "The meaning of"``.

The prompt is tokenized with the GPT-NeoX-20B tokenizer, continued by :func:`qslm_jax.generate` (the model as an
RNN: O(1) work per new token; the reference's top-p sampling) and printed. ``--model``: the embedded WikiText-2
default (trained once and cached, like ``experiments.tiered --task wikitext2``), a preset with ``--checkpoint``
(``--model spikegpt216m --checkpoint SpikeGPT-216M.pth``), a reference checkpoint or a saved model directory;
``--quantized FILE`` swaps in the dequantized weights of a QSLM export (``export_quantized``, e.g. the selection
of ``experiments.tiered``). ``--mode rnn`` gives ``run.py``'s quirks (rescaling, float embedding).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from experiments import names
from experiments.common import exit_status
from experiments.formatting import DefaultsFormatter
from qslm_jax.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__,
                                formatter_class=DefaultsFormatter)
    p.add_argument("--prompt", default="\nIn a shocking finding,", help="text to continue")
    p.add_argument("--model", default=names.EMBEDDED_PRESET,
                   help=f"preset ({', '.join(sorted(names.SPIKEGPT_PRESETS))}; the embedded "
                   "model is trained on WikiText-2 once), reference checkpoint or saved model directory")
    p.add_argument("--checkpoint", default=None, help="weights for a preset --model (file or saved directory)")
    p.add_argument("--quantized", type=Path, default=None, help="a quantized export (.safetensors) of this model")
    p.add_argument("--mode", choices=names.MODES, default=None, help="forward quirks (default: the model's own)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate after the prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.7, help="nucleus mass kept (1 = all tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--data-dir", default=None, help="local data directory (default $QSLM_DATA_DIR, else the hub)")
    p.add_argument("--cache-dir", default=None, help="where the embedded default model is cached")
    p.add_argument("--json", type=Path, default=None, help="also write prompt, ids, text and speed here")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Continue ``--prompt``; prints the prompt and its continuation and returns them with the token ids."""
    args = build_parser().parse_args(argv)
    from qslm_jax.data import gpt_neox_tokenizer
    from qslm_jax.generation import generate
    from qslm_jax.models.loading import load_for_task
    from qslm_jax.quant.export import load_quantized
    from qslm_jax.tasks.task import get_task

    model, description = load_for_task(args.model, get_task("wikitext2"), checkpoint=args.checkpoint,
                                       cache_dir=args.cache_dir, data_dir=args.data_dir)
    if args.quantized is not None:
        model = load_quantized(args.quantized).apply_to(model)
        description["quantized"] = str(args.quantized)
    if args.mode is not None:
        model = model.with_mode(args.mode)
    tokenizer = gpt_neox_tokenizer(data_dir=args.data_dir)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"the model's vocabulary has {model.config.vocab_size} ids, the GPT-NeoX tokenizer "
                          f"{tokenizer.vocab_size}: generate with a GPT-NeoX SpikeGPT (e.g. --model spikegpt-small)")
    prompt_ids = tokenizer.encode(args.prompt)
    start = time.perf_counter()
    new_ids = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed)
    seconds = time.perf_counter() - start
    text = tokenizer.backend.decode(new_ids.tolist())
    print(args.prompt + text)
    result = {"model": description, "config": dataclasses.asdict(model.config),
              "prompt": args.prompt, "prompt_ids": prompt_ids.tolist(), "new_ids": new_ids.tolist(),
              "text": text, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
              "seconds_with_compilation": seconds}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(exit_status(main))
