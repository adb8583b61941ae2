import json
import shutil
import subprocess

from ssm_hf.cli import main


def test_zoo_lists_presets(capsys):
    assert main(["zoo"]) == 0
    names = capsys.readouterr().out.split()
    assert "mamba-tiny" in names and "mamba-130m" in names


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
