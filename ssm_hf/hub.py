"""Sharing checkpoints on the Hugging Face Hub: `push_to_hub` (behind `ssm-hf push` and `model.push_to_hub`).

A push uploads, in one commit: the weights as safetensors (sharded above `max_shard_size`), config.json,
generation_config.json, the tokenizer files of the folder if it has them, a model card (README.md with YAML
metadata and a usage snippet), and with `remote_code=True` the flat modeling code of `ssm_hf.remote_code` with an
`auto_map` in config.json, so that transformers alone loads the repository with `trust_remote_code=True`.
Weight and generated-code files of an earlier push that this one does not write are deleted in the same commit (a
stale `model.safetensors` next to a new sharded index would otherwise be the one transformers loads).

Everything goes through `huggingface_hub`'s `HfApi` (`create_repo`, `create_branch`, `create_commit`), so the
endpoint (`HF_ENDPOINT`) and the token are found the way huggingface_hub finds them: `token=None` means the
`HF_TOKEN` environment variable or the token stored by `hf auth login`. The token is passed to `HfApi` and nowhere
else: never printed, logged or written.

The model card's `library_name` is `transformers` for a push with remote code (transformers alone loads it; the
`custom_code` tag tells the Hub to show `trust_remote_code=True`) and `ssm-hf` otherwise, since loading it then
needs `import ssm_hf` first and the Hub's transformers snippet would fail.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .remote_code import EXPORTED_FILE_PATTERNS, auto_classes, export_remote_code
from .zoo import format_count

DEFAULT_MAX_SHARD_SIZE = "5GB"
# files of a tokenizer saved with save_pretrained (whichever of them the tokenizer has)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
# files at the repository root that a push replaces, and deletes where it no longer writes them
STALE_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                       "pytorch_model.bin.index.json", *EXPORTED_FILE_PATTERNS)
_PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForSequenceClassification":
                  "text-classification", "AutoModel": "feature-extraction"}


def push_to_hub(
    folder_or_model: str | os.PathLike | PreTrainedModel,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    remote_code: bool = False,
    token: str | bool | None = None,
    license: str | None = None,
    base_model: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: list[str] | tuple[str, ...] = (),
) -> CommitInfo:
    """Upload an ssm-hf model to the Hub repository `repo_id` (created if missing) in one commit.

    Args:
        folder_or_model: a folder written by `save_pretrained` (its model is loaded, checked and re-saved; its
            tokenizer files and README.md, if any, come along) or a model object.
        private: create the repository private (True) or public (False); None leaves it to the Hub's default. An
            existing repository keeps its visibility.
        revision: the branch to commit to, created from the default branch if missing; None for the default branch.
        remote_code: also upload the modeling code (see `ssm_hf.remote_code`) for `trust_remote_code=True` loading.
        token: as huggingface_hub takes it; None finds HF_TOKEN or the stored login.
        license, base_model: model card metadata (a license identifier such as "apache-2.0"; the Hub id of the
            model this one was converted or fine-tuned from); omitted when not given, unless the folder's own
            README.md has them.
        tokenizer: a tokenizer to save along with a model object.
        max_shard_size: safetensors files are split above this size ("5GB", or bytes).
        tags: extra model card tags.
    Returns the `CommitInfo` of the commit.
    """
    model, source = _model_and_source(folder_or_model)  # refuses a bad folder before anything is sent
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ssm-hf-push-") as staging:
        files = _write_push_folder(
            model, source, Path(staging), repo_id=repo_id, revision=revision, remote_code=remote_code,
            license=license, base_model=base_model, tokenizer=tokenizer, max_shard_size=max_shard_size, tags=tags)
        existing = api.list_repo_files(repo_id, revision=revision)
        stale = [name for name in existing if "/" not in name and name not in files
                 and any(fnmatch.fnmatchcase(name, pattern) for pattern in STALE_FILE_PATTERNS)]
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(staging, name)))
                      for name in files]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        return api.create_commit(
            repo_id, operations=operations, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {_contents(files)} with ssm-hf {_version()}",
            commit_description=commit_description)


def prepare_push_folder(
    folder_or_model: str | os.PathLike | PreTrainedModel,
    out_dir: str | os.PathLike,
    *,
    repo_id: str,
    revision: str | None = None,
    remote_code: bool = False,
    license: str | None = None,
    base_model: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tags: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Write into the empty folder `out_dir` exactly what `push_to_hub` uploads (arguments as there; `repo_id` and
    `revision` go into the model card's snippet). Returns the file names, relative to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give an empty folder to prepare the upload in.")
    model, source = _model_and_source(folder_or_model)
    return _write_push_folder(
        model, source, out, repo_id=repo_id, revision=revision, remote_code=remote_code, license=license,
        base_model=base_model, tokenizer=tokenizer, max_shard_size=max_shard_size, tags=tags)


def _model_and_source(folder_or_model: str | os.PathLike | PreTrainedModel) -> tuple[PreTrainedModel, Path | None]:
    """(the model, the folder it came from or None), checked to be an ssm-hf model."""
    if isinstance(folder_or_model, PreTrainedModel):
        auto_classes(type(folder_or_model.config))
        return folder_or_model, None
    source = Path(folder_or_model)
    return load_folder_model(source), source


def _write_push_folder(
    model: PreTrainedModel, source: Path | None, out: Path, *, repo_id: str, revision: str | None,
    remote_code: bool, license: str | None, base_model: str | None, tokenizer: PreTrainedTokenizerBase | None,
    max_shard_size: int | str, tags: list[str] | tuple[str, ...],
) -> list[str]:
    model.save_pretrained(out, max_shard_size=max_shard_size)
    has_tokenizer = False
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        has_tokenizer = True
    elif source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
                has_tokenizer = True
    if remote_code:
        export_remote_code(out, type(model.config))
    else:
        _drop_auto_map(out / "config.json")
    existing_card = source / "README.md" if source is not None and (source / "README.md").is_file() else None
    card = model_card(
        model, repo_id=repo_id, revision=revision, remote_code=remote_code, license=license, base_model=base_model,
        has_tokenizer=has_tokenizer, tags=[*(getattr(model, "model_tags", None) or ()), *tags],
        existing=existing_card)
    card.save(out / "README.md")
    return sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())


def _drop_auto_map(config_path: Path) -> None:
    """A checkpoint loaded from a remote-code export keeps its `auto_map`; without the code next to it, it would
    send transformers looking for files that are not there."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("auto_map", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_folder_model(folder: Path) -> PreTrainedModel:
    """The model saved in `folder`, as the class its config.json names (`architectures`; the causal LM if none),
    in its stored dtype. Raises for a folder that is not an ssm-hf checkpoint."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: give a folder written by save_pretrained.")
    config = AutoConfig.from_pretrained(folder)
    classes = auto_classes(type(config))
    wanted = (config.architectures or [None])[0]
    model_class = next((cls for name, cls in classes.items() if name != "AutoConfig" and cls.__name__ == wanted),
                       classes["AutoModelForCausalLM"])
    return model_class.from_pretrained(folder, dtype="auto")


def model_card(
    model: PreTrainedModel, *, repo_id: str, revision: str | None = None, remote_code: bool = False,
    license: str | None = None, base_model: str | None = None, has_tokenizer: bool = False, tags: list[str] = (),
    existing: Path | None = None,
) -> ModelCard:
    """The model card of a push. With `existing` (a folder's README.md), its text and metadata are kept, except
    `library_name` and `pipeline_tag`, which describe this push; its tags are extended with ours, and `license` /
    `base_model`, when given, replace its own."""
    config = model.config
    auto_name = _auto_name(model)
    data = ModelCardData(
        library_name="transformers" if remote_code else "ssm-hf",
        pipeline_tag=_PIPELINE_TAGS[auto_name],
        tags=model_tags(config, remote_code) + [tag for tag in tags if tag not in model_tags(config, remote_code)],
        license=license,
        base_model=base_model,
    )
    if existing is None:
        text = _card_text(model, repo_id, revision, remote_code, auto_name, has_tokenizer, base_model)
        return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")
    card = ModelCard.load(existing)
    card.data.library_name, card.data.pipeline_tag = data.library_name, data.pipeline_tag  # they describe this push
    for key in ("license", "base_model"):
        if getattr(data, key) is not None:
            setattr(card.data, key, getattr(data, key))
    card.data.tags = list(card.data.tags or []) + [tag for tag in data.tags if tag not in (card.data.tags or [])]
    return card


def model_tags(config: PreTrainedConfig, remote_code: bool = False) -> list[str]:
    """Hub tags of an ssm-hf model: ssm, ssm-hf, its family (the model_type without `ssm_`), a hybrid's SSM mixers
    and moe if it has experts, and custom_code with remote code."""
    tags = ["ssm", "ssm-hf", config.model_type.removeprefix("ssm_")]
    tags += [kind for kind in dict.fromkeys(getattr(config, "layers_block_type", None) or []) if kind != "attention"]
    if "moe" in (getattr(config, "layers_mlp_type", None) or []):
        tags.append("moe")
    if remote_code:
        tags.append("custom_code")
    return list(dict.fromkeys(tags))


def _auto_name(model: PreTrainedModel) -> str:
    classes = auto_classes(type(model.config))
    return next((name for name, cls in classes.items() if name != "AutoConfig" and isinstance(model, cls)),
                "AutoModelForCausalLM")


def _card_text(model: PreTrainedModel, repo_id: str, revision: str | None, remote_code: bool, auto_name: str,
               has_tokenizer: bool, base_model: str | None) -> str:
    config = model.config
    args = f'"{repo_id}"' + (f', revision="{revision}"' if revision else "")
    sizes = (f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, vocabulary {config.vocab_size}, "
             f"{format_count(model.num_parameters())} parameters")
    lines = [f"# {repo_id.rpartition('/')[2]}", "",
             f"A `{type(model).__name__}` (`model_type: {config.model_type}`) of ssm-hf, state space models for "
             f"transformers: {sizes}."]
    if base_model:
        lines += ["", f"Derived from [{base_model}](https://huggingface.co/{base_model})."]
    lines += ["", "## Usage", "", "With ssm-hf installed:", "", "```python",
              "import ssm_hf  # registers the ssm-hf architectures with transformers",
              f"from transformers import {auto_name}" + (", AutoTokenizer" if has_tokenizer else ""), "",
              f"model = {auto_name}.from_pretrained({args})"]
    if has_tokenizer:
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({args})")
        if auto_name == "AutoModelForCausalLM":
            lines += ['inputs = tokenizer("Hello", return_tensors="pt")',
                      "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))"]
    lines.append("```")
    if remote_code:
        lines += ["", "With transformers alone (this repository carries the modeling code, generated from ssm-hf "
                  f"{_version()}):", "", "```python", f"from transformers import {auto_name}", "",
                  f"model = {auto_name}.from_pretrained({args}, trust_remote_code=True)", "```"]
    if not has_tokenizer:
        lines += ["", "This repository has no tokenizer: feed the model token ids of the tokenizer it was trained "
                  "with."]
    return "\n".join(lines) + "\n"


def _contents(files: list[str]) -> str:
    return "model and tokenizer" if set(TOKENIZER_FILES) & set(files) else "model"


def _version() -> str:
    from . import __version__  # at call time: this module is imported while the package initialises

    return __version__


def model_push_to_hub(
    self: PreTrainedModel, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
    private: bool | None = None, token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, tags: list[str] | str | None = None,
    remote_code: bool = False, license: str | None = None, base_model: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> CommitInfo:
    """`model.push_to_hub` of the ssm-hf model classes: transformers' arguments, plus `remote_code`, `license`,
    `base_model` and `tokenizer`; uploads what `ssm-hf push` uploads (see `ssm_hf.hub.push_to_hub`)."""
    return push_to_hub(
        self, repo_id, private=private, revision=revision, remote_code=remote_code, token=token, license=license,
        base_model=base_model, tokenizer=tokenizer, max_shard_size=max_shard_size, commit_message=commit_message,
        commit_description=commit_description, create_pr=create_pr,
        tags=[tags] if isinstance(tags, str) else list(tags or ()))


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "model_card", "model_push_to_hub", "model_tags", "prepare_push_folder",
           "push_to_hub"]
