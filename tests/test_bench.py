"""`ssm-hf bench`: a tiny CPU sweep through the command line, its CSV, cache sizes against the configs, skipped
points, plots, and the option parsing."""

import csv
import importlib
import json
import sys

import pytest
import torch

import ssm_hf
from ssm_hf import bench, zoo
from ssm_hf.cli import main

MODELS = ("mamba-tiny", "mamba2-tiny", "hybrid-tiny")
LENGTHS = (16, 64)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def expected_cache_bytes(name: str, config, length: int, batch: int = 1, itemsize: int = 4) -> int:
    """Bytes of the cache after a prompt of `length` tokens, from the config: conv inputs and SSM states per SSM
    layer (independent of the length), keys and values per attention layer (proportional to it)."""
    if name.startswith("llama"):
        kv_per_token = 2 * config["num_key_value_heads"] * config["head_dim"]
        return batch * config["num_hidden_layers"] * kv_per_token * length * itemsize
    if config.model_type == "ssm_mamba":
        per_layer = config.intermediate_size * (config.conv_kernel + config.state_size)
        return batch * config.num_hidden_layers * per_layer * itemsize
    if config.model_type == "ssm_mamba2":
        d_inner = config.num_heads * config.head_dim
        conv_dim = d_inner + 2 * config.n_groups * config.state_size
        per_layer = conv_dim * config.conv_kernel + d_inner * config.state_size
        return batch * config.num_hidden_layers * per_layer * itemsize
    assert config.model_type == "ssm_hybrid" and config.ssm_mixer == "mamba"
    d_inner = config.mamba_expand * config.hidden_size
    total = 0
    for kind in config.layers_block_type:
        if kind == "attention":
            total += 2 * config.num_key_value_heads * config.head_dim * length
        else:
            total += d_inner * (config.mamba_d_conv + config.mamba_d_state)
    return batch * total * itemsize


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--models", ",".join(MODELS), "--baseline", "llama", "--lengths", "16,64",
                 "--decode-tokens", "3", "--repeats", "1", "--device", "cpu", "--out", str(out), "--no-progress"])
    columns, rows = read_csv(out / "bench.csv")
    meta = json.loads((out / "meta.json").read_text())
    return code, out, columns, rows, meta


def test_sweep_writes_one_measured_row_per_model_and_length(sweep):
    code, out, columns, rows, meta = sweep
    assert code == 0
    assert tuple(columns) == bench.COLUMNS
    llama = next(iter(name for name in meta["models"] if name.startswith("llama")))
    assert [(r["model"], int(r["context_length"])) for r in rows] == \
        [(m, n) for m in (*MODELS, llama) for n in LENGTHS]
    for row in rows:
        assert row["status"] == "ok" and row["reason"] == "", row
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["batch_size"] == "1"
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes", "cache_bytes"):
            assert float(row[key]) > 0, (key, row)
        # float32 weights: 4 bytes a parameter (Llama adds its rotary buffer); the peak includes the weights
        assert int(row["weights_bytes"]) >= 4 * int(row["params"])
        if row["model"] in MODELS:
            assert int(row["weights_bytes"]) == 4 * int(row["params"])
        assert int(row["peak_memory_bytes"]) >= int(row["weights_bytes"])
        assert "VmHWM" in row["memory_measure"]
    for name in MODELS:
        params = {int(r["params"]) for r in rows if r["model"] == name}
        assert params == {zoo.parameter_count(ssm_hf.preset_config(name))}
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["date"]
    assert meta["baseline_config"]["model_type"] == "llama"
    assert (out / "table.md").read_text().count("\n") == 2 + len(rows)


def test_cache_bytes_match_the_configs(sweep):
    _, _, _, rows, meta = sweep
    for row in rows:
        name, length = row["model"], int(row["context_length"])
        config = meta["baseline_config"] if name.startswith("llama") else ssm_hf.preset_config(name)
        assert int(row["cache_bytes"]) == expected_cache_bytes(name, config, length), row
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(int(row["cache_bytes"]))
    # pure SSMs: flat in the length; the KV cache: 4x the tokens, 4x the bytes; the hybrid: in between
    assert by_model["mamba-tiny"][0] == by_model["mamba-tiny"][1]
    assert by_model["mamba2-tiny"][0] == by_model["mamba2-tiny"][1]
    llama = next(name for name in by_model if name.startswith("llama"))
    assert by_model[llama][1] == 4 * by_model[llama][0]
    assert by_model["hybrid-tiny"][0] < by_model["hybrid-tiny"][1] < 4 * by_model["hybrid-tiny"][0]


def test_plots_are_valid_png_images(sweep):
    from matplotlib import image

    _, out, _, _, _ = sweep
    for name in ("memory.png", "decode.png", "prefill.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) < 200_000
        pixels = image.imread(out / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels.std() > 0  # something is drawn


def test_points_over_the_memory_limit_are_skipped_and_reported(tmp_path, capsys):
    code = main(["bench", "--models", "mamba-tiny", "--baseline", "none", "--lengths", "16,32", "--decode-tokens",
                 "2", "--repeats", "1", "--device", "cpu", "--max-memory-gb", "1e-6", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    _, rows = read_csv(tmp_path / "bench.csv")
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert "estimated peak memory" in rows[0]["reason"] and "the limit asked for, 1 kB" in rows[0]["reason"]
    assert rows[1]["reason"] == "longer than 16, which was skipped"
    assert rows[0]["prefill_tokens_per_s"] == "" and rows[0]["cache_bytes"] == ""
    printed = capsys.readouterr().out
    assert "skipped: mamba-tiny at 16 tokens: estimated peak memory" in printed
    assert (tmp_path / "memory.png").read_bytes().startswith(PNG_SIGNATURE)  # plots say what was not measured


def test_points_over_the_time_budget_are_skipped(tmp_path, capsys):
    code = main(["bench", "--models", "mamba2-tiny", "--baseline", "none", "--lengths", "16,32,64",
                 "--decode-tokens", "2", "--repeats", "1", "--device", "cpu", "--time-budget", "1e-9",
                 "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert code == 0
    _, rows = read_csv(tmp_path / "bench.csv")
    assert [r["status"] for r in rows] == ["skipped"] * 3
    assert "a prefill of 16 tokens took" in rows[0]["reason"] and "budget" in rows[0]["reason"]
    assert rows[2]["reason"] == "longer than 16, which was skipped"
    assert not (tmp_path / "memory.png").exists()
    assert "skipped: mamba2-tiny at 16 tokens" in capsys.readouterr().out


def test_local_checkpoint_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    config = ssm_hf.preset_config("mamba-tiny")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "my-mamba")
    code = main(["bench", "--models", str(tmp_path / "my-mamba"), "--baseline", "none", "--lengths", "24",
                 "--decode-tokens", "2", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--no-progress", "--no-plots"])
    assert code == 0
    _, rows = read_csv(tmp_path / "out" / "bench.csv")
    assert [(r["model"], r["status"]) for r in rows] == [("my-mamba", "ok")]
    assert int(rows[0]["cache_bytes"]) == expected_cache_bytes("my-mamba", config, 24)


def test_unknown_model_fails_listing_the_presets(tmp_path, capsys):
    assert main(["bench", "--models", "mamba-7t", "--out", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'mamba-7t'" in err and "mamba-tiny" in err and "hybrid-130m" in err
    assert not (tmp_path / "bench.csv").exists()


def test_parse_lengths_and_counts():
    assert bench.parse_lengths("1k,4k,16k,64k") == [1024, 4096, 16384, 65536]
    assert bench.parse_lengths("64, 16,16") == [16, 64]
    for bad in ("1m", "0", "", "4k,x", "-8"):
        with pytest.raises(ValueError, match="context length"):
            bench.parse_lengths(bad)
    assert bench.parse_count("130m") == 130_000_000 and bench.parse_count("1.3B") == 1_300_000_000
    assert bench.parse_count("5000") == 5000
    with pytest.raises(ValueError, match="parameter count"):
        bench.parse_count("lots")


@pytest.mark.parametrize("preset", ["mamba-130m", "hybrid-130m"])
def test_llama_baseline_has_about_the_first_models_size(preset):
    config = ssm_hf.preset_config(preset)
    spec = bench.baseline_spec("llama", bench.ModelSpec(preset, config), None, max_length=4096)
    target, got = zoo.parameter_count(config), zoo.parameter_count(spec.config)
    assert abs(got - target) < 0.1 * target
    assert spec.config.hidden_size == config.hidden_size and spec.config.vocab_size == config.vocab_size
    assert spec.attn_implementation == "sdpa" and spec.label.startswith("llama-")


def test_llama_baseline_by_size():
    config = bench.llama_baseline_config(bench.parse_count("370m"), vocab_size=50280)
    assert config.hidden_size == 1024 and config.num_attention_heads == 16
    assert abs(zoo.parameter_count(config) - 370e6) < 0.1 * 370e6


def test_cache_nbytes_counts_shared_storage_once():
    import torch

    x = torch.zeros(10, 4)
    assert bench.cache_nbytes({"a": x, "b": x[:5], "c": [torch.zeros(3, dtype=torch.bfloat16)]}) == 160 + 6


def test_matplotlib_is_needed_only_for_plots(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    importlib.reload(bench)  # the module imports without it
    args = ["bench", "--models", "mamba-tiny", "--baseline", "none", "--lengths", "16", "--decode-tokens", "2",
            "--repeats", "1", "--device", "cpu", "--no-progress"]
    # asking for plots fails before the sweep starts, naming the extra to install
    assert main([*args, "--out", str(tmp_path / "plots")]) == 2
    assert "ssm-hf[bench]" in capsys.readouterr().err
    assert not (tmp_path / "plots" / "bench.csv").exists()
    assert main([*args, "--out", str(tmp_path / "csv"), "--no-plots"]) == 0
    assert (tmp_path / "csv" / "bench.csv").is_file()


def test_out_of_memory_skips_and_other_errors_fail(tmp_path, monkeypatch, capsys):
    measure = bench.measure_point

    def failing(model, length, *args):
        if length == 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if model.config.model_type == "ssm_mamba2" and length == 16:
            raise RuntimeError("a bug in the model")
        return measure(model, length, *args)

    monkeypatch.setattr(bench, "measure_point", failing)
    code = main(["bench", "--models", "mamba-tiny,mamba2-tiny", "--baseline", "none", "--lengths", "16,32,64",
                 "--decode-tokens", "2", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path),
                 "--no-progress", "--no-plots"])
    assert code == 1  # a failed point is an error; skipped ones are not
    _, rows = read_csv(tmp_path / "bench.csv")
    assert [(r["model"], r["status"]) for r in rows] == [
        ("mamba-tiny", "ok"), ("mamba-tiny", "skipped"), ("mamba-tiny", "skipped"),
        ("mamba2-tiny", "failed"), ("mamba2-tiny", "skipped"), ("mamba2-tiny", "skipped")]
    assert rows[1]["reason"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows[2]["reason"] == "longer than 32, which ran out of memory"
    assert rows[3]["reason"] == "a bug in the model"
    printed = capsys.readouterr().out
    assert "failed: mamba2-tiny at 16 tokens: a bug in the model" in printed
