import json
import shutil
import subprocess

import ssm_hf
from ssm_hf import zoo
from ssm_hf.cli import main


def test_zoo_lists_presets_with_parameter_counts(capsys):
    assert main(["zoo"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    for name in ("mamba-tiny", "mamba-130m", "mamba2-tiny", "mamba2-2.7b", "hybrid-tiny", "jamba-v0.1"):
        assert name in rows
    assert rows["mamba-130m"] == ["ssm_mamba", "129M"]
    assert rows["hybrid-tiny"][0] == "ssm_hybrid"


def test_parameter_counts_match_the_published_sizes():
    # the published names round these: 130M, 2.8B, 2.7B, and Jamba's "52B total parameters"
    for name, published in (("mamba-130m", 130e6), ("mamba-2.8b", 2.8e9), ("mamba2-2.7b", 2.7e9),
                            ("jamba-v0.1", 52e9)):
        count = zoo.parameter_count(ssm_hf.preset_config(name))
        assert abs(count - published) / published < 0.02, (name, count)


def test_zoo_shows_one_preset(capsys):
    assert main(["zoo", "mamba-130m"]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert fields["hidden_size"] == 768 and fields["num_hidden_layers"] == 24
    assert fields["model_type"] == "ssm_mamba"


def test_zoo_unknown_preset_fails_with_its_name(capsys):
    assert main(["zoo", "mamba-7t"]) == 2
    assert "mamba-7t" in capsys.readouterr().err


def test_console_script_is_installed():
    script = shutil.which("ssm-hf")
    assert script is not None, "the `ssm-hf` console script is not on PATH: was the package pip-installed?"
    out = subprocess.run([script, "zoo"], capture_output=True, text=True, check=True)
    assert "mamba-tiny" in out.stdout
