"""Shared fixtures: tiny models built offline, the shipped problems, headless Chromium."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="session")
def tiny_model_path():
    """Folder of the tiny random Qwen3 model (built once, offline)."""
    from qedlib.models import build_tiny
    return str(build_tiny())


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_path):
    """A transformers generator around the tiny model."""
    from qedlib.config import Endpoint
    from qedlib.generation import make_generator
    return make_generator(Endpoint(model=tiny_model_path, batch_size=8, dtype="float32"))


@pytest.fixture(scope="session")
def shipped_problems():
    from qedlib.data import load_problems
    return load_problems("shipped")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium():
    """dom(html_file) -> the page's DOM after its scripts ran, in headless Chromium (Debian's `chromium`, which
    .ci/run installs); tests using it skip when it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed: `apt-get install -y --no-install-recommends chromium` "
                    "(Debian) to run the HTML rendering tests")

    def dom(html_file: Path) -> str:
        with tempfile.TemporaryDirectory() as profile:
            res = subprocess.run([found, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                                  "--dump-dom", Path(html_file).resolve().as_uri()], capture_output=True, text=True,
                                 timeout=180)
        assert "<html" in res.stdout, f"chromium printed no DOM for {html_file} (rc {res.returncode}): {res.stderr[-500:]}"
        return res.stdout
    return dom
