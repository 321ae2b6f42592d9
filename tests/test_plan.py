"""`python -m qedlib plan`: every shipped params file plans offline, and one plan matches a hand calculation."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qedlib.tools import plan as P
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
    assert plan.inert == [] and plan.no_effect == []
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
    # gpu-1's SFT with fp32 masters in the GPU (no FSDP CPU offload) does not fit one 80 GB GPU at 32k tokens;
    # at 16k it does.
    no_offload = ["--set", "sft.launch.accelerate_config=null", "--set", "sft.weights_dtype=auto"]
    assert main(["plan", str(REPO / "params" / "gpu-1.yaml"), *no_offload]) == 1
    assert "sft: estimated" in capsys.readouterr().out
    assert main(["plan", str(REPO / "params" / "gpu-1.yaml"), *no_offload, "--set", "sft.max_length=16384"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2:] == [
        "plan OK", "largest per-device estimate: 74.6 GiB (sft)"]  # 73.8 + 0.75 GiB CUDA context


def test_inert_key_fails_the_plan(monkeypatch, capsys):
    import qedlib.tools.params_check
    monkeypatch.setattr(qedlib.tools.params_check, "inert_keys", lambda tree: ["rc_rl.not_read_anywhere"])
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
    context = 0.75 * GIB  # CUDA context of the training process (one process in the kernel: no buffers)
    total = states + act + share + context
    assert round(total / GIB, 2) == 26.47
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
    assert "  - rubric_rl: estimated 26.5 GiB per device > 24 GiB GPU" in out
    assert out[-1] == "largest per-device estimate: 26.5 GiB (rubric_rl)"


def test_zero_and_lora_layouts():
    reg3 = P.Regime("zero3", 8)
    st = P.training_state(1_000, 0, reg3, 4)
    assert (st["weights"], st["grads"], st["optimizer"]) == (2_000 / 8, 2_000 / 8, 12_000 / 8)
    st = P.training_state(1_000, 0, P.Regime("zero2", 1, offload_optimizer=True), 4)
    # host: fp32 master + m + v (12 B) and the fp32 gradient partition (4 B)
    assert (st["weights"], st["grads"], st["optimizer"], st["host"]) == (2_000, 2_000, 0.0, 16_000)
    st = P.training_state(1_000, 10, P.Regime("single", 1), 4)  # LoRA: 10 adapter params train
    assert (st["weights"], st["grads"], st["optimizer"]) == (4 * 1_000 + 4 * 10, 40, 80)


def test_fsdp_cpu_offload_keeps_fp32_state_on_the_host():
    reg = P.regime(load_launch("fsdp-offload"))
    assert (reg.name, reg.offload_params) == ("fsdp", True) and "offloaded to CPU" in reg.describe
    st = P.training_state(1_000, 0, reg, 4, unit_params=100)
    assert (st["host"], st["weights"], st["grads"], st["optimizer"]) == (16_000, 200, 400, 0.0)
    assert P.regime(load_launch("fsdp")).offload_params is False


def load_launch(name: str):
    from qedlib.config import Launch
    return Launch(num_processes=1, accelerate_config=name)


def test_plan_counts_cuda_context_and_communication_buffers():
    info = P.model_info("Qwen/Qwen3-4B-Thinking-2507")
    block = P.block_params(info)
    assert block == (info.params - info.vocab * info.hidden) // info.layers  # tied head: one embedding matrix
    zero2, how = P.comm_buffers(info, P.Regime("zero2", 8))
    assert zero2 == 2 * 5e8 * 2 and "ZeRO-2" in how
    fsdp, _ = P.comm_buffers(info, P.Regime("fsdp", 1, True, True))
    assert fsdp == block * 10.0
    plan = P.make_plan(REPO / "params" / "gpu-1.yaml")
    sft = next(s for s in plan.stages if s.stage == "sft")
    assert sft.memory["CUDA context"] == 0.75 * GIB and sft.memory["communication buffers"] == fsdp
    assert any("host RAM for offloaded state: 59.9 GiB" in n for n in sft.notes)  # 16 B x 4.02 B params


def test_gpu_card_is_planned_in_the_gib_torch_reports(tmp_path):
    plan = P.make_plan(REPO / "params" / "gpu-1.yaml")
    assert plan.gpu_gib == P.USABLE_GIB["H100-80GB"] == 79.19
    bad = tmp_path / "card.yaml"
    bad.write_text(yaml.safe_dump({"gpu": "H100-96GB"}))
    with pytest.raises(P.PlanError, match="gpu: 'H100-96GB' is not in plan.USABLE_GIB.*gpu_memory_gib"):
        P.make_plan(bad)
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"gpu": "H100-80GB", "gpu_memory_gib": 70.0}))
    assert P.make_plan(both).gpu_gib == 70.0


def test_keys_without_effect_in_the_mode_set_fail_the_plan(tmp_path, capsys):
    from qedlib.tools.params_check import no_effect_keys
    params = tmp_path / "modes.yaml"
    params.write_text(yaml.safe_dump({
        "rubric_rl": {"use_vllm": True, "vllm_mode": "server", "vllm_max_model_length": 8192},
        "rc_rl": {"use_vllm": True, "rollout_batch_size": 64}}))
    assert [k for k, _ in no_effect_keys(params)] == ["rubric_rl.vllm_max_model_length", "rc_rl.rollout_batch_size"]
    assert main(["plan", str(params)]) == 1
    out = capsys.readouterr().out
    assert "params key rc_rl.rollout_batch_size has no effect here: use_vllm: true generates with vLLM" in out
    assert "rubric_rl.vllm_max_model_length has no effect here: vllm_mode: server" in out
    fine = tmp_path / "fine.yaml"  # the same keys where their mode uses them
    fine.write_text(yaml.safe_dump({"rubric_rl": {"use_vllm": True, "vllm_mode": "colocate",
                                                  "vllm_max_model_length": 8192},
                                    "rc_rl": {"use_vllm": False, "rollout_batch_size": 64}}))
    assert no_effect_keys(fine) == []

