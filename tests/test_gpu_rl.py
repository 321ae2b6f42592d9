"""The GPU RL path's parts that a CPU can execute: the official gradient scale on 2 gloo processes x 2
accumulation steps against a hand computation, the clipped-step record, vLLM server mode (address from
the environment, the logprob probe against a real local server), the summariser's thinking budget check,
notebook 04's engine closed before training, and the paper values read from the official configs."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from qedlib.config import RCSettings, RLConfig, Sampling, load_config
from qedlib.launch import accelerate_config_path, free_port
from qedlib.reasoning_cache import check_summariser
from qedlib.grpo import (clipped, grpo_args, probe_vllm_server, summarise_steps, train_on_problems,
                       vllm_server_address)

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- the official gradient scale
WORKER = r'''
import json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, TrainerCallback
from qedlib import models
from qedlib.config import RLConfig
from qedlib.problem_sets import load_problems
from qedlib.grpo import RewardFunction, SingleTurnRollout, grpo_args, make_trainer, problem_prompts, step_metrics

model_path, out = sys.argv[1], Path(sys.argv[2])
rl = RLConfig(num_generations=2, prompts_per_step=2, micro_batch_size=1, max_steps=1, max_completion_length=6,
              temperature=1.0, entropy_coef=0.1, max_grad_norm=1.0e9, reward="format", save_steps=1000, shuffle=False)
problems = load_problems("shipped", split="train")[:2]
tok = AutoTokenizer.from_pretrained(model_path)
fn = RewardFunction("format", {p.id: p for p in problems}, False, max_tokens=6)

def token_sum(completion_ids, **kw):  # a reward with spread inside groups: non-zero advantages
    return [float(sum(ids) % 5) for ids in completion_ids]

models.cpu_has_bf16 = lambda: False  # fp32 throughout (no CPU bf16 autocast): the comparison is exact to rounding
args = grpo_args(rl, out / "ck", 0, None, "cpu")
args.reward_weights = [0.0, 1.0]
trainer = make_trainer(rl, model_path, problem_prompts(tok, problems, False), [fn, token_sum], args,
                       rollout_func=SingleTurnRollout(rl, False))
seen, grads = [], {}
original = trainer._compute_loss
def spy(model, inputs):
    seen.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
    return original(model, inputs)
trainer._compute_loss = spy

class Grad(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, **kw):
        model = trainer.accelerator.unwrap_model(trainer.model)
        grads["g"] = torch.cat([p.grad.detach().flatten() for p in model.parameters()])
trainer.add_callback(Grad())
trainer.train()
rank = trainer.accelerator.process_index
torch.save({"inputs": seen, "grad": grads["g"], "divisor": trainer.loss_divisor,
            "accum": args.gradient_accumulation_steps, "world": trainer.accelerator.num_processes,
            "rows": step_metrics(trainer, fn)}, out / f"rank{rank}.pt")
'''


def _hand_loss(model, batch, coef: float, epsilon: float, temperature: float):
    """One micro-batch's token sum of the PPO-clip term minus coef x entropy (before any normalisation)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    C = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=att).logits[:, -C - 1:-1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - batch["old_per_token_logps"])
    adv = batch["advantages"].unsqueeze(1)
    policy = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    return ((policy - coef * entropy) * batch["completion_mask"]).sum()


def test_gradient_of_2_processes_x_2_accumulation_steps_is_the_official_scale(tiny_model_path, tmp_path):
    """Two gloo processes, each two micro-batches of one sequence: the all-reduced gradient must equal the
    hand gradient of sum over all tokens / (sequences per step N=4 x processes x accumulation steps D=4),
    the official trainer's scale (TRL's luspo alone would give 4x this)."""
    from transformers import AutoModelForCausalLM
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_path("cpu-gloo")),
           "--num_processes", "2", "--main_process_port", str(free_port()), str(script), tiny_model_path, str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [(r["world"], r["accum"], r["divisor"]) for r in ranks] == [(2, 2, 4), (2, 2, 4)]
    micro = [b for r in ranks for b in r["inputs"]]
    assert len(micro) == 4 and all(b["completion_ids"].size(0) == 1 for b in micro)
    assert any(b["advantages"].abs().sum() > 0 for b in micro)  # the policy term is exercised, not only entropy
    torch.testing.assert_close(ranks[0]["grad"], ranks[1]["grad"])  # DDP averaged them
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    total = sum(_hand_loss(model, b, 0.1, 4.0, 1.0) for b in micro) / (4 * 4)
    hand = torch.cat([g.flatten() for g in torch.autograd.grad(total, list(model.parameters()))])
    rel = ((ranks[0]["grad"] - hand).norm() / hand.norm()).item()
    assert rel < 1e-4, rel
    # and it was recorded as not clipped (max_grad_norm 1e9), with the norm the trainer logged
    row = ranks[0]["rows"][0]
    assert row["clipped"] is False and row["grad_norm"] == pytest.approx(hand.norm().item(), rel=1e-3)


def test_clipped_steps_are_recorded(tiny_model_path, shipped_problems, tmp_path):
    rl = RLConfig(num_generations=2, prompts_per_step=2, max_steps=2, max_completion_length=6, temperature=1.0,
                  entropy_coef=0.1, max_grad_norm=1.0e-6, reward="format", save_steps=1000)
    rows, trainer = train_on_problems(rl, tiny_model_path, shipped_problems[:2], tmp_path, thinking=False,
                                      training_device="cpu")
    assert [r["clipped"] for r in rows] == [True, True]  # the entropy bonus alone exceeds a 1e-6 norm
    assert summarise_steps(rows)["clip_frac"] == 1.0 and trainer.loss_divisor == 1  # one process, one micro-batch
    assert clipped(0.2, 0.3) is False and clipped(None, 0.3) is None and clipped(0.5, 0.0) is None


def test_loss_divisor_is_only_for_the_luspo_aggregation(tmp_path):
    with pytest.raises(ValueError, match="loss_divisor: 64 is the official trainer's scale"):
        grpo_args(RLConfig(loss_type="dr_grpo", loss_divisor=64), tmp_path, 0, 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        grpo_args(RLConfig(loss_divisor=0), tmp_path, 0, 1)


# ---------------------------------------------------------------- vLLM server mode
class FakeVLLMServer:
    """A vLLM-like OpenAI server on loopback: /v1/models, /server_info (logprobs_mode) and /v1/completions,
    whose completion carries per-token logprobs or not."""

    def __init__(self, logprobs_mode="processed_logprobs", logprobs=True, dev_endpoints=True):
        owner = self
        self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                owner.requests.append(self.path)
                if self.path.startswith("/v1/models"):
                    self._send(200, {"data": [{"id": "policy"}]})
                elif self.path.startswith("/server_info") and dev_endpoints:
                    self._send(200, {"vllm_config": {"model_config": {"logprobs_mode": logprobs_mode}}})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((self.path, body))
                lp = {"tokens": ["token_id:17", "token_id:4"], "token_logprobs": [-0.7, -1.2],
                      "top_logprobs": [None, None]} if logprobs else None
                self._send(200, {"choices": [{"text": " 2", "token_ids": [17, 4], "prompt_token_ids": [1, 2],
                                              "logprobs": lp, "finish_reason": "length"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("kind, error", [
    ("ok", None),
    ("raw", "logprobs_mode 'raw_logprobs'"),
    ("none", "returned no per-token logprobs"),
    ("plain", "HTTP 404"),
])
def test_server_probe_needs_processed_per_token_logprobs(kind, error):
    server = FakeVLLMServer(logprobs_mode="raw_logprobs" if kind == "raw" else "processed_logprobs",
                            logprobs=kind != "none", dev_endpoints=kind != "plain")
    try:
        if error is None:
            assert probe_vllm_server("127.0.0.1", server.port, timeout=10) == "policy"
            path, body = server.requests[-1]
            assert path == "/v1/completions" and body["logprobs"] == 0 and body["model"] == "policy"
        else:
            with pytest.raises(ValueError, match=error) as err:
                probe_vllm_server("127.0.0.1", server.port, timeout=10)
            assert "trl vllm-serve" in str(err.value) and "ratio_logprobs" in str(err.value)
    finally:
        server.close()
    with pytest.raises(ValueError, match="cannot be reached"):
        probe_vllm_server("127.0.0.1", free_port(), timeout=5)


def test_server_address_comes_from_the_named_environment_variables(tmp_path, monkeypatch):
    rl = RLConfig(use_vllm=True, vllm_mode="server", vllm_server_host_env="QED_TEST_VLLM_HOST",
                  vllm_server_port_env="QED_TEST_VLLM_PORT")
    monkeypatch.delenv("QED_TEST_VLLM_HOST", raising=False)
    monkeypatch.delenv("QED_TEST_VLLM_PORT", raising=False)
    with pytest.raises(ValueError, match="rubric_rl.vllm_server_host_env names QED_TEST_VLLM_HOST, which is not set"):
        vllm_server_address(rl, "rubric_rl")
    monkeypatch.setenv("QED_TEST_VLLM_HOST", "10.1.2.3")
    monkeypatch.setenv("QED_TEST_VLLM_PORT", "http")
    with pytest.raises(ValueError, match="not a port number"):
        vllm_server_address(rl)
    monkeypatch.setenv("QED_TEST_VLLM_PORT", "8123")
    args = grpo_args(rl, tmp_path, 0, 1)
    assert (args.vllm_server_host, args.vllm_server_port) == ("10.1.2.3", 8123)
    with pytest.raises(ValueError, match="vllm_max_model_length: 12288 has no effect in server mode"):
        grpo_args(replace(rl, vllm_max_model_length=12288), tmp_path, 0, 1)


def test_make_trainer_probes_the_server_before_training(tiny_model_path, shipped_problems, tmp_path, monkeypatch):
    """Server mode with ratio_logprobs: sampler stops at start with the probe's message, before TRL waits on it."""
    from transformers import AutoTokenizer
    from qedlib.grpo import RewardFunction, make_trainer, problem_prompts
    server = FakeVLLMServer(logprobs=False)
    monkeypatch.setenv("QED_TEST_VLLM_PORT", str(server.port))
    rl = RLConfig(use_vllm=True, vllm_mode="server", vllm_server_port_env="QED_TEST_VLLM_PORT", reward="format")
    try:
        args = grpo_args(rl, tmp_path, 0, 1, "cpu")
        ds = problem_prompts(AutoTokenizer.from_pretrained(tiny_model_path), shipped_problems[:2], False)
        fn = RewardFunction("format", {p.id: p for p in shipped_problems[:2]}, False)
        with pytest.raises(ValueError, match="returned no per-token logprobs"):
            make_trainer(rl, tiny_model_path, ds, [fn], args)
    finally:
        server.close()


# ---------------------------------------------------------------- RC on one GPU
def test_a_thinking_summariser_needs_a_thinking_budget():
    thinking_policy = RCSettings(summariser="policy")
    with pytest.raises(ValueError, match="rc_rl.rc.summary_thinking_budget"):
        check_summariser(thinking_policy, True, "rc_rl.rc")
    check_summariser(replace(thinking_policy, summary_thinking_budget=4096), True, "rc_rl.rc")
    check_summariser(replace(thinking_policy, summary_thinking=False), True, "rc_rl.rc")  # template allows it off
    check_summariser(thinking_policy, False, "rc_rl.rc")  # a non-thinking policy summarises without thinking
    check_summariser(RCSettings(summariser="frozen"), True, "rc_rl.rc")  # decided by its template at run time
    with pytest.raises(ValueError, match="eval.rc"):
        check_summariser(RCSettings(summariser="frozen", summary_thinking=True), True, "eval.rc")


def test_plan_refuses_gpu1_with_no_summary_thinking_budget(monkeypatch):
    from qedlib.tools.plan import make_plan
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = make_plan(REPO / "params" / "gpu-1.yaml", {"rc_rl.rc.summary_thinking_budget": 0})
    assert any(r.startswith("rc_rl.rc: the policy summariser reasons in <think>") for r in plan.reasons)
    assert [s.stage for s in plan.stages if plan.fits(s) == "NO"] == ["rc_rl"]
    cfg = load_config(REPO / "params" / "gpu-1.yaml")
    for rc in (cfg.rc_rl.rc, cfg.eval.rc):
        assert rc.summariser == "policy" and rc.summary_thinking and rc.summary_thinking_budget > 0


class FakeEngine:
    """A generator standing in for the kernel's vLLM engine: records generate and close in `events`."""

    def __init__(self, events, fail=False):
        self.events, self.fail, self.tokenizer = events, fail, None

    def generate(self, prompts, sampling, thinking=True):
        if self.fail:
            raise RuntimeError("engine died")
        self.events.append("generate")
        out = types.SimpleNamespace(reasoning="r", text="r", final="Proof. Done.", think_closed=True,
                                    finish_reason="stop", prompt_tokens=3, completion_tokens=2)
        return [[out] for _ in prompts]

    def close(self):
        self.events.append("close")


def test_notebook_04_closes_the_inspection_engine_before_training_starts(tiny_model_path, shipped_problems,
                                                                         monkeypatch, tmp_path):
    from qedlib import generation
    from qedlib.stages import rc_rl
    cfg = load_config(REPO / "params" / "smoke.yaml")
    closed = []
    monkeypatch.setattr(rc_rl, "close_generator",
                        lambda g: closed.append(type(g).__name__) or generation.close_generator(g))
    real = rc_rl.inspect_trajectories(cfg, tiny_model_path, shipped_problems[:1])  # the real generator, once
    assert len(real) == cfg.rc_rl.rc.turns and closed == ["TransformersGenerator"]
    events = []
    monkeypatch.setattr(rc_rl, "make_generator", lambda endpoint: FakeEngine(events))
    monkeypatch.setattr(rc_rl, "train", lambda *a, **kw: events.append("train") or {})
    rows = rc_rl.inspect_trajectories(cfg, tiny_model_path, shipped_problems[:1])
    rc_rl.run_stage(cfg, tmp_path, "params/smoke.yaml", {})  # smoke.yaml trains in this process: the stage's train
    assert len(rows) == cfg.rc_rl.rc.turns and events[-2:] == ["close", "train"] and events.count("close") == 1
    # closed on an error too, and the notebook inspects before it trains
    events.clear()
    monkeypatch.setattr(rc_rl, "make_generator", lambda endpoint: FakeEngine(events, fail=True))
    with pytest.raises(RuntimeError, match="engine died"):
        rc_rl.inspect_trajectories(cfg, tiny_model_path, shipped_problems[:1])
    assert events == ["close"]
    cells = ["".join(c["source"]) for c in json.loads((REPO / "notebooks" / "04_reasoning_cache_rl.ipynb").read_text())
             ["cells"] if c["cell_type"] == "code"]
    first_inspect = next(i for i, c in enumerate(cells) if "rc_rl.inspect_trajectories(" in c)
    assert first_inspect < next(i for i, c in enumerate(cells) if "rc_rl.run_stage(" in c)


# ---------------------------------------------------------------- paper values from the official configs
def test_qed_nano_values_from_the_official_configs():
    text = (REPO / "params" / "qed-nano.yaml").read_text()
    cfg = load_config(REPO / "params" / "qed-nano.yaml")
    for rl in (cfg.rubric_rl, cfg.rc_rl):
        assert rl.judge.sampling.max_new_tokens == 81920 and rl.judge.invalid == "drop"
    assert (cfg.rubric_rl.loss_divisor, cfg.rc_rl.loss_divisor) == (64, 256)
    assert (cfg.eval.sampling.temperature, cfg.eval.sampling.top_p, cfg.eval.sampling.top_k) == (0.8, 0.95, 20)
    assert cfg.rc_rl.rc.summary == Sampling(temperature=0.7, top_p=0.8, max_new_tokens=2048, top_k=20)
    assert cfg.rubric_rl.vllm_mode == "server" and cfg.rubric_rl.vllm_max_model_length is None
    assert cfg.rubric_rl.vllm_server_host_env == "QED_VLLM_HOST"
    # every changed value names its source; `drop` is labelled as the workbook's change from the paper's zero
    assert text.count("max_output_tokens 81,920") == 1 and "top-p 0.95" in text
    assert text.count("workbook change") == 2 and "(paper: zero" in text
