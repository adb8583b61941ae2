"""Reading checkpoint folders and writing output folders atomically.

A checkpoint folder holds `config.json` and its tensors in one of these layouts (the first that is present wins):
`*.safetensors.index.json` with the shards it lists; one or more `*.safetensors` files; `pytorch_model.bin.index.json`
with its `.bin` shards; `pytorch_model.bin`. `.bin` files are read with `torch.load(weights_only=True)` (tensors and
plain containers only, never arbitrary pickled objects).

Output is built in a temporary folder next to OUT and renamed into place only when everything has been written, so
a failed conversion leaves no partial OUT behind and an existing OUT is replaced only on success.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, PreTrainedModel

from .validation import ConversionError

CONFIG_NAME = "config.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


def _special_float(obj: dict) -> object:
    # transformers writes infinities and NaN as {"__float__": "Infinity"} (plain JSON has no such numbers)
    if len(obj) == 1 and obj.get("__float__") in ("Infinity", "-Infinity", "NaN"):
        return float(obj["__float__"].lower().replace("infinity", "inf"))
    return obj


def read_json(path: Path) -> dict:
    """A JSON object from `path` (with transformers' encoding of infinities decoded), or a ConversionError naming
    the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_hook=_special_float)
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist") from None
    except (OSError, ValueError) as err:
        raise ConversionError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_config(folder: str | os.PathLike) -> dict:
    """The `config.json` of a checkpoint folder, as a dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder (expected config.json and weight files)")
    return read_json(folder / CONFIG_NAME)


def _index_files(folder: Path, index_path: Path) -> tuple[list[Path], dict[str, str]]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index_path} has no 'weight_map'")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [path.name for path in files if not path.is_file()]
    if absent:
        raise ConversionError(f"{index_path.name} lists shard(s) that are not in {folder}: {', '.join(absent)}")
    return files, weight_map


def weight_files(folder: str | os.PathLike) -> tuple[str, list[Path], dict[str, str] | None]:
    """("safetensors" | "bin", files to read, the index's weight map or None) for a checkpoint folder."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{folder} has several safetensors indexes: {', '.join(p.name for p in indexes)}")
    if indexes:
        return ("safetensors", *_index_files(folder, indexes[0]))
    safetensors_files = sorted(folder.glob("*.safetensors"))
    if safetensors_files:
        return "safetensors", safetensors_files, None
    if (folder / BIN_INDEX_NAME).is_file():
        return ("bin", *_index_files(folder, folder / BIN_INDEX_NAME))
    if (folder / BIN_NAME).is_file():
        return "bin", [folder / BIN_NAME], None
    raise ConversionError(f"{folder} has no weights: expected model.safetensors, sharded *.safetensors with an "
                          f"index, {BIN_NAME} or {BIN_INDEX_NAME}")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap avoids a second copy of large files; it needs the zip format torch.save has written since 1.6
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
        message = " ".join(str(err).split())[:300]
        raise ConversionError(f"{path.name} cannot be read with torch.load(weights_only=True): {message}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise ConversionError(f"{path.name} does not hold a state dict (a mapping of names to tensors)")
    return data


def read_state_dict(folder: str | os.PathLike, progress: bool | None = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, by name, on the CPU, dtypes unchanged. `progress` shows a bar per
    tensor (None: only on a terminal)."""
    kind, files, weight_map = weight_files(folder)
    state_dict: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}

    def add(name: str, tensor: torch.Tensor, path: Path) -> None:
        if name in state_dict:
            raise ConversionError(f"tensor {name!r} appears in both {source[name]} and {path.name}")
        state_dict[name] = tensor
        source[name] = path.name

    if kind == "safetensors":
        handles = []
        with contextlib.ExitStack() as stack:
            for path in files:
                try:
                    handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                    raise ConversionError(f"{path.name} is not a readable safetensors file: {err}") from None
                handles.append((path, handle, list(handle.keys())))
            total = sum(len(keys) for _, _, keys in handles)
            with tqdm(total=total, desc="reading tensors", unit="tensor", disable=_disable(progress)) as bar:
                for path, handle, keys in handles:
                    for name in keys:
                        add(name, handle.get_tensor(name), path)
                        bar.update(1)
    else:
        with tqdm(total=weight_map and len(weight_map), desc="reading tensors", unit="tensor",
                  disable=_disable(progress)) as bar:
            for path in files:
                shard = _load_bin(path)
                for name, tensor in shard.items():
                    add(name, tensor, path)
                bar.update(len(shard))
    if weight_map is not None:
        wrong = sorted(name for name, file in weight_map.items() if source.get(name) != file)
        if wrong:
            raise ConversionError(f"the index places tensor(s) in shards that lack them: {', '.join(wrong[:20])}")
    return state_dict


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def read_checkpoint(folder: str | os.PathLike, progress: bool | None = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict) of a checkpoint folder."""
    return read_config(folder), read_state_dict(folder, progress)


def check_output_folder(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an OUT that is a file, or a non-empty folder without `overwrite`, before any work is done."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConversionError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise ConversionError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    return out


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out`; on success it becomes `out` (an existing `out` is replaced,
    which needs `overwrite` unless it is empty); on any error it is deleted and `out` is left as it was."""
    out = check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        check_output_folder(out, overwrite)  # something may have appeared there meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained_from_state_dict(model_class: type[PreTrainedModel], config: PreTrainedConfig,
                                    state_dict: dict[str, torch.Tensor], folder: Path,
                                    head: str = "lm_head.weight") -> None:
    """`model_class(config).save_pretrained(folder)` with `state_dict` as its weights, without allocating a
    second copy: the model is built on the meta device and the tensors assigned to it. When the config ties the
    embeddings, `head` may be absent (it is tied to the embeddings)."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    weights = {name: tensor for name, tensor in state_dict.items() if not (tied and name == head)}
    with torch.device("meta"):
        model = model_class(config)
    result = model.load_state_dict(weights, strict=False, assign=True)
    missing = set(result.missing_keys) - ({head} if tied else set())
    if missing or result.unexpected_keys:
        raise ConversionError(f"State dict does not fit {model_class.__name__}: missing {sorted(missing)}, "
                              f"unexpected {sorted(result.unexpected_keys)}")
    if tied:
        model.tie_weights()
    still_meta = [name for name, t in model.state_dict().items() if t.is_meta]
    if still_meta:
        raise ConversionError(f"{model_class.__name__} has weights the state dict does not give: {still_meta[:20]}")
    model.save_pretrained(folder)
