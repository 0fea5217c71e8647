"""Saving and loading any NNX model of this library with orbax, config included.

A saved model is a directory holding

* ``model.json``: the format tag, the registered family name of the model (:data:`MODEL_FAMILIES`, a view of
  the model-family registry :mod:`qslm_jax.models.registry`) and the
  config fields (a frozen dataclass of JSON values; tuples come back as tuples);
* ``state/``: an orbax ``StandardCheckpointer`` checkpoint of the model's state as a pure dict.

:func:`load_quantized_model` rebuilds a model the same way from a quantized export
(:func:`qslm_jax.quant.export.export_quantized`, e.g. a search's ``selection.safetensors``): the file's family and
config give the architecture, its dequantized tensors the weights.

The contract a model must meet: its family is registered (:func:`~qslm_jax.models.registry.register_family`), has a
dataclass ``model.config`` and a constructor ``Model(config, *, rngs)``; its state must be arrays only (no
``nnx.Rngs`` kept as an attribute). :func:`load_model` rebuilds the model abstractly (no random init), checks
every saved array's name, shape and finiteness against it, then restores.

Safety: nothing read from ``model.json`` is ever imported or called by name. The file names a family, looked up
in the table; files written before the table existed (``model_class: "module:QualName"``) are accepted only when
the name is exactly a registered class's, compared as a string, so a ``model.json`` naming ``subprocess:Popen``
is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx
from safetensors import SafetensorError, safe_open

from converters.checkpoint_io import check_finite, check_keys_and_shapes
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.models import registry
from qslm_jax.quant.export import QuantizedCheckpoint, load_quantized

FORMAT = "qslm-jax-model/1"
INFO_FILE = "model.json"
STATE_DIR = "state"


class _RegisteredClasses(Mapping):
    """family -> (model class, config class) of every registered family, read live from the registry."""

    def __getitem__(self, name: str) -> tuple[type, type]:
        family = registry.FAMILIES[name]
        return family.model_class, family.config_class

    def __iter__(self):
        return iter(registry.FAMILIES)

    def __len__(self) -> int:
        return len(registry.FAMILIES)


# the model classes a saved model may name: family -> (model class, config class)
MODEL_FAMILIES: Mapping[str, tuple[type, type]] = _RegisteredClasses()


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def family_of(model: nnx.Module) -> str:
    """The registered family name of ``model``'s class; :class:`ConfigError` for an unregistered class."""
    return registry.family_of(model).name


def _registered_classes(info: Mapping[str, Any], where: Path) -> tuple[type, type]:
    """The (model, config) classes ``info`` names, looked up in :data:`MODEL_FAMILIES` (never imported)."""
    allowed = sorted(MODEL_FAMILIES)
    if "family" in info:
        family = info["family"]
        if not isinstance(family, str) or family not in MODEL_FAMILIES:
            raise ConversionError(f"{where} names the model family {family!r}, which is not registered: "
                                  f"expected one of {allowed}")
        return MODEL_FAMILIES[family]
    legacy = (info.get("model_class"), info.get("config_class"))  # written before families were registered
    for model_cls, config_cls in MODEL_FAMILIES.values():
        if legacy == (_qualified_name(model_cls), _qualified_name(config_cls)):
            return model_cls, config_cls
    raise ConversionError(f"{where} names the classes {legacy}, which are not a registered model family: "
                          f"only {allowed} can be loaded (nothing named in a model.json is ever imported)")


def _abstract_model(model_cls: type, config_cls: type, fields: Any, where: Path) -> nnx.Module:
    """``model_cls(config_cls(**fields))`` built with ``nnx.eval_shape`` (shapes only, no random init); JSON lists
    in ``fields`` become tuples."""
    if not isinstance(fields, dict):
        raise ConversionError(f"{where}: expected a 'config' object of {config_cls.__name__} fields, "
                              f"found {type(fields).__name__}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        config = config_cls(**fields)
        return nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    except (TypeError, ValueError, ConfigError) as err:
        raise ConversionError(f"cannot rebuild {model_cls.__name__} from {where}: {err}") from err


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, Mapping) else {name: value})
    return flat


def save_model(model: nnx.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` (state + config) to ``directory``; returns its absolute path.

    Refuses to replace an earlier save unless ``overwrite``; raises :class:`ConfigError` when the model has
    no dataclass ``config`` or the config is not JSON-serialisable.
    """
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise ConfigError(
            f"save_model needs a dataclass `config` attribute on the model, {type(model).__name__} has "
            f"{type(config).__name__}: store the constructor's config as `self.config`"
        )
    family = family_of(model)
    if type(config) is not MODEL_FAMILIES[family][1]:
        raise ConfigError(f"the config of a {family} model must be a {MODEL_FAMILIES[family][1].__name__}, "
                          f"found {type(config).__name__}")
    info = {"format": FORMAT, "family": family, "config": dataclasses.asdict(config)}
    try:
        text = json.dumps(info, indent=2)
    except TypeError as err:
        raise ConfigError(f"the config of {type(model).__name__} is not JSON-serialisable: {err}") from err

    directory = Path(directory).resolve()
    if (directory / INFO_FILE).exists() or (directory / STATE_DIR).exists():
        if not overwrite:
            raise ConversionError(
                f"{directory} already holds a saved model: pass overwrite=True or choose another directory"
            )
        shutil.rmtree(directory / STATE_DIR, ignore_errors=True)
        (directory / INFO_FILE).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / STATE_DIR, nnx.to_pure_dict(nnx.state(model)))
    (directory / INFO_FILE).write_text(text)  # written last: its presence marks a complete save
    return directory


def _read_info(directory: Path) -> dict:
    info_path = directory / INFO_FILE
    if not info_path.is_file() or not (directory / STATE_DIR).is_dir():
        raise ConversionError(
            f"no saved model at {directory}: expected {INFO_FILE} and {STATE_DIR}/ as written by save_model"
        )
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {info_path}: {err}") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ConversionError(f"{info_path}: expected format {FORMAT!r}, found {found!r}")
    return info


def saved_family(directory: str | Path) -> str:
    """The registered family the ``model.json`` of a saved model directory names, read without its weights
    (:class:`ConversionError` when it names none)."""
    directory = Path(directory).resolve()
    model_cls, _ = _registered_classes(_read_info(directory), directory / INFO_FILE)
    return next(name for name, (cls, _) in MODEL_FAMILIES.items() if cls is model_cls)


def load_model(directory: str | Path) -> nnx.Module:
    """Rebuild the model saved by :func:`save_model` in ``directory``.

    Raises :class:`ConversionError` when the directory holds no complete save, names no registered family,
    the config does not construct, or the saved arrays do not match the rebuilt model (every missing/unexpected
    array and wrong shape is listed) or hold NaN/Inf.
    """
    directory = Path(directory).resolve()
    info = _read_info(directory)
    where = directory / INFO_FILE
    abstract = _abstract_model(*_registered_classes(info, where), info.get("config"), where)
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    state_dir = directory / STATE_DIR
    unreadable = f"cannot read the orbax checkpoint {state_dir} (incomplete or corrupted save; save it again)"
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            saved = checkpointer.metadata(state_dir).item_metadata
        except (OSError, ValueError) as err:
            raise ConversionError(f"{unreadable}: {err}") from err
        if saved is None:
            raise ConversionError(unreadable)
        expected = {name: tuple(x.shape) for name, x in _flatten(target).items()}
        check_keys_and_shapes(_flatten(saved.tree), expected, what=f"saved model {directory}")
        try:
            restored = checkpointer.restore(state_dir, target)
        except (OSError, ValueError, RuntimeError) as err:
            raise ConversionError(f"{unreadable}: {err}") from err
    check_finite(_flatten(restored), what=f"saved model {directory}")
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def load_quantized_model(path: str | Path) -> tuple[nnx.Module, QuantizedCheckpoint]:
    """The model stored in the quantized export ``path``, rebuilt from the file alone, and the export itself.

    The metadata's ``family`` (looked up in :data:`MODEL_FAMILIES`, never imported) and ``config`` give the
    architecture; the weights are the dequantized tensors ``(codes - zp) * scale`` of
    :func:`~qslm_jax.quant.export.load_quantized`, bit-identical to the fake-quantized weights the search
    scored, so evaluating the model at fp32 (``QuantPlan()``) reproduces the search's metric of the plan.
    Raises :class:`ConversionError` for a missing or unreadable file, a file that is not an export, or one
    whose family or config does not build.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"no quantized export at {path}: pass the selection.safetensors a search wrote "
                              "(runs/tiered-*/selection.safetensors) or a file from export_quantized")
    try:  # the header first: load_quantized would read a non-safetensors file's first 8 bytes as a length
        with safe_open(str(path), framework="np") as handle:
            family = (handle.metadata() or {}).get("family")
    except (OSError, SafetensorError) as err:
        raise ConversionError(f"cannot read a quantized export from {path}: {err}") from err
    checkpoint = load_quantized(path)
    abstract = _abstract_model(*_registered_classes({"family": family}, path), checkpoint.config, path)
    return checkpoint.apply_to(abstract), checkpoint
