"""Download the wheels `python -m qedlib gpu-check` needs on an air-gapped GPU node (`make wheelhouse PY=3.12`).

The node already has a CUDA torch (2.11 or newer) and transformers (5.17 or newer, as on the GPU
machines we were lent) but no network. This resolves what the check needs (TRL, peft, accelerate,
datasets, pytest) for Linux x86_64 and the node's Python, leaves out everything that torch and
transformers already bring, downloads the rest as wheels with `pip download --no-deps`, writes
`requirements.txt` naming the top-level packages, and copies the tiny test model (its tokenizer
serves the check's random models; the 94 MiB embedded GGUF does not travel) into `qed-cache/`,
and packs it all into `wheelhouse.tar.xz` (under 60 MiB), the file that travels. On the node:
`tar -xJf wheelhouse.tar.xz && pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt`,
then `QED_CACHE=wheelhouse/qed-cache python -m qedlib gpu-check` from the repository (README).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts.lock_gpu import PLATFORM_TAGS  # noqa: E402  (one list of the Linux wheel tags)

NEEDED = ["trl==1.16.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0", "pytest>=9", "pyyaml>=6"]
ON_THE_NODE = ["torch==2.11.0", "transformers==5.17.0"]  # what the node has: their dependencies are not carried
LIMIT_MIB = 60


def resolve(reqs: list[str], python: str) -> dict[str, str]:
    """{name: version} of pip's dry-run resolve of `reqs` for Linux x86_64 and `python`, wheels only, from PyPI."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report",
                        str(report), *(a for t in PLATFORM_TAGS for a in ("--platform", t)), "--python-version", python,
                        "--implementation", "cp", "--only-binary=:all:", *reqs], check=True, env=env)
        return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-version", default="3.12", help="the GPU node's Python (major.minor)")
    ap.add_argument("--dest", default="wheelhouse")
    args = ap.parse_args()
    dest = Path(args.dest)
    everything = resolve(NEEDED + ON_THE_NODE, args.python_version)
    present = resolve(ON_THE_NODE, args.python_version)
    carry = {n: v for n, v in everything.items() if n not in present}
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest),
                    *(a for t in PLATFORM_TAGS for a in ("--platform", t)), "--python-version", args.python_version,
                    "--implementation", "cp", "--only-binary=:all:", *(f"{n}=={v}" for n, v in sorted(carry.items()))],
                   check=True, env=env)
    (dest / "requirements.txt").write_text("\n".join(NEEDED) + "\n")
    for whl in dest.glob("*.whl"):
        store_uncompressed(whl)
    tiny_in_bf16(dest / "qed-cache")
    archive = dest.with_name(dest.name + ".tar.xz")
    # xz over uncompressed wheels: pyarrow's 52 MiB wheel alone would not fit; its content xz-compresses to ~37
    subprocess.run(["tar", "-cJf", str(archive), "-C", str(dest.parent), dest.name], check=True,
                   env={**os.environ, "XZ_OPT": "-6 -T0"})
    size = archive.stat().st_size / 2**20
    print(f"{archive}: {len(carry)} wheels for Python {args.python_version} ({', '.join(sorted(carry))}) and the tiny "
          f"model, {size:.1f} MiB (leaving out what {' and '.join(ON_THE_NODE)} bring)")
    if size > LIMIT_MIB:
        print(f"error: {archive} is {size:.1f} MiB, over the {LIMIT_MIB} MiB that can travel", file=sys.stderr)
        return 1
    return 0


def store_uncompressed(whl: Path) -> None:
    """Rewrite a wheel with stored (uncompressed) members: still a valid wheel, and xz then compresses it far better."""
    import zipfile
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)  # before the info is changed: it says how to read the member
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    tmp.replace(whl)


def tiny_in_bf16(cache: Path) -> None:
    """The tiny test model (tokenizer for the check's random models, model for `pytest -m gpu`), weights in bf16."""
    from safetensors.torch import load_file, save_file
    from qedlib.models import TINY, build_tiny
    import torch
    out = cache / TINY
    shutil.copytree(build_tiny(), out)
    for f in out.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})


if __name__ == "__main__":
    sys.exit(main())
