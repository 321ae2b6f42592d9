"""The RL objective as the params label it, checked on TRL's real code paths with the tiny model:
fp32 master weights, the entropy bonus aggregated like the policy term, the PPO ratio against the
sampler's logprobs, and RC-RL driven through a fake vLLM engine that returns vLLM's shapes."""
from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest
import torch

from qedlib.config import RLConfig
from qedlib.grpo import RewardFunction, grpo_args, make_trainer, problem_prompts, train_on_problems


def _trainer(tiny_model_path, problems, tmp_path, rl, rollout="single"):
    from transformers import AutoTokenizer
    from qedlib.grpo import SingleTurnRollout
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ds = problem_prompts(tok, problems, thinking=False)
    fn = RewardFunction("format", {p.id: p for p in problems}, False, max_tokens=rl.max_completion_length)
    args = grpo_args(rl, tmp_path, 0, 1, "cpu")
    return make_trainer(rl, tiny_model_path, ds, [fn], args,
                        rollout_func=SingleTurnRollout(rl, False) if rollout == "single" else rollout)


def test_one_step_at_lr_1e6_moves_most_weights_by_an_fp32_adam_step(tiny_model_path, shipped_problems, tmp_path):
    from transformers import AutoModelForCausalLM
    emb = AutoModelForCausalLM.from_pretrained(tiny_model_path).get_input_embeddings().weight[:, 0]
    good = set((emb > emb.median()).nonzero().flatten().tolist())

    def aligned(completion_ids, **kw):  # a reward with spread inside every group, so advantages are non-zero
        return [sum(t in good for t in ids) / max(len(ids), 1) for ids in completion_ids]

    rl = RLConfig(num_generations=8, prompts_per_step=2, max_steps=1, max_completion_length=8, lr=1.0e-6,
                  weight_decay=0.0, temperature=1.0, reward="format", save_steps=1000)
    init = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model_path).named_parameters()}
    _, trainer = train_on_problems(rl, tiny_model_path, shipped_problems[:2], tmp_path, thinking=False,
                                   extra_rewards=[aligned], reward_weights=[0.0, 1.0], training_device="cpu")
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights (bf16 autocast computes)
    deltas = torch.cat([(p.detach() - init[n]).flatten() for n, p in model.named_parameters()])
    changed = deltas != 0
    assert changed.float().mean() > 0.9, changed.float().mean()
    # AdamW's first step moves each weight by lr * g / (|g| + eps): ~lr wherever |g| >> eps
    ratio = (deltas[changed].abs() / rl.lr).median()
    assert 0.5 < ratio <= 1.0 + 1e-3, ratio
    # the same update applied to bf16 weights rounds away almost everywhere (why fp32 masters)
    w = init["model.layers.0.mlp.up_proj.weight"]
    assert ((w.bfloat16() - 1e-6).float() != w.bfloat16().float()).float().mean() < 0.05


def _batch(trainer, lengths, prompt_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C = len(lengths), max(lengths)
    vocab = trainer.model.config.vocab_size
    completion_mask = torch.tensor([[1] * n + [0] * (C - n) for n in lengths])
    return {"prompt_ids": torch.randint(0, vocab, (B, prompt_len), generator=g),
            "prompt_mask": torch.ones(B, prompt_len, dtype=torch.long),
            "completion_ids": torch.randint(0, vocab, (B, C), generator=g), "completion_mask": completion_mask,
            "advantages": torch.zeros(B), "num_items_in_batch": completion_mask.sum()}


def _token_entropies(model, batch, temperature):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    C = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=att).logits[:, -C - 1:-1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def test_entropy_bonus_is_aggregated_like_the_policy_term(tiny_model_path, shipped_problems, tmp_path):
    """With zero advantages only the bonus is left. `policy` weighting must give the value
    -coef * (H * mask).sum(-1).mean() (luspo: token sum / sequences), TRL's `token_mean` gives
    -coef * mean token entropy, and their gradients differ by exactly tokens / sequences."""
    rl = RLConfig(num_generations=2, prompts_per_step=2, max_completion_length=16, entropy_coef=0.1,
                  temperature=0.8)
    trainer = _trainer(tiny_model_path, shipped_problems[:2], tmp_path, rl)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = _batch(trainer, [3, 12, 7, 16])
    params = list(trainer.model.parameters())
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    runs = {}
    for weighting in ("policy", "token_mean"):
        trainer.qed_rl = replace(rl, entropy_weighting=weighting)
        loss = trainer._compute_loss(trainer.model, batch)
        runs[weighting] = (loss.detach(), flat(torch.autograd.grad(loss, params)))
        assert trainer.entropy_coef == 0.1  # the per-batch rescaling does not leak
    with trainer.accelerator.autocast():  # TRL's forward runs under the trainer's autocast (bf16 here)
        H = _token_entropies(trainer.model, batch, 0.8).detach()
    m = batch["completion_mask"]
    assert runs["policy"][0].item() == pytest.approx((-0.1 * (H * m).sum(-1).mean()).item(), rel=1e-3)
    assert runs["token_mean"][0].item() == pytest.approx((-0.1 * (H * m).sum() / m.sum()).item(), rel=1e-3)
    factor = m.sum().item() / m.size(0)  # 38 tokens / 4 sequences
    gp, gt = runs["policy"][1], factor * runs["token_mean"][1]
    assert ((gp - gt).norm() / gt.norm()).item() < 1e-2  # equal up to bf16 autocast rounding (0.3% measured)


def test_ppo_ratio_uses_the_samplers_logprobs(tiny_model_path, shipped_problems, tmp_path):
    from qedlib.grpo import SingleTurnRollout
    rl = RLConfig(num_generations=2, prompts_per_step=2, max_completion_length=6, max_steps=1, temperature=1.0)
    seen = {}

    class ShiftedSampler(SingleTurnRollout):
        """The sampler's logprobs, 0.25 lower: as if sampled by a slightly older policy."""
        def __call__(self, prompts, trainer):
            out = super().__call__(prompts, trainer)
            out["logprobs"] = [[x - 0.25 for x in lp] for lp in out["logprobs"]]
            seen["logprobs"] = out["logprobs"]
            return out

    trainer = _trainer(tiny_model_path, shipped_problems[:2], tmp_path, rl, ShiftedSampler(rl, False))
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(2)]
    out = trainer._generate_and_score_completions(rows)
    old = out["old_per_token_logps"]
    mask = out["completion_mask"].bool()
    sampler = [x for lp in seen["logprobs"] for x in lp]
    assert sorted(old[mask].tolist()) == pytest.approx(sorted(sampler), abs=1e-5)
    # and the trainer's own logprobs are ~0.25 above them: the ratio the clip sees is exp(0.25), not 1
    from qedlib.grpo import SingleTurnRollout as _S  # noqa: F401
    trainer.model.eval()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, out["completion_ids"].size(1))
    gap = (logps - old)[mask]
    assert gap.mean().item() == pytest.approx(0.25, abs=0.02)

    def no_logprobs(prompts, trainer):
        res = ShiftedSampler(rl, False)(prompts, trainer)
        return {**res, "logprobs": None}
    trainer.rollout_func = no_logprobs
    with pytest.raises(ValueError, match="sampler's per-token logprobs"):
        trainer._generate_and_score_completions(rows)


# ---------------------------------------------------------------- a fake vLLM engine with vLLM's output shapes
class _Logprob:
    def __init__(self, logprob):
        self.logprob, self.rank, self.decoded_token = logprob, 1, None


class _CompletionOutput:
    def __init__(self, index, text, token_ids, logprobs, finish_reason):
        self.index, self.text, self.token_ids = index, text, token_ids
        self.logprobs, self.finish_reason, self.cumulative_logprob = logprobs, finish_reason, None


class _RequestOutput:
    def __init__(self, prompt, prompt_token_ids, outputs):
        self.prompt, self.prompt_token_ids, self.outputs = prompt, prompt_token_ids, outputs


class _SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, logprobs=None, **kw):
        self.n, self.temperature, self.top_p, self.max_tokens, self.logprobs = n, temperature, top_p, max_tokens, logprobs



def train_capturing_loss_inputs(trainer) -> dict:
    """Train, keeping the inputs TRL's real `_compute_loss` saw on the last step."""
    captured = {}
    original = trainer._compute_loss

    def spy(model, inputs):
        captured.update(inputs)
        return original(model, inputs)
    trainer._compute_loss = spy
    trainer.train()
    return captured

class FakeLLM:
    """vllm.LLM's generate(): real completions from a transformers model, returned as RequestOutputs
    (token ids, one {token_id: Logprob} dict per generated token when logprobs=0)."""

    def __init__(self, model, tokenizer):
        from qedlib.config import Endpoint
        from qedlib.generation import TransformersGenerator
        self.gen = TransformersGenerator(Endpoint(batch_size=16), model=model, tokenizer=tokenizer)
        self.calls = []

    def generate(self, texts, sp, use_tqdm=False):
        from qedlib.config import Sampling
        self.calls.append((len(texts), sp.n, sp.max_tokens, sp.logprobs))
        groups = self.gen.generate_text(texts, Sampling(temperature=sp.temperature, top_p=sp.top_p,
                                                        max_new_tokens=sp.max_tokens, n=sp.n),
                                        logprobs=sp.logprobs is not None)
        outs = []
        for t, group in zip(texts, groups):
            ids = self.gen.tokenizer(t, add_special_tokens=False)["input_ids"]
            outs.append(_RequestOutput(t, ids, [_CompletionOutput(
                k, c.text, list(c.token_ids),
                None if sp.logprobs is None else [{tok: _Logprob(lp)} for tok, lp in zip(c.token_ids, c.token_logprobs)],
                c.finish_reason) for k, c in enumerate(group)]))
        return outs


def test_rc_rl_on_a_fake_colocated_vllm_engine_runs_trls_loss_with_sampler_logprobs(
        tiny_model_path, shipped_problems, tmp_path, monkeypatch):
    """RC-RL with use_vllm/colocate: the RC turns and rollouts go to the engine, its per-token logprobs
    (vLLM's list-of-dicts shape) reach TRL's loss as the PPO ratio's denominator, one step trains."""
    from qedlib.config import RCSettings, Sampling
    from qedlib.stages.rc_rl import RCRollout, problem_slots
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=_SamplingParams))
    rl = RLConfig(num_generations=2, prompts_per_step=2, max_steps=1, max_completion_length=6, temperature=1.0,
                  reward="format", save_steps=1000)
    rl = replace(__import__("qedlib.config", fromlist=["RCRLConfig"]).RCRLConfig(**vars(rl)), states_per_trajectory=1,
                 rc=RCSettings(turns=1, reasoning_budget=6, summary=Sampling(temperature=0.7, max_new_tokens=4)))
    probs = shipped_problems[:2]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ds = problem_slots(tok, probs, 1, False)
    rollout = RCRollout(rl, {p.id: p for p in probs}, False, None, None, 0)
    rollout.prompt_to_id = {row["prompt"]: row["problem_id"] for row in ds}
    fn = RewardFunction("format", {p.id: p for p in probs}, False, max_tokens=6)
    trainer = make_trainer(rl, tiny_model_path, ds, [fn], grpo_args(replace(rl, shuffle=False), tmp_path, 0, 1, "cpu"),
                           rollout_func=rollout)
    llm = FakeLLM(trainer.model, tok)
    synced = []
    trainer.use_vllm = True  # as TRL sets it up on a GPU, with the engine replaced by the fake
    trainer.vllm_importance_sampling_correction = False
    trainer._last_loaded_step = -1  # TRL sets this when it builds its engine
    trainer.vllm_generation = types.SimpleNamespace(mode="colocate", llm=llm, enable_sleep_mode=False,
                                                    sync_weights=lambda: synced.append(1))
    captured = train_capturing_loss_inputs(trainer)
    assert trainer.state.global_step == 1 and synced
    assert all(c[3] == 0 for c in llm.calls[-1:])  # the final rollouts asked vLLM for logprobs=0
    assert captured["old_per_token_logps"].shape == captured["completion_ids"].shape
    assert torch.isfinite(captured["old_per_token_logps"]).all()


class FakeTRLVLLMGeneration:
    """TRL's VLLMGeneration.generate() shapes: (prompt_ids, completion_ids, logprobs (B, T, 1), token ids)."""

    def __init__(self, model, tokenizer, temperature):
        from qedlib.config import Endpoint
        from qedlib.generation import TransformersGenerator
        self.gen = TransformersGenerator(Endpoint(batch_size=16), model=model, tokenizer=tokenizer)
        self.temperature, self.mode, self.enable_sleep_mode, self.synced = temperature, "colocate", False, 0

    def sync_weights(self):
        self.synced += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        from qedlib.config import Sampling
        texts = [self.gen.tokenizer.decode(p) for p in prompts[::num_generations]]
        groups = self.gen.generate_text(texts, Sampling(temperature=self.temperature, max_new_tokens=6,
                                                        n=num_generations), logprobs=True)
        comps = [c for g in groups for c in g]
        return (prompts, [c.token_ids for c in comps], [[[lp] for lp in c.token_logprobs] for c in comps],
                [[[t] for t in c.token_ids] for c in comps])


def test_rubric_rl_on_trls_own_vllm_path_trains_with_sampler_logprobs(tiny_model_path, shipped_problems, tmp_path):
    """use_vllm without a rollout function: TRL's _generate_single_turn takes the engine's (B, T, 1)
    logprobs; with ratio_logprobs: sampler they become the ratio's denominator, and a step trains."""
    rl = RLConfig(num_generations=2, prompts_per_step=2, max_steps=1, max_completion_length=6, temperature=1.0,
                  save_steps=1000)
    trainer = _trainer(tiny_model_path, shipped_problems[:2], tmp_path, rl, rollout=None)
    fake = FakeTRLVLLMGeneration(trainer.model, trainer.processing_class, 1.0)
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, fake, -1
    trainer.vllm_importance_sampling_correction = False
    captured = train_capturing_loss_inputs(trainer)
    assert trainer.state.global_step == 1 and fake.synced == 1
    old, mask = captured["old_per_token_logps"], captured["completion_mask"].bool()
    assert torch.isfinite(old).all() and (old[mask] < 0).all()  # real log-probabilities, not zeros or None
