"""Which SpikeGPT a QSLM command works on: a preset, a checkpoint, or the cached embedded default.

``--model`` accepts a preset name (``spikegpt216m``, ``spikegpt-small``, ...), a reference checkpoint
(``.pth`` / ``.safetensors`` / ``hf://...``) or a directory written by :func:`qslm_jax.model_io.save_model`.
A model without the classifier a task needs is refused, unless a new, randomly initialised head is asked for
(``new_head=True``, the fine-tuning CLI's ``--new-head``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from flax import nnx

from converters.spikegpt import PRETRAINED, load_spikegpt
from qslm_jax.errors import ConfigError
from qslm_jax.model_io import INFO_FILE, load_model
from qslm_jax.models.spikegpt import PRESETS, SpikeGPT, SpikeGPTConfig
from qslm_jax.tasks.data import Task

log = logging.getLogger(__name__)


def random_model(preset: str, task: Task, seed: int = 0) -> SpikeGPT:
    """A randomly initialised ``preset`` with the classifier ``task`` needs (pipeline checks, training start)."""
    return SpikeGPT(SpikeGPTConfig.preset(preset, n_classes=task.n_classes), rngs=nnx.Rngs(seed))


def with_task_head(model: SpikeGPT, task: Task, seed: int = 0, *, new_head: bool = False) -> SpikeGPT:
    """``model`` itself if it fits ``task``; else, with ``new_head``, a copy with a new classifier of
    ``task.n_classes`` outputs (random init, logged) and every other parameter taken over unchanged; else
    :class:`ConfigError`."""
    if model.config.n_classes == task.n_classes or task.n_classes == 0:
        return model
    if not new_head:
        has = f"a {model.config.n_classes}-class one" if model.config.n_classes else "none"
        raise ConfigError(
            f"{task.name} needs a {task.n_classes}-class classifier and the model has {has}. To train a new, "
            f"randomly initialised head: python -m experiments.finetune --task {task.name} --new-head ...; then "
            "pass the fine-tuned model (OUT/model) here")
    log.info("the model has no %d-class classifier: a new one is initialised (fine-tune it before use)",
             task.n_classes)
    grown = SpikeGPT(dataclasses.replace(model.config, n_classes=task.n_classes), rngs=nnx.Rngs(seed))
    state = nnx.state(model)
    if "classifier" in state:
        del state["classifier"]
    nnx.update(grown, state)
    return grown


def resolve_model(spec: str, task: Task, *, checkpoint: str | None = None, seed: int = 0,
                  new_head: bool = False) -> SpikeGPT:
    """The model named by ``spec`` (preset, checkpoint file, ``hf://`` source or saved directory), fitted to
    ``task`` by :func:`with_task_head`.

    With a preset name, ``checkpoint`` (a file or saved directory) supplies the weights; a preset with
    released weights (``spikegpt216m``) and no checkpoint is downloaded from the hub.
    """
    source = checkpoint or spec
    if source in PRESETS and checkpoint is None:
        if source in PRETRAINED:
            model = load_spikegpt(PRETRAINED[source], config=SpikeGPTConfig.preset(source))
        else:
            return random_model(source, task, seed)
    elif (Path(source) / INFO_FILE).is_file():
        model = load_model(source)
    else:
        config = SpikeGPTConfig.preset(spec) if spec in PRESETS else None
        model = load_spikegpt(source, config=config)
    return with_task_head(model, task, seed, new_head=new_head)


def load_for_task(spec: str, task: Task, *, checkpoint: str | None = None, init: str = "trained", seed: int = 0,
                  cache_dir: str | Path | None = None, data_dir: str | Path | None = None,
                  progress: bool = True) -> tuple[SpikeGPT, dict]:
    """The model a QSLM command evaluates, and a JSON description of it for reports and journals.

    ``init="random"``: a random ``spec`` preset (pipeline checks). The embedded preset without a checkpoint:
    the cached, trained embedded default (:func:`~qslm_jax.finetune.finetuning.embedded_model`). Otherwise
    :func:`resolve_model`; a classification task then needs a model that already has its classifier.
    """
    from qslm_jax.finetune.finetuning import EMBEDDED_PRESET, embedded_model

    if init == "random":
        if spec not in PRESETS:
            raise ConfigError(f"--init random needs a preset model ({sorted(PRESETS)}), found {spec!r}")
        return random_model(spec, task, seed), {"preset": spec, "weights": "random", "seed": seed}
    if spec == EMBEDDED_PRESET and checkpoint is None:
        model, metrics = embedded_model(task, cache_dir=cache_dir, data_dir=data_dir, progress=progress)
        return model, {"preset": EMBEDDED_PRESET, "weights": "embedded default (trained here)",
                       "training_metric": metrics.get("metric"), "recipe": metrics.get("recipe")}
    if task.n_classes and checkpoint is None and spec in PRESETS:
        raise ConfigError(
            f"{task.name} needs a fine-tuned classifier, and --model {spec} has none. Make one with "
            f"`python -m experiments.finetune --model {spec} --checkpoint <weights.pth> --task {task.name} "
            f"--out runs/ft`, then pass `--checkpoint runs/ft/model`")
    return resolve_model(spec, task, checkpoint=checkpoint, seed=seed), {"model": spec, "checkpoint": checkpoint}
