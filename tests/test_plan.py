"""`python -m qedlib plan`: every shipped params file plans offline, and one plan matches a hand calculation."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qedlib import plan as P
from qedlib.__main__ import main

REPO = Path(__file__).resolve().parent.parent
GIB = 2 ** 30

# Which stages of the shipped recipes fit their GPU by the plan's estimate (None: no GPU planned).
SHIPPED_FITS = {
    "cpu.yaml": None,
    "smoke.yaml": None,
    "gpu-1.yaml": {"distill": "yes", "sft": "yes", "rubric_rl": "yes", "rc_rl": "yes", "eval": "yes"},
    "qed-nano.yaml": {"distill": "yes", "sft": "yes", "rubric_rl": "yes", "rc_rl": "yes", "eval": "yes"},
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a plan never downloads: the hub models come from the table
    for var in ("QED_JUDGE_URL", "QED_JUDGE_KEY", "QED_TEACHER_URL", "QED_TEACHER_KEY", "QED_SUMMARISER_URL"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("name", sorted(SHIPPED_FITS))
def test_shipped_params_plan_offline(name, capsys):
    plan = P.make_plan(REPO / "params" / name)
    assert [s.stage for s in plan.stages] == ["distill", "sft", "rubric_rl", "rc_rl", "eval"]
    assert plan.inert == []
    fits = SHIPPED_FITS[name]
    got = {s.stage: plan.fits(s) for s in plan.stages}
    assert got == (fits or {s: "no GPU planned" for s in got})
    rc = main(["plan", str(REPO / "params" / name)])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == (1 if fits and "NO" in fits.values() else 0)
    big = plan.largest
    assert out[-1] == f"largest per-device estimate: {big.total / GIB:.1f} GiB ({big.stage})"
    for stage, ok in (fits or {}).items():
        assert (f"{stage}: estimated" in "\n".join(out)) == (ok == "NO")


def test_gpu1_plan_names_endpoints_without_values(monkeypatch, capsys):
    monkeypatch.setenv("QED_JUDGE_URL", "http://judge.internal:9999/v1")
    monkeypatch.setenv("QED_JUDGE_KEY", "sk-not-to-be-printed")
    main(["plan", str(REPO / "params" / "gpu-1.yaml")])
    out = capsys.readouterr().out
    assert "rubric_rl.judge: openai/gpt-oss-20b; QED_JUDGE_URL set; QED_JUDGE_KEY set" in out
    assert "QED_TEACHER_URL NOT SET" in out
    assert "judge.internal" not in out and "sk-not-to-be-printed" not in out
    assert "built-in table" in out  # Qwen3-4B-Thinking-2507 is not in this machine's cache


def test_set_overrides_reach_the_plan(capsys):
    # gpu-1's SFT with fp32 masters in the GPU (no ZeRO-2 offload) does not fit one 80 GB GPU at 32k tokens;
    # at 16k it does.
    no_offload = ["--set", "sft.launch.accelerate_config=null", "--set", "sft.weights_dtype=auto"]
    assert main(["plan", str(REPO / "params" / "gpu-1.yaml"), *no_offload]) == 1
    assert "sft: estimated" in capsys.readouterr().out
    assert main(["plan", str(REPO / "params" / "gpu-1.yaml"), *no_offload, "--set", "sft.max_length=16384"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2:] == [
        "plan OK", "largest per-device estimate: 73.8 GiB (sft)"]


def test_inert_key_fails_the_plan(monkeypatch, capsys):
    import qedlib.params_check
    monkeypatch.setattr(qedlib.params_check, "inert_keys", lambda tree: ["rc_rl.not_read_anywhere"])
    assert main(["plan", str(REPO / "params" / "smoke.yaml")]) == 1
    assert "inert params key rc_rl.not_read_anywhere" in capsys.readouterr().out


def test_unknown_hub_model_is_a_clear_error():
    with pytest.raises(P.PlanError, match="KNOWN_ARCHITECTURES"):
        P.model_info("nobody/no-such-model-xyz")


def test_rubric_rl_plan_matches_a_hand_calculation(tmp_path, capsys):
    """Qwen3-0.6B (public config: V 151936, H 1024, L 28, 16 heads, 8 KV heads, head_dim 128, I 3072, tied),
    full fine-tuning with fp32 masters on one 24 GiB GPU next to a colocated vLLM."""
    V, H, L, heads, kv, hd, I = 151936, 1024, 28, 16, 8, 128, 3072
    # Parameters: embedding (tied with lm_head) + per layer q,k,v,o + gate/up/down + 2 RMSNorms + q/k norms, + final norm.
    per_layer = H * heads * hd + 2 * H * kv * hd + heads * hd * H + 3 * H * I + 2 * H + 2 * hd
    assert per_layer == 15_730_944
    params = V * H + L * per_layer + H
    assert params == 596_049_920
    # Batch: 2 problems x 8 rollouts = 16 completions, 4 per forward -> 4 accumulation steps.
    # Sequence: 1,024 prompt + 3,072 completion = 4,096 tokens (= vllm_max_model_length); T = 4 x 4,096.
    T = 4 * 4096
    states = 4 * params + 4 * params + 8 * params  # fp32 weights, grads, AdamW m + v
    A = 4 * H + 2 * heads * hd + 2 * kv * hd + 4 * I
    assert A == 22_528
    act = L * T * H * 2 + T * A * 2 + T * V * 4  # checkpointed layer inputs + one layer recomputed + logits & grad
    assert act == 939_524_096 + 738_197_504 + 9_957_277_696
    share = 0.25 * 24 * GIB  # vLLM share, resident all run (no sleep mode)
    total = states + act + share
    assert round(total / GIB, 2) == 25.72
    kv_per_token = 2 * L * kv * hd * 2
    assert kv_per_token == 114_688  # 112 KiB
    seqs = (share - 2 * params) / (4096 * kv_per_token)  # sequences vLLM holds at full length after its bf16 weights

    params_file = tmp_path / "hand.yaml"
    params_file.write_text(yaml.safe_dump({
        "base_model": "Qwen/Qwen3-0.6B", "gpu_memory_gib": 24.0,
        "rubric_rl": {"reward": "format", "num_generations": 8, "prompts_per_step": 2, "micro_batch_size": 4,
                      "max_completion_length": 3072, "gradient_checkpointing": True, "use_vllm": True,
                      "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.25, "vllm_max_model_length": 4096},
        "rc_rl": {"micro_batch_size": 1}}))  # keeps stage 4 small, so stage 3 is the largest
    plan = P.make_plan(params_file, prompt_tokens=1024)
    rl = next(s for s in plan.stages if s.stage == "rubric_rl")
    info = P.model_info("Qwen/Qwen3-0.6B")
    assert info.params == params and info.kv_bytes_per_token() == kv_per_token
    assert rl.memory["weights"] == 4 * params and rl.memory["optimizer"] == 8 * params
    assert rl.total == pytest.approx(total)
    assert plan.fits(rl) == "NO"
    assert f"-> {seqs:.1f} sequences" in "\n".join(rl.notes) and f"{seqs:.1f}" == "11.2"
    assert dict(rl.lines)["batch"].endswith("4 per device per forward, 4 accumulation steps over 1 process(es)")
    assert main(["plan", str(params_file)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert "  - rubric_rl: estimated 25.7 GiB per device > 24 GiB GPU" in out
    assert out[-1] == "largest per-device estimate: 25.7 GiB (rubric_rl)"


def test_zero_and_lora_layouts():
    reg3 = P.Regime("zero3", 8)
    st = P.training_state(1_000, 0, reg3, 4)
    assert (st["weights"], st["grads"], st["optimizer"]) == (2_000 / 8, 2_000 / 8, 12_000 / 8)
    st = P.training_state(1_000, 0, P.Regime("zero2", 1, offload_optimizer=True), 4)
    assert (st["weights"], st["grads"], st["optimizer"], st["host"]) == (2_000, 2_000, 0.0, 12_000)
    st = P.training_state(1_000, 10, P.Regime("single", 1), 4)  # LoRA: 10 adapter params train
    assert (st["weights"], st["grads"], st["optimizer"]) == (4 * 1_000 + 4 * 10, 40, 80)
