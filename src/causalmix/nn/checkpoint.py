"""Checkpoints of a :class:`~causalmix.nn.SequenceModel`: a folder with the config as JSON and
the weights as a plain ``state_dict`` (tensors only), so loading never unpickles code.

::

    model.save_pretrained("run/ckpt")             # run/ckpt/config.json, run/ckpt/weights.pt
    model = SequenceModel.from_pretrained("run/ckpt")

``config.json`` is ``{"format": "causalmix.nn.SequenceModel", "version": 1, "config":
ModelConfig.to_dict()}`` (specs as tagged values, tensors as lists); ``weights.pt`` is
``torch.save(model.state_dict())``, read with ``torch.load(..., weights_only=True)``. Loading
builds the model on the meta device and assigns the saved tensors, so their dtype is kept (a
model saved in bf16 loads in bf16) and nothing is initialised twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from causalmix.checks import ArgumentTypeError
from causalmix.nn.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from causalmix.nn.layers import SequenceModel
    from causalmix.visibility import Visibility

__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "load_pretrained", "read_config",
           "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.pt"
FORMAT = "causalmix.nn.SequenceModel"
VERSION = 1


def _folder(path: Any, where: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"{where}: path must be a str or os.PathLike folder, got "
                                f"{type(path).__name__}")
    return Path(path)


def save_pretrained(model: SequenceModel, path: str | os.PathLike) -> Path:
    """Write ``model`` to the folder ``path`` (created if needed; its two files replaced):
    ``config.json`` and ``weights.pt``. Returns the folder."""
    folder = _folder(path, "save_pretrained")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_pretrained: {str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict()}
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=1) + "\n")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS_NAME)
    return folder


def read_config(path: str | os.PathLike, *,
                types: Mapping[str, type[Visibility]] | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint folder (``types``: spec classes of your own)."""
    file = _folder(path, "from_pretrained") / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"from_pretrained: {str(file)!r} does not exist (a folder written by "
                         f"save_pretrained holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"from_pretrained: {str(file)!r} is not JSON: {err}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"from_pretrained: {str(file)!r} is not a {FORMAT} checkpoint config")
    if record.get("version") != VERSION:
        raise ValueError(f"from_pretrained: {str(file)!r} has format version "
                         f"{record.get('version')!r}; this causalmix reads version {VERSION}")
    return ModelConfig.from_dict(record["config"], types=types)


def load_pretrained(cls: type[SequenceModel], path: str | os.PathLike, *,
                    map_location: Any = "cpu",
                    types: Mapping[str, type[Visibility]] | None = None) -> SequenceModel:
    """The model of a :func:`save_pretrained` folder, its weights read with
    ``torch.load(weights_only=True)`` onto ``map_location``."""
    cfg = read_config(path, types=types)
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(f"from_pretrained: {str(file)!r} does not exist")
    state = torch.load(file, map_location=map_location, weights_only=True)
    with torch.device("meta"):
        model = cls(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"from_pretrained: the weights in {str(file)!r} do not fit the "
                         f"config: {err}") from None
    return model
