"""Reading a GRPO run's step records (steps.jsonl) for notebooks 03 and 04: the worked group, the findings in words,
and the judge-reward run beside the format-reward run.

A building block under both RL views (qedlib.views.rubric_rl, qedlib.views.rc_rl), which may not import each other.
"""
from __future__ import annotations

import math
from statistics import median

from .grpo import finite_mean, group_advantages, learning_record
from .stats import MIN_VERDICT_N, verdict


def worked_group(steps: list[dict]):
    """The first recorded GRPO group of a run as a table: completion excerpt, reward, advantage without and
    with std scaling (group_advantages), plus the group mean; None when no step recorded a group."""
    import pandas as pd  # heavy: a table for the notebook, loaded only when one is drawn
    row = next((r for r in steps if r.get("group")), None)
    if row is None:
        return None, None
    g = row["group"]
    plain, scaled = group_advantages(g["rewards"], "none"), group_advantages(g["rewards"], "group")
    vals = [r for r in g["rewards"] if r is not None]
    table = pd.DataFrame({"completion (excerpt)": [c.replace("\n", " ")[:120] for c in g["completions"]],
                          "reward": g["rewards"], "advantage (scale none)": plain, "advantage (scale group)": scaled})
    return table, {"step": row["step"], "problem_id": g["problem_id"], "group_mean": finite_mean(vals)}


def group_caption(info: dict) -> str:
    """One sentence about the worked group of `worked_group`: its step, problem and mean reward (or why it has none)."""
    head = f"Step {info['step']}, problem `{info['problem_id']}`: "
    if info["group_mean"] is None:
        return head + ("no rollout got a valid reward (every grade was invalid), so the group has no mean and every "
                       "advantage is 0: it teaches nothing.")
    return head + f"group mean reward {info['group_mean']:.3f}."


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def correlation(xs: list, ys: list, min_points: int = 5) -> dict | None:
    """Pearson r of the (x, y) pairs where both are known, with a 95% interval (Fisher z); None with fewer than
    `min_points` pairs (a correlation over 3 or 4 steps rests on one or two points) or no spread."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < max(min_points, 4):
        return None
    mx, my = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx, syy = sum((x - mx) ** 2 for x, _ in pairs), sum((y - my) ** 2 for _, y in pairs)
    if not sxx or not syy:
        return None
    r = max(-0.999999, min(0.999999, sxy / math.sqrt(sxx * syy)))
    z, half = math.atanh(r), 1.96 / math.sqrt(len(pairs) - 3)
    return {"r": r, "ci_low": math.tanh(z - half), "ci_high": math.tanh(z + half), "n": len(pairs)}


def learning_sentence(learning: dict | None) -> str | None:
    """The trained reward's first vs last steps in words, from metrics.json `learning` (grpo.learning_record): the
    gain with its 95% bootstrap interval over groups, called beyond noise only when the interval excludes 0 and each
    side has at least stats.MIN_VERDICT_N groups."""
    if not learning or learning.get("gain") is None or learning.get("n_first", 0) == 0:
        return None
    k, lo, hi = learning["k"], learning["ci_low"], learning["ci_high"]
    head = (f"The {learning['reward']} reward went {learning['first']:.3f} (first {k} step{'s' * (k > 1)}, "
            f"{learning['n_first']} groups) -> {learning['last']:.3f} (last {k}, {learning['n_last']} groups): gain "
            f"{learning['gain']:+.3f}, 95% interval [{lo:+.3f}, {hi:+.3f}] (bootstrap over groups)")
    if min(learning["n_first"], learning["n_last"]) < MIN_VERDICT_N:
        return head + (f"; a verdict needs at least {MIN_VERDICT_N} groups on each side, so this shows no learning "
                       "either way (more steps or prompts per step give more groups).")
    if lo > 0:
        return head + ": it rose beyond noise."
    if hi < 0:
        return head + ": it fell beyond noise."
    return head + ": the interval includes 0, so the run shows no change beyond noise" + headroom(learning) + "."


def headroom(learning: dict) -> str:
    """", which started at X of at most 1: little room to rise" when the first steps' mean reward (0-1) is at or
    above 0.75, else "": a reward at its ceiling cannot rise whatever the policy learns."""
    first = learning.get("first")
    return (f"; it started at {first:.2f} of at most 1, so there was little room to rise"
            if first is not None and first >= 0.75 else "")


def findings(steps: list[dict], metrics: dict, rl) -> str:
    """What a GRPO run's own numbers say, as Markdown bullets. Each bullet's test: **Learning** from metrics
    `learning` (rose/fell only when the bootstrap interval excludes 0); **Signal**: the reward std and all-equal
    share averaged over the steps that logged them, with their count and range; **Length**: completions that hit
    the token cap and rollouts that never closed `</think>`, counted from the steps; **Steps without signal**: steps
    whose groups were all all-equal (frac_zero_std 1), and whether the first step was one (AdamW's first update is
    lr x sign(gradient), whatever its size); **Gradient norm**: the largest
    norm beside its step's reward std and length; a correlation across steps only with >= 5 steps and its 95%
    interval, called a link only when the interval excludes 0; **Clip ratio**: TRL's count (tokens where the clip
    binds for the advantage's sign), with the bound that can bind at this epsilon; **Policy shift** from metrics
    `probe` (log-probability change with its interval, KL); never "the weights changed", which Adam guarantees."""
    out = []
    if steps and all(r.get("invalid_rate") == 1 for r in steps):
        out.append("**No reward.** In every step every rollout's grade was invalid (invalid_rate 1.0: the judge failed "
                   "or wrote no readable grade), so every advantage was 0 and the run learned nothing from the reward; "
                   "the `invalid_*` counts in steps.jsonl say why. Fix the judge and rerun the stage.")
    learned = learning_sentence(metrics.get("learning"))
    if learned:
        out.append(f"**Learning.** {learned}")
    stds = [r["reward_std"] for r in steps if _finite(r.get("reward_std"))]
    zero = finite_mean([r.get("frac_zero_std") for r in steps])
    if stds and zero is not None:
        spread = (f"{stds[0]:.3f} in the one step that logged it" if len(stds) == 1 else
                  f"{sum(stds) / len(stds):.3f} on average over {len(stds)} steps (from {min(stds):.3f} to "
                  f"{max(stds):.3f})")
        out.append(f"**Signal.** Rewards within a group differ by a std of {spread}; rewards are 0-1, and "
                   f"{zero:.0%} of groups gave all {rl.num_generations} rollouts the same reward: such a group has "
                   "advantage 0 everywhere and teaches nothing.")
    flat = [r["step"] for r in steps if r.get("frac_zero_std") == 1]
    if flat and getattr(rl, "entropy_coef", 0):
        first = flat[0] == min(r["step"] for r in steps)
        level = finite_mean([r.get("reward") for r in steps if r["step"] in flat])
        out.append(f"**Steps without signal.** In {len(flat)} of {len(steps)} steps (step{'s' * (len(flat) > 1)} "
                   f"{', '.join(map(str, flat))}"
                   + ("" if level is None else f", mean reward {level:.3f}")
                   + ") every group was all-equal, so every advantage was 0 and the update "
                   f"came from the entropy bonus alone (coefficient {rl.entropy_coef:g})."
                   + (" The first step was one of them: AdamW's first update is about lr times the sign of each "
                      "weight's gradient whatever its size (m / sqrt(v) = g / |g| at step 1), so that small gradient "
                      f"still moved the weights by about {rl.lr:g} each." if first else ""))
    capped = finite_mean([r.get("clipped_ratio") for r in steps])
    trunc = finite_mean([r.get("truncation_rate") for r in steps])
    if capped is not None or trunc is not None:
        parts = []
        if capped is not None:
            parts.append(f"{capped:.0%} of completions hit the {rl.max_completion_length:,}-token cap")
        if trunc is not None:
            parts.append(f"{trunc:.0%} never closed `</think>` (no proof: reward 0 without a grader call)")
        out.append(f"**Length.** Over the {len(steps)} steps, " + " and ".join(parts) + ".")
    norms = [r for r in steps if r.get("grad_norm") is not None]
    if norms:
        top = max(norms, key=lambda r: r["grad_norm"])
        vals = [r["grad_norm"] for r in norms]
        text = (f"**Gradient norm.** Largest {top['grad_norm']:.3g} at step {top['step']} (median {median(vals):.3g}"
                f" over {len(vals)} steps; clipped to {rl.max_grad_norm:g} before the update)")
        others = [r["reward_std"] for r in norms if r is not top and _finite(r.get("reward_std"))]
        if _finite(top.get("reward_std")) and others:
            text += (f"; at that step the reward std within groups was {top['reward_std']:.3f} (at most "
                     f"{max(others):.3f} at the other steps): under luspo the gradient is advantage-weighted token "
                     "sums, so larger reward differences give larger gradients")
        c = correlation([r["grad_norm"] for r in norms],
                        [r["reward_std"] if _finite(r.get("reward_std")) else None for r in norms])
        if c is None:
            text += (f". With {len(norms)} steps no correlation across steps is computed (it needs at least 5)")
        else:
            link = ("rises with" if c["ci_low"] > 0 else "falls with" if c["ci_high"] < 0 else
                    "shows no clear link to")
            text += (f". Across {c['n']} steps the gradient norm {link} the reward std (r = {c['r']:+.2f}, 95% "
                     f"interval [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}])")
        out.append(text + ".")
    clip = finite_mean([r.get("clip_ratio") for r in steps])
    if clip is not None:
        why = ("each batch is generated by the weights being trained (steps_per_generation 1), so the ratio "
               "policy/sampler stays near 1" if rl.steps_per_generation == 1 else
               f"each batch is reused for {rl.steps_per_generation} steps, so the policy drifts from the sampler")
        low = 1 - rl.epsilon
        bound = (f"only a ratio above {1 + rl.epsilon:g} with a positive advantage can count (1 - epsilon = {low:g} "
                 "is below any ratio)" if low <= 0 else
                 f"a ratio below {low:g} with a negative advantage or above {1 + rl.epsilon:g} with a positive one")
        out.append(f"**Clip ratio** {clip:.2%} of tokens: TRL counts the tokens where the clip binds for the sign of "
                   f"their advantage; at epsilon {rl.epsilon:g} {bound}. Here {why}.")
    probe = metrics.get("probe")
    if probe:
        lo, hi = probe["ci_low"], probe["ci_high"]
        moved = {"up": "more likely", "down": "less likely", "none": "neither more nor less likely beyond noise",
                 "few": f"more or less likely: {probe['probe_items']} items are too few for a verdict (at least "
                        f"{MIN_VERDICT_N})"}[verdict(lo, hi, probe["probe_items"])]
        out.append(f"**Policy shift.** On {probe['probe_items']} fixed completions from the run's first steps, the "
                   f"trained policy's mean log-probability per token went {probe['logprob_start']:.3f} -> "
                   f"{probe['logprob_trained']:.3f} ({probe['logprob_gain']:+.3f}, 95% interval [{lo:+.3f}, "
                   f"{hi:+.3f}]): those completions became {moved}; mean per-token KL(trained || start) "
                   f"{probe['kl']:.2g} nats.")
    return "\n".join(f"- {x}" for x in out) or "No step records to read."


def run_summary(name: str, rows: list[dict]) -> str:
    """One run's reward in words: `learning_sentence` of its `grpo.learning_record` (the numbers metrics.json keeps)
    and the share of all-equal groups; says so when it has fewer than two steps to compare."""
    sentence = learning_sentence(learning_record(rows, name))
    if sentence is None:
        return (f"The {name} run logged fewer than two steps with group rewards: no first and last steps to "
                "compare.")
    zero = finite_mean([r.get("frac_zero_std") for r in rows])
    return sentence + ("" if zero is None else f" {zero:.0%} of its groups were all-equal (no signal).")


def reward_comparison(judge_steps: list[dict], format_steps: list[dict], judge: str = "judge",
                      other: str = "format") -> str:
    """The two runs on the same trainer in words (`run_summary` of each: first vs last steps' group means, gain and
    95% interval) and what tells them apart: the `other` reward reads only the policy's own text, the judge's moves
    only as far as the judge discriminates. Its test: "rose" / "fell" only when the interval excludes 0."""
    if not format_steps:
        return f"The {other} reward logged no steps (its run was skipped). " + run_summary(judge, judge_steps)
    text = " ".join(run_summary(n, rows) for n, rows in ((other, format_steps), (judge, judge_steps)))
    rows = [r for r in format_steps if r.get("group_means")]
    learning = learning_record(format_steps, other)
    if rows and learning.get("beyond_noise") and learning["ci_low"] > 0:
        text += (f" The {other} reward reads only the policy's own text, so its group differences point at something "
                 "the policy can change, and it did; the judge's differences move only as far as the judge "
                 "discriminates.")
    elif format_steps and finite_mean([r.get("frac_zero_std") for r in format_steps]) == 1:
        text += (f" Every {other} group was all-equal: no rollout differed from its group, so that reward gave the "
                 "policy nothing to follow (more completion tokens, more rollouts per group, or more steps change "
                 "that).")
    return text
