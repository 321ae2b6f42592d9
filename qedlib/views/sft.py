"""What notebook 02_sft shows: the masked example, the curves, the findings in words, the tables.

Reads what qedlib.stages.sft and qedlib.sft_data produce (log history, metrics, generations); trains
nothing. The view layer: it may import its stage, and no stage imports it.
"""
from __future__ import annotations

import html
from typing import Optional

from ..display import excerpt, experiments_markdown
from ..generation import THINK_CLOSE
from ..layout import SFT
from ..stats import MIN_VERDICT_N, verdict


def render_loss_segments(segments: list[dict]) -> str:
    """HTML of the whole example: trained tokens green, read-only tokens grey, with the token counts.
    Notebook 02, "Loss on the assistant turn only"."""
    style = {True: "background:#c8f7c5", False: "background:#e6e6e6;color:#555"}
    body = "".join(f"<span style='{style[s['loss']]}'>{html.escape(s['text'])}</span>" for s in segments)
    n_loss = sum(s["tokens"] for s in segments if s["loss"])
    n_read = sum(s["tokens"] for s in segments if not s["loss"])
    return (f"<p><span style='{style[False]}'>read only, label -100: {n_read} tokens</span> · "
            f"<span style='{style[True]}'>trained (loss): {n_loss} tokens</span></p>"
            f"<pre style='white-space:pre-wrap'>{body}</pre>")


def log_frame(log_history: list[dict]):
    """The trainer's log history as a DataFrame (step, loss, eval_loss, learning_rate, grad_norm, tokens/s)."""
    import pandas as pd  # heavy: loads only when the log is tabulated
    df = pd.DataFrame(log_history)
    keep = [c for c in ["step", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second"] if c in df]
    return df[keep].groupby("step", as_index=False).first() if "step" in df else df


def training_curves(log_history: list[dict], title: str = "SFT"):
    """Plotly figure, 2x2 panels with axis titles: train and eval loss, learning rate, gradient norm (log axis: one
    spike would hide every other step) and tokens/s, against optimizer step. Notebook 02, "Curves, and what they say"."""
    from plotly.subplots import make_subplots  # heavy: plotly loads only when a figure is drawn
    import plotly.graph_objects as go  # heavy: plotly loads only when a figure is drawn
    df = log_frame(log_history)
    panels = [("loss", "loss (nats/token)"), ("learning_rate", "learning rate"), ("grad_norm", "grad norm (log)"),
              ("tokens_per_second", "tokens/s")]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p[1] for p in panels], vertical_spacing=0.18,
                        horizontal_spacing=0.12)
    for i, (key, name) in enumerate(panels):
        row, col = i // 2 + 1, i % 2 + 1
        if key in df:
            d = df.dropna(subset=[key])
            fig.add_trace(go.Scatter(x=d["step"], y=d[key], mode="lines+markers",
                                     name="train loss" if key == "loss" else name), row=row, col=col)
        fig.update_yaxes(title_text=name, type="log" if key == "grad_norm" else None, row=row, col=col)
        fig.update_xaxes(title_text="optimizer step", row=row, col=col)
    if "eval_loss" in df:
        d = df.dropna(subset=["eval_loss"])
        fig.add_trace(go.Scatter(x=d["step"], y=d["eval_loss"], mode="lines+markers", name="eval loss (held out)"),
                      row=1, col=1)
    fig.update_layout(title=title, height=620, template="plotly_white", margin=dict(l=70, r=20, t=80, b=60))
    return fig


def think_tokens(text: str, tokenizer) -> Optional[int]:
    """Tokens inside the think block of a generation that started after `<think>`; None when never closed."""
    if THINK_CLOSE not in text:
        return None
    inside = text.split(THINK_CLOSE)[0].replace("<think>", "").strip()
    return len(tokenizer(inside, add_special_tokens=False)["input_ids"]) if inside else 0


def think_block_stats(rows: list[dict], tokenizer) -> dict:
    """Think-block length before/after SFT: mean tokens over generations that closed it, share empty (of all).
    Notebook 02, "Before and after"."""
    out = {}
    for label, when in (("base", "before"), ("sft", "after")):
        counts = [think_tokens(r[label], tokenizer) for r in rows]
        closed = [c for c in counts if c is not None]
        out[f"think_tokens_{when}"] = sum(closed) / len(closed) if closed else None
        out[f"empty_think_{when}"] = sum(c == 0 for c in closed) / max(1, len(rows))
    return out


def empty_reasoning_share(ds) -> float:
    """Share of SFT rows whose reasoning (the think block the student imitates) is empty.
    Notebook 02, "Before and after"."""
    msgs = ds["messages"]
    empty = [not m[-1]["content"].split(THINK_CLOSE)[0].replace("<think>", "").strip() for m in msgs]
    return sum(empty) / max(1, len(empty))


GAP_NATS = 0.1  # train/eval gap (nats per token) above which the findings call the fit memorisation
RECENT_LOGS = 5  # train-loss logs averaged for the gap (one log is one small batch: noisy)


def evaluations(history: Optional[list[dict]]) -> list[tuple[int, float]]:
    """(step, eval_loss) of each evaluation, one per step: the trainer logs the final one twice (at the last step
    and from `trainer.evaluate()`), which is one evaluation, not two."""
    seen: dict[int, float] = {}
    for h in history or []:
        if "eval_loss" in h:
            seen.setdefault(int(h["step"]), float(h["eval_loss"]))
    return sorted(seen.items())


def epochs_run(metrics: dict, history: Optional[list[dict]] = None) -> Optional[float]:
    """Passes over the training rows that ran: `epochs_run` in the metrics, else the last logged epoch."""
    if metrics.get("epochs_run") is not None:
        return float(metrics["epochs_run"])
    epochs = [h["epoch"] for h in history or [] if "epoch" in h]
    return float(epochs[-1]) if epochs else None


def _overfit(history: list[dict], evals: list[tuple[int, float]]) -> Optional[str]:
    losses = [h["loss"] for h in history or [] if "loss" in h]
    if not evals or not losses:
        return None
    recent = losses[-RECENT_LOGS:]
    train, (step, ev) = sum(recent) / len(recent), evals[-1]
    gap = ev - train
    where = f"held-out loss {ev:.3f} at step {step} vs {train:.3f} on training rows (mean of the last {len(recent)} logs)"
    if gap > GAP_NATS:
        return (f"Overfitting by the train/eval gap: {where}, a gap of {gap:.2f} nats per token: the model fits the "
                "rows it trained on much better than problems it never saw (it memorises part of them).")
    return f"No overfitting by the train/eval gap: {where}, a gap of {gap:.2f} nats per token (test: gap > {GAP_NATS})."


def _eval_trend(evals: list[tuple[int, float]]) -> Optional[str]:
    if len(evals) < 2:
        return None
    listed = ", ".join(f"{v:.3f} (step {s})" for s, v in evals)
    if len(evals) < 3:
        return (f"Eval loss at its {len(evals)} evaluations: {listed}; two points are too few to call a trend "
                "(`sft.eval_steps` sets how often it is measured).")
    best = min(evals, key=lambda e: e[1])
    if evals[-1][1] > best[1] + 0.01:
        return (f"Eval loss over {len(evals)} evaluations: {listed}; it rose from its lowest {best[1]:.3f} (step "
                f"{best[0]}): the held-out fit got worse while training went on.")
    return f"Eval loss over {len(evals)} evaluations: {listed}; no rise above its lowest (test: > 0.01)."


def training_findings(metrics: dict, history: Optional[list[dict]] = None) -> str:
    """What the training numbers say. Tests: epochs are counted from what ran (the last logged epoch), not from
    `sft.epochs`, which `sft.max_steps > 0` overrides; evaluations are counted once per step; a trend in eval loss only
    with >= 3 evaluations (a rise above the lowest by > 0.01); overfitting from the gap between the last eval loss and
    the mean of the last 5 train-loss logs (> 0.1 nats per token). Notebook 02, "Curves, and what they say"."""
    m, out = metrics, []
    evals = evaluations(history)
    if m.get("train_loss_first") is not None:
        ep = epochs_run(m, history)
        span = f" ({ep:.1f} passes over the {m['examples']} training rows)" if ep is not None else ""
        out.append(f"Train loss went {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f} over {m['steps']} "
                   f"optimizer steps{span}.")
    for sentence in (_eval_trend(evals), _overfit(history or [], evals)):
        if sentence:
            out.append(sentence)
    saved = m.get("weights_changed_frac_saved")
    if saved is not None:
        moved = m.get("weights_changed_frac") or 0.0
        out.append(f"Saved in {m.get('save_dtype')} (`sft.save_dtype`), {saved:.1%} still differ from the start: "
                   f"{max(0.0, moved - saved):.1%} moved by less than half a {m.get('save_dtype')} step and rounded back "
                   "(not evidence of learning either way); the before/after measurements below are of the saved model.")
    return " ".join(out)


def _pct_change(e: dict) -> str:
    return (f"{e['before']:.0%} -> {e['after']:.0%} ({100 * e['gain']:+.0f} points, 95% CI "
            f"[{100 * e['ci_low']:+.0f}, {100 * e['ci_high']:+.0f}])")


def _beyond(e: dict) -> str:
    v = verdict(e["ci_low"], e["ci_high"], e["n"])
    return {"up": "beyond noise", "down": "beyond noise", "none": "not distinguishable from no change"}.get(
        v, f"from {e['n']} problems, too few for a verdict (at least {MIN_VERDICT_N})")


def behaviour_findings(effect: dict) -> str:
    """The behaviour SFT teaches, before vs after on the held-out problems' generations. Test: a change is called
    "beyond noise" only when its 95% bootstrap interval over problems excludes 0 and there are >= stats.MIN_VERDICT_N
    problems. Notebook 02, "Before and after"."""
    c, s, t = effect["closes_think"], effect["stops"], effect["tokens"]
    return (f"On {c['n']} held-out problems, base -> SFT: closes `</think>` {_pct_change(c)}, {_beyond(c)}; stops "
            f"before the token budget {_pct_change(s)}, {_beyond(s)}; generated tokens {t['before']:.1f} -> "
            f"{t['after']:.1f} ({t['gain']:+.1f}, 95% CI [{t['ci_low']:+.1f}, {t['ci_high']:+.1f}]), {_beyond(t)}.")


def probe_findings(probe: Optional[dict]) -> str:
    """Evidence that SFT changed the policy on problems it never trained on (qedlib.probe.policy_shift on the
    held-out rows): held-out loss before/after and the log-probability gain with its interval. Tests: "beyond noise"
    only when the 95% interval over problems excludes 0 and there are >= stats.MIN_VERDICT_N problems. Notebook 02."""
    if probe is None:
        return "No held-out rows (`sft.eval_fraction` 0): no held-out probe of what SFT changed."
    n, g = probe["probe_items"], probe["logprob_gain"]
    out = (f"On the targets of the {n} held-out problems (never trained on), the loss per token went "
           f"{probe['heldout_loss_before']:.3f} (base) -> {probe['heldout_loss_after']:.3f} (SFT): the log-probability "
           f"of the teacher's answers rose by {g:+.3f} nats per token")
    if n < MIN_VERDICT_N:
        return out + f" ({n} problem{'s' * (n > 1)}: too few for a verdict beyond noise, at least {MIN_VERDICT_N})."
    moved = {"up": "beyond noise: SFT moved the policy towards the teacher's answers on unseen problems",
             "down": "beyond noise, downwards: SFT made the teacher's answers less likely on unseen problems",
             "none": "not distinguishable from no change"}[verdict(probe["ci_low"], probe["ci_high"], n)]
    return (out + f", 95% CI [{probe['ci_low']:+.3f}, {probe['ci_high']:+.3f}] over problems, {moved}. "
            f"KL(SFT || base) on those tokens: {probe['kl']:.3f} nats per token.")


def think_findings(m: dict) -> str:
    """What the before/after generations say: the `</think>` rate and the think block's real length.
    Notebook 02, "Before and after"."""
    out = [f"Generations that close `</think>`: {m['think_closed_before']:.0%} before SFT, "
           f"{m['think_closed_after']:.0%} after."]
    if m.get("think_tokens_after") is not None:
        before = ("" if m.get("think_tokens_before") is None
                  else f"{m['think_tokens_before']:.1f} tokens before SFT and ")
        out.append(f"A closed think block holds on average {before}{m['think_tokens_after']:.1f} tokens after SFT; "
                   f"{m['empty_think_after']:.0%} of the SFT model's generations close an empty one.")
        if m["empty_think_after"] >= 0.5:
            why = (f" ({m['targets_empty_think']:.0%} of the training targets have an empty think block, "
                   "so that is what it imitates)") if m.get("targets_empty_think") else ""
            out.append(f"So the model learned the *format* (close the tag, then answer), not to reason first{why}.")
    return " ".join(out)


# Key settings shown beside the paper's (qedlib.display.settings_table; the paper's values are qedlib.paper.RECIPE's).
SETTINGS = [("base model", "base_model"),
            ("data", "sft.dataset"),
            ("one sample per problem", "sft.one_per_problem"),
            ("learning rate", "sft.lr"),
            ("optimizer steps (-1: by epochs)", "sft.max_steps"),
            ("epochs (only when max steps is -1)", "sft.epochs"),
            ("batch size per device", "sft.batch_size"),
            ("gradient accumulation", "sft.grad_accum"),
            ("lr schedule", "sft.lr_scheduler"),
            ("warmup ratio", "sft.warmup_ratio"),
            ("max tokens per example", "sft.max_length"),
            ("LoRA", "sft.lora.enabled"),
            ("padding-free batches", "sft.padding_free"),
            ("held-out problems (fraction)", "sft.eval_fraction")]

# Final metrics shown as one small table (qedlib.display.metrics_table).
METRICS = [("optimizer steps", "steps"), ("epochs run", "epochs_run"), ("train examples", "examples"),
           ("train loss, first log", "train_loss_first"),
           ("train loss, last log", "train_loss_last"), ("eval loss", "eval_loss"),
           ("held-out loss, base", "probe.heldout_loss_before"), ("held-out loss, SFT", "probe.heldout_loss_after"),
           ("held-out log-prob gain, 95% CI low", "probe.ci_low"), ("KL(SFT || base) per token", "probe.kl"),
           ("rows dropped as overlong", "dropped_overlong"),
           ("tokens seen", "num_input_tokens_seen"), ("train seconds", "train_seconds"),
           ("closes </think>, before", "effect.closes_think.before"),
           ("closes </think>, after", "effect.closes_think.after"),
           ("stops before the budget, before", "effect.stops.before"), ("stops, after", "effect.stops.after"),
           ("think-block tokens, before", "think_tokens_before"), ("think-block tokens, after", "think_tokens_after"),
           ("empty think block, after", "empty_think_after")]

def samples_table(samples: list[dict], chars: int = 60):
    """Section "Before and after": each held-out problem's base and SFT generations as table cells (whitespace
    collapsed, so `</think>` and the text read on one line; `display.excerpt`: never cut inside a `$...$` formula),
    with whether each closed `</think>` and its tokens."""
    import pandas as pd  # heavy: pandas loads only when the notebook draws the table
    cell = lambda t: excerpt(" ".join((t or "").split()), chars)  # noqa: E731
    return pd.DataFrame([{"problem": r["problem"], "base": cell(r["base"]), "sft": cell(r["sft"]),
                          "base_closed": r["base_closed"], "sft_closed": r["sft_closed"],
                          "base_tokens": r["base_tokens"], "sft_tokens": r["sft_tokens"]} for r in samples])


# "Try it" experiments (notebook 02's last section): params overrides on params/cpu.yaml. Each trains on this run's own
# distilled set (sft.dataset, the folder `make run` wrote) and runs 02_sft alone into its own folder. `minutes` on 2
# idle cores: low-lr measured (2026-12-05: 142 s; train loss 2.16 -> 1.24, held-out log-prob +0.25 [+0.21, +0.31],
# closes </think> 0% of 12), the others estimated from it (~6 s a training step plus ~25 s of loading and sampling;
# LoRA and padded batches cost about the same per step on these short rows).
RUN_DATASET = "outputs/cpu/01_distill/dataset"
EXPERIMENTS = [
    {"name": "low-lr", "overrides": {"sft.dataset": RUN_DATASET, "sft.lr": 3.0e-5}, "minutes": 2.5, "measured": True,
     "look_for": "the paper's lr (3e-5, for a 4B model) on the 135M model for 20 steps. Measured: train loss fell "
                 "2.16 -> 1.24 (this run at 1e-4: to about 0.46) and the held-out targets' log-probability still "
                 "rose +0.25 [+0.21, +0.31] (about as much as at 1e-4, with less overfitting), yet the model closed "
                 "`</think>` on 0 of the 12 held-out problems: the lower lr moved the text's likelihood as much, but not "
                 "the format."},
    {"name": "lora", "overrides": {"sft.dataset": RUN_DATASET, "sft.lora.enabled": True, "sft.lr": 1.0e-3}, "minutes": 2.5,
     "look_for": "LoRA instead of full fine-tuning (10x the lr, as adapters need): the held-out loss change and KL "
                 "of the probe, the loss curve and train seconds beside this run's."},
    {"name": "padded", "overrides": {"sft.dataset": RUN_DATASET, "sft.padding_free": False}, "minutes": 2.5,
     "look_for": "padded batches instead of padding-free: the tokens/s panel of the curves drops (pad tokens cost "
                 "compute); the loss curve should match this run's closely."},
    {"name": "overfit", "overrides": {"sft.dataset": RUN_DATASET, "sft.max_steps": 60, "sft.eval_steps": 10},
     "minutes": 7,
     "look_for": "three times the steps on the same 18 rows, eval loss every 10 steps (6 evaluations, enough for a "
                 "trend): train loss falls far below eval loss, the train/eval gap grows past this run's and the "
                 "findings say 'Overfitting by the train/eval gap'."},
]


def try_it(params_file: str = "params/cpu.yaml") -> str:
    """Markdown for the notebook's "Try it" section, built from EXPERIMENTS (one source, tested): each starts from
    this run's distilled set and states its minutes on 2 cores (measured or estimated). Notebook 02, "Try it"."""
    return experiments_markdown(EXPERIMENTS, params_file, SFT, estimated_from="low-lr's time per step")
