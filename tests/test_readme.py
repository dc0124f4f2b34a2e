"""The README's install and test commands are exactly what CI runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    install, test, first_run = quick_start_commands()[:3]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)
    assert first_run.startswith("prepretrain ")


def test_constraints_pin_the_tested_torch():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1" and "timm" in pins


@pytest.mark.slow
def test_the_python_api_example_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loss, top1 = (float(x) for x in result.stdout.split()[-2:])
    assert loss > 0 and 0 <= top1 <= 100
    assert (tmp_path / "runs" / "api_mae" / "encoder.safetensors").is_file()
    assert (tmp_path / "runs" / "api_eval" / "knn" / "results.json").is_file()
