"""Which model a QSLM command works on: a preset, a checkpoint, a saved model, an extreme-KD student, or the
cached embedded default of a family (all read from :mod:`qslm_jax.models.registry`).

``--model`` accepts a preset name (``spikegpt216m``, ``spikegpt-small``, ``spikingbert-small``, ...), a
reference checkpoint (``.pth`` / ``.safetensors`` / ``hf://...``; SpikeGPT unless a preset names the family), a
directory written by :func:`qslm_jax.model_io.save_model`, or the output directory of ``experiments.extreme_kd``
(``results.json`` + ``student/``): its 1/1.58-bit encoder kernels keep their level in the search
(:data:`STUDENT_BITS` in the description). A model without the classifier a task needs is refused, unless a new,
randomly initialised head is asked for (``new_head=True``, the fine-tuning CLI's ``--new-head``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flax import nnx

from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.model_io import INFO_FILE, load_model, saved_family
from qslm_jax.models.registry import SPIKEGPT, ModelFamily, all_presets, family_of, get_family, preset_family
from qslm_jax.quant.quantizers import FP32, check_level
from qslm_jax.tasks.task import Task

log = logging.getLogger(__name__)
STUDENT_BITS = "student_bits"  # description key: the level an extreme-KD student's encoder kernels keep
STUDENT_DIR = "student"  # where experiments.extreme_kd saves the trained student inside its output directory
RESULTS_FILE = "results.json"


def _check_task(family: ModelFamily, task: Task) -> None:
    if not task.n_classes and family.language_model is None:
        raise ConfigError(f"{task.name} is language modelling and {family.name} models only classify: choose "
                          "--task sst2, mrpc or qnli")


def random_model(preset: str, task: Task, seed: int = 0) -> nnx.Module:
    """A randomly initialised ``preset`` with the classifier ``task`` needs (pipeline checks, training start)."""
    family = preset_family(preset)
    _check_task(family, task)
    return family.build(family.config(preset, n_classes=task.n_classes), seed)


def with_task_head(model: nnx.Module, task: Task, seed: int = 0, *, new_head: bool = False) -> nnx.Module:
    """``model`` itself if it fits ``task``; else, with ``new_head``, a copy with a new classifier of
    ``task.n_classes`` outputs (random init, logged) and every other parameter taken over unchanged; else
    :class:`ConfigError`."""
    family = family_of(model)
    _check_task(family, task)
    has_classes = family.config_value(model.config, "n_classes")
    if has_classes == task.n_classes or task.n_classes == 0:
        return model
    if not new_head:
        has = f"a {has_classes}-class one" if has_classes else "none"
        raise ConfigError(
            f"{task.name} needs a {task.n_classes}-class classifier and the model has {has}. To train a new, "
            f"randomly initialised head: python -m experiments.finetune --task {task.name} --new-head ...; then "
            "pass the fine-tuned model (OUT/model) here")
    log.info("the model has no %d-class classifier: a new one is initialised (fine-tune it before use)",
             task.n_classes)
    grown = family.build(family.with_classes(model.config, task.n_classes), seed)
    state = nnx.state(model)
    if "classifier" in state:
        del state["classifier"]
    nnx.update(grown, state)
    return grown


def student_bits(directory: Path) -> float | None:
    """The level of an ``experiments.extreme_kd`` output directory's student (``results.json``'s ``bits``), or
    None when ``directory`` is not one."""
    results = directory / RESULTS_FILE
    if not results.is_file() or not (directory / STUDENT_DIR / INFO_FILE).is_file():
        return None
    try:
        bits = json.loads(results.read_text())["bits"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConversionError(f"{results} names no student level 'bits' ({err}): rerun experiments.extreme_kd") \
            from err
    return check_level(bits)


def source_family(spec: str, checkpoint: str | None = None) -> ModelFamily:
    """The family :func:`resolve_model` builds from ``spec`` / ``checkpoint``, known before any weight is read:
    the one a saved model's ``model.json`` names (an extreme-KD output: its student's), else the preset's, else
    SpikeGPT (a bare checkpoint file is read by SpikeGPT's converter)."""
    source = Path(checkpoint or spec)
    for directory in (source, source / STUDENT_DIR):
        if (directory / INFO_FILE).is_file():
            return get_family(saved_family(directory))
    return preset_family(spec) if spec in all_presets() else SPIKEGPT


def resolve_model(spec: str, task: Task, *, checkpoint: str | None = None, seed: int = 0,
                  new_head: bool = False) -> nnx.Module:
    """The model named by ``spec`` (preset, checkpoint file, ``hf://`` source or saved directory), fitted to
    ``task`` by :func:`with_task_head`.

    With a preset name, ``checkpoint`` (a file or saved directory) supplies the weights; a preset with
    released weights (``spikegpt216m``) and no checkpoint is downloaded from the hub.
    """
    source = checkpoint or spec
    preset = spec if spec in all_presets() else None
    family = source_family(spec, checkpoint)
    if source == preset:
        if preset not in family.pretrained:
            return random_model(preset, task, seed)
        model = family.load(family.pretrained[preset], family.config(preset))
    elif (Path(source) / INFO_FILE).is_file():
        model = load_model(source)
    elif student_bits(Path(source)) is not None:
        model = load_model(Path(source) / STUDENT_DIR)
    else:
        model = family.load(source, family.config(preset) if preset else None)
    return with_task_head(model, task, seed, new_head=new_head)


def load_for_task(spec: str, task: Task, *, checkpoint: str | None = None, init: str = "trained", seed: int = 0,
                  cache_dir: str | Path | None = None, data_dir: str | Path | None = None,
                  progress: bool = True) -> tuple[nnx.Module, dict]:
    """The model a QSLM command evaluates, and a JSON description of it for reports and journals.

    ``init="random"``: a random ``spec`` preset (pipeline checks). A family's embedded preset without a
    checkpoint: its cached, trained embedded default (:func:`~qslm_jax.finetune.finetuning.embedded_model`).
    Otherwise :func:`resolve_model`; a classification task then needs a model that already has its classifier.
    An extreme-KD student's description carries :data:`STUDENT_BITS`.
    """
    from qslm_jax.finetune.finetuning import embedded_model

    presets = all_presets()
    if init == "random":
        if spec not in presets:
            raise ConfigError(f"--init random needs a preset model ({sorted(presets)}), found {spec!r}")
        return random_model(spec, task, seed), {"preset": spec, "weights": "random", "seed": seed}
    family = preset_family(spec) if spec in presets else None
    if family is not None and spec == family.embedded_preset and checkpoint is None:
        _check_task(family, task)
        model, metrics = embedded_model(task, family, cache_dir=cache_dir, data_dir=data_dir, progress=progress)
        return model, {"preset": spec, "weights": "embedded default (trained here)",
                       "training_metric": metrics.get("metric"), "recipe": metrics.get("recipe")}
    if task.n_classes and checkpoint is None and family is not None:
        raise ConfigError(
            f"{task.name} needs a fine-tuned classifier, and --model {spec} has none. Make one with "
            f"`python -m experiments.finetune --model {spec} --checkpoint <weights.pth> --task {task.name} "
            f"--out runs/ft`, then pass `--checkpoint runs/ft/model`")
    model = resolve_model(spec, task, checkpoint=checkpoint, seed=seed)
    description = {"model": spec, "checkpoint": checkpoint}
    bits = student_bits(Path(checkpoint or spec))
    if bits is not None and bits != FP32:
        description[STUDENT_BITS] = bits
    return model, description
