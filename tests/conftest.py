"""Shared helpers: tiny real trials on scikit-learn's digits, ports, waiting, an MLflow server,
headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_spec(strategies: list[dict], scenario: str = "class-il", **overrides) -> dict:
    """A pipeline spec (as a dict) on digits with 2 experiences and a few steps each."""
    bench = {"source": "digits", "scenario": scenario, "experiences": 2}
    if scenario == "domain-il":
        bench["domain"] = "permuted"
    spec = {
        "name": "tiny",
        "benchmarks": [bench],
        "strategies": strategies,
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"iterations": 6, "batch_size": 32, "lr": 0.01},
        "seeds": [0],
    }
    spec.update(overrides)
    return spec


def tiny_trial(strategy: dict, scenario: str = "class-il", **overrides):
    from clgrid.spec import PipelineSpec, expand

    return expand(PipelineSpec.model_validate(tiny_spec([strategy], scenario, **overrides)))[0]


def run_clgrid(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("clgrid")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def free_port() -> int:
    """A loopback port nothing listens on (a server to start there, or one that is surely closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url``, whatever it says (a 401 without a token is up)."""
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def wait_for(condition, what: str, timeout: float = 120, logs: tuple[Path, ...] = ()):
    """``condition()``'s first truthy value; fails after ``timeout`` seconds with the tails of ``logs``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def mlflow_server(root: Path, port: int) -> list[str]:
    """The command of `mlflow server` on 127.0.0.1:``port`` with its SQLite store and artifacts in ``root``
    (run it with MLFLOW_SERVER_ENV)."""
    return [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow-server.db",
            "--artifacts-destination", str(root / "mlartifacts")]


MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # 8 job processes a tracking server does not need


def write_sweep_json(folder: Path, tracking_uri: str, parent_run_id: str = "0" * 32) -> None:
    """The sweep.json of a sweep ``s`` without trials whose runs live at ``tracking_uri``."""
    from clgrid.sweep.layout import SweepDir, SweepMeta

    SweepDir(folder).write_meta(SweepMeta(sweep_id="s", spec={}, spec_hash="", tracking_uri=tracking_uri,
                                          experiment="e", parent_run_id=parent_run_id, trials=[]))


# Browser tests need Chromium. Without one they are skipped, so the README's test command passes on
# a fresh machine; CI (.ci/run) installs Chromium and sets REQUIRE_BROWSER=1, under which a missing
# browser fails instead. CHROMIUM_ENV names the executable (or, set to a path that does not exist,
# hides the installed one).
REQUIRE_BROWSER, CHROMIUM_ENV = "CLGRID_REQUIRE_BROWSER", "CLGRID_CHROMIUM"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    """The Chromium executable (``$CLGRID_CHROMIUM``, else the first on the PATH); skips the test,
    or fails it under ``CLGRID_REQUIRE_BROWSER=1``, when there is none."""
    named = os.environ.get(CHROMIUM_ENV)
    names = [named] if named else ["chromium", "chromium-browser", "google-chrome"]
    exe = next((found for name in names if (found := shutil.which(name))), None)
    if exe is None:
        reason = ("no Chromium on the PATH: install it to run the browser tests "
                  "(Debian/Ubuntu: `apt-get update && apt-get install -y chromium`)")
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{reason}; {REQUIRE_BROWSER}=1 requires it")
        pytest.skip(reason)
    return exe


def run_chromium(page: Path | str, tmp: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Headless Chromium on a file or URL with a fresh profile in ``tmp``."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    url = page.as_uri() if isinstance(page, Path) else page
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


class Exploit:
    """Unpickling this runs ``touch <marker>``: what a tampered checkpoint or dataset file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def artifacts_dir() -> Path:
    path = REPO / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A real MLflow SQLite store with two sweeps of hand-made trial runs (report_store.make_store)."""
    from report_store import make_store

    return make_store(tmp_path_factory.mktemp("mlflow"))
