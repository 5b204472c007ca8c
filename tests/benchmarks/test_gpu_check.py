"""benchmarks/gpu_check.sh, the single device command: valid bash, offline install flags, documented in README."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_is_valid_bash():
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_check_installs_offline_for_sm90a_and_runs_everything():
    text = open(SCRIPT).read()
    assert "set -uo pipefail" in text
    install = next(line for line in text.splitlines() if "pip install" in line and "--no-build-isolation" in line)
    for flag in ("--no-build-isolation", "--no-deps", "--no-index"):
        assert flag in install, install
    assert "DINOV3_CUDA_ARCHS=9.0a" in text
    assert "benchmarks/run_all.py" in text and '"$OUT"' in text
    # It must not reach for the network: no downloads and no index URLs.
    assert not re.search(r"\b(curl|wget)\b|--index-url|--extra-index-url|git clone", text)


def test_readme_says_how_to_reproduce_the_gpu_results():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Reproducing the GPU results", 1)
    assert len(section) == 2, "README.md has no 'Reproducing the GPU results' section"
    body = section[1].split("\n## ", 1)[0]
    for needle in ("gpu_check.sh", "results.json", "OUT", "run_all.py --dry-run"):
        assert needle in body, needle
