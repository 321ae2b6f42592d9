"""Evidence that training changed what the policy does, not only its weights: the policy's log-probabilities on a
fixed probe set of (prompt, completion) pairs, before and after a stage.

Adam moves every weight that gets any gradient by about lr per step, whatever the reward, so "the weights changed"
shows nothing. `policy_shift` scores the same completions under the starting and the trained model: the mean
per-token log-probability of each completion under each, their difference with a bootstrap interval over probe
items, and the mean per-token KL(trained || start) over the completions' positions (how far the next-token
distributions moved where it matters). Both models are loaded one after the other on the CPU in float32.
"""
from __future__ import annotations

from typing import Sequence

from .models import resolve_model
from .stats import learning_gain


def completion_scores(model_ref: str, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[float], list]:
    """Per item: the mean log-probability per completion token given its prompt, and the completion positions'
    log-softmax rows (for the KL). `prompts` are full prompt strings (chat template already applied)."""
    import torch  # heavy: loads only when a probe is scored
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: as above
    path = resolve_model(model_ref)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    means, rows = [], []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            c_ids = tok(completion, add_special_tokens=False)["input_ids"]
            if not c_ids:
                raise ValueError(f"probe completion {completion[:40]!r} has no tokens")
            ids = torch.tensor([p_ids + c_ids])
            logp = torch.log_softmax(model(ids).logits[0, len(p_ids) - 1:-1].float(), dim=-1)  # predicts each c token
            means.append(float(logp.gather(1, torch.tensor(c_ids)[:, None]).mean()))
            rows.append(logp)
    del model
    return means, rows


def policy_shift(start_ref: str, trained_ref: str, prompts: Sequence[str], completions: Sequence[str],
                 n_boot: int = 2000, seed: int = 0) -> dict:
    """How the trained model's behaviour on the probe set differs from the starting model's: `logprob_start`,
    `logprob_trained` (mean per-token log-probability of the probe completions), `logprob_gain` with `ci_low` /
    `ci_high` (bootstrap over items), and `kl` = mean per-token KL(trained || start) over completion positions."""
    import torch  # heavy: loads only when a probe is scored
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"policy_shift needs as many prompts as completions, at least one ({len(prompts)} vs "
                         f"{len(completions)})")
    start, start_rows = completion_scores(start_ref, prompts, completions)
    trained, trained_rows = completion_scores(trained_ref, prompts, completions)
    kl = torch.cat([(t.exp() * (t - s)).sum(-1) for s, t in zip(start_rows, trained_rows)]).mean()
    diffs = [b - a for a, b in zip(start, trained)]
    gain = learning_gain([0.0] * len(diffs), diffs, n_boot=n_boot, seed=seed)  # interval of the mean paired change
    return {"probe_items": len(prompts), "logprob_start": sum(start) / len(start),
            "logprob_trained": sum(trained) / len(trained), "logprob_gain": gain["gain"],
            "ci_low": gain["ci_low"], "ci_high": gain["ci_high"], "kl": float(kl)}
