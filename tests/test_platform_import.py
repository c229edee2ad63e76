"""The repo's platform/ folder must not shadow the standard-library platform module."""

import subprocess
import sys

from conftest import REPO


def test_stdlib_platform_imports_from_the_repo_root() -> None:
    proc = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Linux"
    assert not (REPO / "platform" / "__init__.py").exists()


def test_clgrid_and_torch_import_from_the_repo_root() -> None:
    code = "import torch, clgrid.train.trainer, clgrid.strategies; print(len(clgrid.strategies.REGISTRY))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 4
