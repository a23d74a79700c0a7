"""setup.sh picks the torch build: CUDA from PyPI with an NVIDIA GPU, else the local CPU wheel that
pip's find-links point at, else PyTorch's CPU index (`bash setup.sh --plan`, nvidia-smi faked on PATH)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


def plan(tmp_path: Path, nvidia_smi: str | None, **env) -> str:
    """The plan setup.sh prints, with a fake `nvidia-smi` (a shell body; None: exits 9, no driver)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + (nvidia_smi or "echo 'NVIDIA-SMI has failed' >&2; exit 9") + "\n")
    fake.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    full.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
    res = subprocess.run(["bash", "setup.sh", "--plan"], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_gpu_gets_the_cuda_build_from_pypi_whatever_the_local_wheels(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / WHEEL).touch()
    out = plan(tmp_path, "echo 'GPU 0: NVIDIA H200 (UUID: GPU-0123)'", PIP_FIND_LINKS=str(tmp_path / "wheels"))
    assert "CUDA build of torch 2.13.0 from PyPI (NVIDIA GPU found: GPU 0: NVIDIA H200)" in out
    # pip's configuration and find-links are left out, so the local +cpu wheel cannot be chosen
    assert "env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null pip install torch==2.13.0\n" in out


def test_no_gpu_takes_the_local_cpu_wheel_of_pips_find_links(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / WHEEL).touch()
    (tmp_path / "wheels" / "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()  # another version
    out = plan(tmp_path, None, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS=str(tmp_path / "wheels"))
    assert f"CPU build of torch 2.13.0 from the local wheel {tmp_path / 'wheels' / WHEEL}" in out
    assert "    pip install torch==2.13.0\n" in out


def test_no_gpu_and_no_local_wheel_uses_the_cpu_index(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    out = plan(tmp_path, "exit 0", PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS=str(tmp_path / "wheels"))
    assert "CPU build of torch 2.13.0 from https://download.pytorch.org/whl/cpu (no NVIDIA GPU, no local wheel)" in out
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in out


@pytest.mark.skipif(not list(Path("/opt/wheels").glob("torch-2.13.0*.whl")), reason="no local torch wheel here")
def test_this_machine_installs_the_local_cpu_wheel_offline(tmp_path):
    """What CI's `bash setup.sh` does here: pip's own configuration points at the local wheel."""
    out = plan(tmp_path, None, PIP_FIND_LINKS=os.environ.get("PIP_FIND_LINKS", ""))
    assert "CPU build of torch 2.13.0 from the local wheel /opt/wheels/torch-2.13.0" in out
