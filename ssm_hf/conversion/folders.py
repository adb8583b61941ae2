"""Folder-to-folder conversion, as `ssm-hf convert` runs it.

`convert_checkpoint(SRC, OUT, from_format=...)` reads a checkpoint folder in another format and writes an ssm-hf
`save_pretrained` folder (config.json + safetensors) that `AutoModelForCausalLM.from_pretrained` loads after
`import ssm_hf` (`AutoModelForSequenceClassification` for a state-spaces S4 classifier; the SRC layout of
state-spaces S4 checkpoints is described in `state_spaces_s4.py`); `convert_checkpoint(SRC, OUT, to_format=...)`
reads an ssm-hf folder and writes the other format (mamba_ssm: config.json + pytorch_model.bin, what
`MambaLMHeadModel.from_pretrained` reads; transformers: the in-tree class's `save_pretrained` folder). OUT appears
only once everything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ..configs.hybrid import HybridConfig
from ..configs.mamba import MambaConfig
from ..configs.mamba2 import Mamba2Config
from ..models.hybrid import HybridForCausalLM
from ..models.mamba import MambaForCausalLM
from ..models.mamba2 import Mamba2ForCausalLM
from .checkpoint_io import (
    BIN_NAME,
    CONFIG_NAME,
    atomic_output,
    read_config,
    read_state_dict,
    save_pretrained_from_state_dict,
)
from .mamba_ssm import (
    mamba_ssm_config_to_ssm_hf,
    mamba_ssm_to_ssm_hf,
    ssm_hf_config_to_mamba_ssm,
    ssm_hf_to_mamba_ssm,
)
from .state_spaces_s4 import read_s4_state_dict, s4_config_to_ssm_hf, s4_to_ssm_hf
from .transformers_intree import FAMILIES, ssm_hf_to_transformers, transformers_config, transformers_to_ssm_hf
from .validation import ConversionError, check_state_dict

FROM_FORMATS = ("mamba_ssm", "s4", "transformers")
TO_FORMATS = ("mamba_ssm", "transformers")

# our model_type -> (config class, causal LM class)
SSM_HF_CLASSES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    MambaConfig.model_type: (MambaConfig, MambaForCausalLM),
    Mamba2Config.model_type: (Mamba2Config, Mamba2ForCausalLM),
    HybridConfig.model_type: (HybridConfig, HybridForCausalLM),
}


def ssm_hf_config(config_dict: dict) -> PreTrainedConfig:
    """Our config object for an ssm-hf folder's config.json dict."""
    model_type = config_dict.get("model_type")
    if model_type not in SSM_HF_CLASSES:
        raise ConversionError(f"config.json has model_type={model_type!r}, not an ssm-hf causal LM "
                              f"({', '.join(SSM_HF_CLASSES)}); export reads ssm-hf folders")
    config_class = SSM_HF_CLASSES[model_type][0]
    try:
        return config_class.from_dict(config_dict)
    except Exception as err:  # noqa: BLE001 - strict-dataclass and value errors alike mean a bad config.json
        raise ConversionError(f"invalid {config_class.__name__} in config.json: {' '.join(str(err).split())}"
                              ) from None


def ssm_hf_checkpoint(config_dict: dict, state_dict: dict[str, torch.Tensor]
                      ) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
    """(config, full causal-LM state dict) of an ssm-hf folder's contents: checked against the model class, with
    a tied lm_head (which save_pretrained leaves out) filled in from the embeddings."""
    config = ssm_hf_config(config_dict)
    model_class = SSM_HF_CLASSES[config.model_type][1]
    state_dict = dict(state_dict)
    if config.tie_word_embeddings and "backbone.embeddings.weight" in state_dict:
        state_dict.setdefault("lm_head.weight", state_dict["backbone.embeddings.weight"])
    check_state_dict(model_class, config, state_dict)
    return config, state_dict


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, from_format: str | None = None,
                       to_format: str | None = None, overwrite: bool = False, progress: bool | None = None) -> Path:
    """Convert the checkpoint folder `src` into the new folder `out`; exactly one of `from_format` (into ssm-hf:
    "mamba_ssm", "s4", "transformers") and `to_format` (out of ssm-hf: "mamba_ssm", "transformers") is given.

    `out` must be absent or empty unless `overwrite`; it is built in a temporary folder next to it and renamed
    into place at the end, so a failure leaves it as it was. `progress` shows a bar per tensor read (None: on a
    terminal only). Raises ConversionError (a ValueError) on bad input and NotImplementedError for models the
    other side cannot express, each naming the problem. Returns `out`."""
    if (from_format is None) == (to_format is None):
        raise ValueError("give exactly one of from_format and to_format")
    if from_format is not None and from_format not in FROM_FORMATS:
        raise ConversionError(f"unknown source format {from_format!r}; choose one of {list(FROM_FORMATS)}")
    if to_format is not None and to_format not in TO_FORMATS:
        raise ConversionError(f"unknown target format {to_format!r}; choose one of {list(TO_FORMATS)}")
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ConversionError(f"OUT must differ from SRC ({src})")

    with atomic_output(out, overwrite) as tmp:
        # the config is checked before any tensor is read, so that a config problem fails at once
        config_dict = read_config(src)
        if from_format == "mamba_ssm":
            mamba_ssm_config_to_ssm_hf(config_dict)
        elif from_format == "s4":
            s4_config_to_ssm_hf(config_dict)
        elif from_format == "transformers":
            transformers_config(config_dict)
        elif to_format == "mamba_ssm":
            ssm_hf_config_to_mamba_ssm(ssm_hf_config(config_dict))
        else:
            ssm_hf_config(config_dict)
        state_dict = read_s4_state_dict(src, progress) if from_format == "s4" else read_state_dict(src, progress)
        if from_format is not None:
            if from_format == "s4":
                model_class, config, converted = s4_to_ssm_hf(config_dict, state_dict)
            else:
                if from_format == "mamba_ssm":
                    config, converted = mamba_ssm_to_ssm_hf(config_dict, state_dict)
                else:
                    config, converted = transformers_to_ssm_hf(config_dict, state_dict)
                model_class = SSM_HF_CLASSES[config.model_type][1]
            save_pretrained_from_state_dict(model_class, config, converted, tmp)
        else:
            config, ours = ssm_hf_checkpoint(config_dict, state_dict)
            if to_format == "mamba_ssm":
                mamba_config, converted = ssm_hf_to_mamba_ssm(config, ours)
                write_mamba_ssm_folder(mamba_config, converted, tmp)
            else:
                their_config, converted = ssm_hf_to_transformers(config, ours)
                save_pretrained_from_state_dict(FAMILIES[their_config.model_type][1], their_config, converted, tmp)
    return out


def write_mamba_ssm_folder(mamba_config: dict, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """config.json + pytorch_model.bin, the files `MambaLMHeadModel.from_pretrained` reads. A tied lm_head is the
    embedding tensor itself, which torch.save stores once."""
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(mamba_config, f, indent=2)
        f.write("\n")
    torch.save({name: tensor.contiguous() for name, tensor in state_dict.items()}, folder / BIN_NAME)


__all__ = ["FROM_FORMATS", "TO_FORMATS", "convert_checkpoint", "ssm_hf_checkpoint", "ssm_hf_config",
           "write_mamba_ssm_folder"]
