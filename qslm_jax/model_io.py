"""Saving and loading any NNX model of this library with orbax, config included.

A saved model is a directory holding

* ``model.json``: the format tag, the model class and its config class as ``module:QualName``, and the config
  fields (a frozen dataclass of JSON values; tuples come back as tuples);
* ``state/``: an orbax ``StandardCheckpointer`` checkpoint of the model's state as a pure dict.

The contract a model must meet: a dataclass ``model.config`` and a constructor ``Model(config, *, rngs)``;
its state must be arrays only (no ``nnx.Rngs`` kept as an attribute). :func:`load_model` rebuilds the model
abstractly (no random init), checks every saved array's name and shape against it, then restores.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from converters.checkpoint_io import check_keys_and_shapes
from qslm_jax.errors import ConfigError, ConversionError

FORMAT = "qslm-jax-model/1"
INFO_FILE = "model.json"
STATE_DIR = "state"


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConversionError(
            f"saved model refers to {name!r}, which cannot be imported ({err}): install the package that "
            "defines it or load with the library version that saved it"
        ) from err
    return obj


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
    info = {
        "format": FORMAT,
        "model_class": _qualified_name(type(model)),
        "config_class": _qualified_name(type(config)),
        "config": dataclasses.asdict(config),
    }
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


def load_model(directory: str | Path) -> nnx.Module:
    """Rebuild the model saved by :func:`save_model` in ``directory``.

    Raises :class:`ConversionError` when the directory holds no complete save, the classes cannot be
    imported, the config does not construct, or the saved arrays do not match the rebuilt model (every
    missing/unexpected array and wrong shape is listed).
    """
    directory = Path(directory).resolve()
    info = _read_info(directory)
    model_cls, config_cls = _resolve(info["model_class"]), _resolve(info["config_class"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()}
    try:
        config = config_cls(**fields)
        abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    except (TypeError, ConfigError) as err:
        where = directory / INFO_FILE
        raise ConversionError(f"cannot rebuild {info['model_class']} from {where}: {err}") from err

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
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
