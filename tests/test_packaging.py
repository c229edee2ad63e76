"""A non-editable install (`pip install .`) carries the engine, the strategies and the pipelines."""

import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO


def test_built_wheel_installs_imports_and_validates_a_bundled_pipeline(tmp_path: Path) -> None:
    wheel_dir, venv = tmp_path / "wheel", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheel_dir), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("clgrid-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # The new venv sees this venv's dependencies as a plain path entry: their .pth files (and so
    # the editable install of clgrid) are not processed, so only the wheel's copy can be imported.
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    code = ("import clgrid, clgrid.cli, clgrid.strategies as s; print(clgrid.__path__[0]); print(sorted(s.REGISTRY)); "
            "raise SystemExit(clgrid.cli.main(['validate', 'quickstart']))")
    proc = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(str(site)), lines[0]
    assert "'ewc'" in lines[1] and "'replay'" in lines[1]
    assert "12 trials" in proc.stdout
    console = subprocess.run([str(venv / "bin" / "clgrid"), "list"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert console.returncode == 0 and "buffer_size" in console.stdout
