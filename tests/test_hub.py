"""Pushing to the Hub and loading back, end to end on 127.0.0.1, through huggingface_hub's and transformers' own
clients: uploads go to the test suite's UploadHub (tests/hub_server.py), which writes git repositories that olah
serves for the downloads."""

import json
import logging
import secrets
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import assert_close_to_scale, tiny_lm
from hub_server import OlahServer, UploadHub
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from remote_code_runner import run_without_ssm_hf
from transformers import AutoModelForCausalLM, AutoTokenizer

import ssm_hf
from ssm_hf import hub
from ssm_hf.cli import main


@pytest.fixture(scope="session")
def test_hub(tmp_path_factory):
    """The upload server and olah, started once; olah is stopped by its PID at the end."""
    pytest.importorskip("olah", reason="olah (in the dev extra) serves the test Hub's downloads")
    if shutil.which("git") is None:
        pytest.skip("the test Hub keeps its repositories in git, and git is not installed")
    root = tmp_path_factory.mktemp("hub")
    upload = UploadHub(root / "mirrors", root / "lfs").start()
    olah = OlahServer(root / "mirrors", root / "olah")
    try:
        olah.wait_ready()
    except RuntimeError as err:
        upload.stop()
        pytest.skip(f"olah could not be started: {err}")
    yield SimpleNamespace(upload=upload, olah=olah, root=root)
    olah.stop()
    upload.stop()


@pytest.fixture
def endpoint(monkeypatch, tmp_path):
    """`endpoint(url)` points huggingface_hub (hence transformers) at `url`. huggingface_hub reads HF_ENDPOINT and
    HF_HUB_DISABLE_XET once, at import, so the constants are patched. Xet is off because the test Hub speaks the
    LFS protocol (with hf_xet installed the client would upload through Xet); no token is stored or set."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    def use(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    return use


@pytest.fixture
def log_records():
    """Every log record of ssm_hf, transformers and huggingface_hub (at DEBUG) while the test runs."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("", "ssm_hf", "transformers", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield records
    for logger, level in zip(loggers, levels):
        logger.removeHandler(handler)
        logger.setLevel(level)


def saved_model(folder: Path, preset: str, tokenizer, seed: int = 0):
    model = tiny_lm(preset, seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def git_history_contains(repo: Path, text: str) -> bool:
    revisions = subprocess.run(["git", "--git-dir", str(repo), "rev-list", "--all"], capture_output=True, text=True,
                               check=True).stdout.split()
    found = subprocess.run(["git", "--git-dir", str(repo), "grep", "-a", "-F", "-q", text, *revisions])
    return found.returncode == 0


def test_push_then_load_end_to_end(test_hub, endpoint, tokenizer, tmp_path, capsys, log_records, one_thread):
    """`ssm-hf push --remote-code --private` uploads weights (sharded, through LFS), config, generation config,
    tokenizer and model card; the repository loads back through olah with ssm_hf (same logits, same tokenizer)
    and without it (remote code, in a Python where ssm_hf cannot be imported). A second push to a new branch
    without remote code removes the shards and code it no longer writes, on that branch only. The token reaches
    the server and nothing else."""
    upload, olah = test_hub.upload, test_hub.olah
    repo_id, token = "org/mamba-e2e", "hf_" + secrets.token_hex(16)
    model = saved_model(tmp_path / "model", "mamba-tiny", tokenizer)

    endpoint(upload.url)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", token)
        first = len(upload.requests)
        assert main(["push", str(tmp_path / "model"), "--repo-id", repo_id, "--remote-code", "--private",
                     "--license", "apache-2.0", "--max-shard-size", "40KB"]) == 0
        main_requests = upload.requests[first:]
        second = len(upload.requests)
        assert main(["push", str(tmp_path / "model"), "--repo-id", repo_id, "--revision", "dev"]) == 0
        dev_requests = upload.requests[second:]
    printed = capsys.readouterr()
    assert f"to {repo_id}:" in printed.out and f"to {repo_id} (branch dev):" in printed.out

    # what the server received
    creates = [r for r in main_requests if r["path"] == "/api/repos/create"]
    assert creates[0]["json"] == {"name": "mamba-e2e", "organization": "org", "visibility": "private"}
    # the repository calls carry the token (the LFS upload itself does not: a pre-signed storage URL on the Hub)
    repo_calls = [r for r in main_requests + dev_requests
                  if r["path"].startswith(("/api/repos/", f"/api/models/{repo_id}/", f"/{repo_id}.git/"))]
    assert len(repo_calls) >= 10 and all(r["authorized"] for r in repo_calls)
    assert set(upload.authorizations) == {f"Bearer {token}"}
    assert any(r["path"].endswith(".git/info/lfs/objects/batch") for r in main_requests), "weights go through LFS"
    commit_main, commit_dev = [c for c in upload.commits if c["repo"] == repo_id]
    shards = [name for name in commit_main["files"] if name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in commit_main["files"]
    for name in ("README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "modeling_ssm_hf.py", "configuration_ssm_hf.py"):
        assert name in commit_main["files"], name
    assert commit_main["revision"] == "main" and commit_dev["revision"] == "dev"
    assert any(r["path"] == f"/api/models/{repo_id}/branch/dev" for r in dev_requests)
    assert "model.safetensors" in commit_dev["files"] and "modeling_ssm_hf.py" not in commit_dev["files"]
    assert set(commit_dev["deleted"]) == set(shards) | {"model.safetensors.index.json"} | {
        name for name in commit_main["files"] if name.endswith(".py")}

    # downloads, anonymous, through olah
    endpoint(olah.url)
    cache = tmp_path / "cache"
    x = torch.randint(1, len(tokenizer), (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).logits
        for revision in ("main", "dev"):
            loaded = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, cache_dir=cache).eval()
            assert type(loaded) is ssm_hf.MambaForCausalLM
            assert_close_to_scale(loaded(x).logits, expected, tol=0)
    # AutoTokenizer.from_pretrained(repo_id) itself fails against olah 0.5.4: transformers lists the repository's
    # `additional_chat_templates/` folder, which olah answers with 401 instead of the Hub's 404 for a missing path
    # (huggingface_hub then raises RepositoryNotFoundError). So the tokenizer's files come through olah by
    # snapshot_download, and the tokenizer loads from them.
    tokenizer_dir = snapshot_download(repo_id, allow_patterns=["tokenizer*", "special_tokens_map.json"],
                                      cache_dir=cache)
    text = "def fibonacci(n):\n    return n"
    assert AutoTokenizer.from_pretrained(tokenizer_dir)(text)["input_ids"] == tokenizer(text)["input_ids"]
    api = HfApi(endpoint=olah.url)
    dev_files = api.list_repo_files(repo_id, revision="dev")
    assert "model.safetensors" in dev_files and not any(name.endswith(".py") for name in dev_files)
    assert "modeling_ssm_hf.py" in api.list_repo_files(repo_id)
    card = ModelCard.load(hf_hub_download(repo_id, "README.md", cache_dir=cache))
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0" and {"ssm", "mamba", "custom_code"} <= set(card.data.tags)
    assert "trust_remote_code=True" in card.text and f'from_pretrained("{repo_id}")' in card.text
    dev_config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision="dev", cache_dir=cache)).read_text())
    assert "auto_map" not in dev_config

    # transformers alone, from the Hub (olah), in a Python without ssm_hf or Triton. The revision is explicit
    # because olah 0.5.4 offline cannot answer `GET /api/models/ORG/NAME` (repo info of the default branch): then
    # transformers cannot resolve the revision, probes adapter_config.json by name, and olah answers that missing
    # file with 401 instead of 404, which huggingface_hub raises as RepositoryNotFoundError.
    out = run_without_ssm_hf([{"model": repo_id, "revision": "main", "input_ids": x.tolist(), "new_tokens": 4}],
                             tmp_path / "no-ssm-hf", env={"HF_ENDPOINT": olah.url, "HF_HUB_DISABLE_XET": "1"})
    assert out["import_errors"]["ssm_hf"].startswith("ModuleNotFoundError") and out["loaded"] == []
    assert out["results"][0]["module"].startswith("transformers_modules.org.")  # loaded from the Hub cache
    assert_close_to_scale(out["results"][0]["logits"], expected)
    with torch.no_grad():
        assert torch.equal(out["results"][0]["tokens"], model.generate(x, max_new_tokens=4, do_sample=False))

    # the token: sent to the server, and nowhere else
    outputs = [printed.out, printed.err, *(record.getMessage() for record in log_records)]
    assert not any(token in text for text in outputs)
    assert not any(token.encode() in data for data in upload.received.values())
    for path in [*tmp_path.rglob("*"), *test_hub.root.rglob("*")]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert not git_history_contains(upload.repo_path(repo_id), token)
    assert git_history_contains(upload.repo_path(repo_id), "mamba-e2e")  # the search itself works


def test_model_push_to_hub_uploads_what_the_cli_uploads(test_hub, endpoint, tokenizer, tmp_path, monkeypatch,
                                                        one_thread):
    """`model.push_to_hub(...)` and `ssm-hf push FOLDER` of the same model give the same files (the model card up
    to the repository name), through the same huggingface_hub calls."""
    upload = test_hub.upload
    model = saved_model(tmp_path / "model", "hybrid-tiny", tokenizer, seed=1)
    endpoint(upload.url)
    monkeypatch.setenv("HF_TOKEN", "hf_" + secrets.token_hex(8))
    card_args = ["--license", "mit", "--base-model", "org/hybrid-base", "--remote-code"]
    assert main(["push", str(tmp_path / "model"), "--repo-id", "org/from-folder", *card_args]) == 0
    info = model.push_to_hub("org/from-object", tokenizer=tokenizer, license="mit", base_model="org/hybrid-base",
                             remote_code=True, commit_message="push from Python")
    assert info.oid == upload.commits[-1]["oid"] and upload.commits[-1]["summary"] == "push from Python"

    def received(repo_id):
        prefix = f"{repo_id}@main:"
        return {key[len(prefix):]: data for key, data in upload.received.items() if key.startswith(prefix)}

    from_folder, from_object = received("org/from-folder"), received("org/from-object")
    assert sorted(from_folder) == sorted(from_object)
    for name, data in from_folder.items():
        if name == "README.md":
            data = data.replace(b"from-folder", b"from-object")
        assert data == from_object[name], name
    card = ModelCard(from_object["README.md"].decode())
    assert card.data.license == "mit" and card.data.base_model == "org/hybrid-base"
    assert {"ssm", "ssm-hf", "hybrid", "mamba", "moe", "custom_code"} <= set(card.data.tags)
    assert "org/hybrid-base" in card.text


def test_push_refuses_bad_folders_before_contacting_the_hub(test_hub, endpoint, tmp_path, capsys):
    upload = test_hub.upload
    endpoint(upload.url)
    before = len(upload.requests)
    assert main(["push", str(tmp_path / "nothing"), "--repo-id", "org/x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    theirs = transformers.MambaForCausalLM(transformers.MambaConfig(hidden_size=16, num_hidden_layers=1,
                                                                    vocab_size=32))
    theirs.save_pretrained(tmp_path / "theirs")
    assert main(["push", str(tmp_path / "theirs"), "--repo-id", "org/x"]) == 2
    assert "not an ssm-hf configuration" in capsys.readouterr().err
    assert len(upload.requests) == before


def test_push_without_a_token_reports_the_hubs_refusal(test_hub, endpoint, tmp_path, capsys):
    endpoint(test_hub.upload.url)
    tiny_lm("mamba-tiny").save_pretrained(tmp_path / "model")
    assert main(["push", str(tmp_path / "model"), "--repo-id", "org/no-token"]) == 1
    err = capsys.readouterr().err
    assert "the Hub refused" in err and "401" in err
    assert not test_hub.upload.repo_path("org/no-token").exists()


def test_model_card_metadata_and_an_existing_card(tmp_path):
    """No server: the folder a push would upload. Without remote code the card says library ssm-hf and shows the
    `import ssm_hf` snippet only; a README.md in the folder keeps its text and metadata, extended with ours."""
    model = tiny_lm("mamba2-tiny")
    model.save_pretrained(tmp_path / "plain")
    files = hub.prepare_push_folder(tmp_path / "plain", tmp_path / "out", repo_id="org/m2", revision="v1")
    assert sorted(files) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "ssm-hf" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["ssm", "ssm-hf", "mamba2"]
    assert card.data.license is None and card.data.base_model is None
    assert 'from_pretrained("org/m2", revision="v1")' in card.text and "trust_remote_code" not in card.text
    assert "no tokenizer" in card.text

    (tmp_path / "plain" / "README.md").write_text(
        "---\nlicense: other\nbase_model: someone/original\ntags:\n- converted\n---\n# My model\n\nNotes.\n")
    hub.prepare_push_folder(tmp_path / "plain", tmp_path / "out2", repo_id="org/m2", license="apache-2.0")
    card = ModelCard.load(tmp_path / "out2" / "README.md")
    assert card.text.strip() == "# My model\n\nNotes."
    assert card.data.license == "apache-2.0" and card.data.base_model == "someone/original"
    assert card.data.tags == ["converted", "ssm", "ssm-hf", "mamba2"] and card.data.library_name == "ssm-hf"
    with pytest.raises(FileExistsError):
        hub.prepare_push_folder(tmp_path / "plain", tmp_path / "out2", repo_id="org/m2")


def test_push_folder_keeps_dtype_and_drops_a_stale_auto_map(tmp_path):
    """A folder that holds a remote-code export, pushed without remote code: no auto_map pointing at code that is
    not uploaded. The weights keep their dtype."""
    tiny_lm("mamba-tiny").to(torch.bfloat16).save_pretrained(tmp_path / "src")
    hub.prepare_push_folder(tmp_path / "src", tmp_path / "with-code", repo_id="org/m", remote_code=True)
    assert "auto_map" in json.loads((tmp_path / "with-code" / "config.json").read_text())
    files = hub.prepare_push_folder(tmp_path / "with-code", tmp_path / "plain", repo_id="org/m")
    assert not any(name.endswith(".py") for name in files)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "auto_map" not in config and config["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype="auto")
    assert loaded.backbone.embeddings.weight.dtype == torch.bfloat16
