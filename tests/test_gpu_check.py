"""`python -m qedlib gpu-check --cpu` runs every section with tiny shapes, so the GPU check cannot rot; without
CUDA and without --cpu it fails with the reason instead of skipping."""
import json

import pytest


def test_gpu_check_cpu_runs_every_section_and_records_it(tmp_path, capsys):
    from qedlib.__main__ import main
    assert main(["gpu-check", "--cpu", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {s["key"]: s for s in record["sections"]}
    assert list(sections) == list("abcdegf") and record["passed"]
    assert sections["a"]["returncode"] == 0 and sections["a"].get("skipped", 0) >= 1  # no CUDA: gpu tests skip
    gen = sections["b"]["rows"]
    assert {(r["cache"], r["batch"]) for r in gen} == {(c, b) for c in ("default", "static") for b in (1, 4)}
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 4 for r in gen)
    sft = sections["c"]["rows"]
    assert [r["batching"] for r in sft] == ["padded", "padding-free"] and all(r["tokens_per_s"] > 0 for r in sft)
    assert sft[1]["attention"] == "qed_varlen_sdpa"
    grpo = sections["d"]
    assert grpo["status"] == "pass" and 0 < grpo["weights_changed_frac"] <= 1 and grpo["rollouts"] == 4
    assert sections["e"]["status"] == "not run" and "not run" in sections["e"]["note"]
    launched = sections["g"]  # gpu-1's own launch config and optimizer: fp32 masters, lr-1e-6 updates survive
    assert launched["status"] == "pass" and launched["accelerate_config"] == "fsdp-offload"
    assert "CPUOffloadPolicy" in launched["fsdp"] and launched["optimizer_steps"].endswith(" float32")
    assert launched["weights_changed_frac"] > 0.5
    closes = sections["f"]["closes"]
    assert len(closes) == 4 and all(c["ok"] and not c["alive"] for c in closes)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| d | GRPO step, 4B shape | pass |" in table and "PASSED" in table


def test_gpu_check_without_cuda_fails_and_says_why(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from qedlib.__main__ import main
    assert main(["gpu-check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--cpu" in err
    assert not (tmp_path / "gpu_check.json").exists()
