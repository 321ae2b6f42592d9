"""What notebook 02_sft shows: the masked example, the curves, the findings in words, the tables.

Reads what qedlib.sft and qedlib.sft_data produce (log history, metrics, generations); trains
nothing. A building block below the stage module; it imports no stage.
"""
from __future__ import annotations

from typing import Optional

from .display import NOT_IN_PAPER
from .generation import THINK_CLOSE
from .layout import DISTILL, SFT


def render_loss_segments(segments: list[dict]) -> str:
    """HTML of the whole example: trained tokens green, read-only tokens grey, with the token counts."""
    import html
    style = {True: "background:#c8f7c5", False: "background:#e6e6e6;color:#555"}
    body = "".join(f"<span style='{style[s['loss']]}'>{html.escape(s['text'])}</span>" for s in segments)
    n_loss = sum(s["tokens"] for s in segments if s["loss"])
    n_read = sum(s["tokens"] for s in segments if not s["loss"])
    return (f"<p><span style='{style[False]}'>read only, label -100: {n_read} tokens</span> · "
            f"<span style='{style[True]}'>trained (loss): {n_loss} tokens</span></p>"
            f"<pre style='white-space:pre-wrap'>{body}</pre>")


def log_frame(log_history: list[dict]):
    """The trainer's log history as a DataFrame (step, loss, eval_loss, learning_rate, grad_norm, tokens/s)."""
    import pandas as pd
    df = pd.DataFrame(log_history)
    keep = [c for c in ["step", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second"] if c in df]
    return df[keep].groupby("step", as_index=False).first() if "step" in df else df


def training_curves(log_history: list[dict], title: str = "SFT"):
    """Plotly figure: train/eval loss, learning rate, grad norm and tokens/s against step."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go
    df = log_frame(log_history)
    panels = [("loss", "train loss"), ("learning_rate", "learning rate"), ("grad_norm", "grad norm"),
              ("tokens_per_second", "tokens/s")]
    fig = make_subplots(rows=1, cols=4, subplot_titles=[p[1] for p in panels])
    for col, (key, name) in enumerate(panels, 1):
        if key in df:
            d = df.dropna(subset=[key])
            fig.add_trace(go.Scatter(x=d["step"], y=d[key], mode="lines+markers", name=name), row=1, col=col)
    if "eval_loss" in df:
        d = df.dropna(subset=["eval_loss"])
        fig.add_trace(go.Scatter(x=d["step"], y=d["eval_loss"], mode="lines+markers", name="eval loss"), row=1, col=1)
    fig.update_layout(title=title, height=320, width=1200)
    return fig


def think_tokens(text: str, tokenizer) -> Optional[int]:
    """Tokens inside the think block of a generation that started after `<think>`; None when never closed."""
    if THINK_CLOSE not in text:
        return None
    inside = text.split(THINK_CLOSE)[0].replace("<think>", "").strip()
    return len(tokenizer(inside, add_special_tokens=False)["input_ids"]) if inside else 0


def think_block_stats(rows: list[dict], tokenizer) -> dict:
    """Think-block length before/after SFT: mean tokens over generations that closed it, share empty (of all)."""
    out = {}
    for label, when in (("base", "before"), ("sft", "after")):
        counts = [think_tokens(r[label], tokenizer) for r in rows]
        closed = [c for c in counts if c is not None]
        out[f"think_tokens_{when}"] = sum(closed) / len(closed) if closed else None
        out[f"empty_think_{when}"] = sum(c == 0 for c in closed) / max(1, len(rows))
    return out


def empty_reasoning_share(ds) -> float:
    """Share of SFT rows whose reasoning (the think block the student imitates) is empty."""
    msgs = ds["messages"]
    empty = [not m[-1]["content"].split(THINK_CLOSE)[0].replace("<think>", "").strip() for m in msgs]
    return sum(empty) / max(1, len(empty))


def _eval_trend(history: list[dict]) -> Optional[str]:
    evals = [(h["step"], h["eval_loss"]) for h in history or [] if "eval_loss" in h]
    if len(evals) < 2:
        return None
    best = min(evals, key=lambda e: e[1])
    if evals[-1][1] > best[1] + 0.01:
        return (f"Eval loss rose from its lowest {best[1]:.3f} (step {best[0]}) to {evals[-1][1]:.3f}: the model is "
                "overfitting its few training examples (memorising them, not generalising to held-out problems).")
    return f"Eval loss went {evals[0][1]:.3f} -> {evals[-1][1]:.3f} over {len(evals)} evaluations: no sign of overfitting."


def training_findings(metrics: dict, history: Optional[list[dict]] = None) -> str:
    """What the training numbers say: the loss, eval loss rising = overfitting, whether the weights moved."""
    m, out = metrics, []
    if m.get("train_loss_first") is not None:
        out.append(f"Train loss went {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f} over {m['steps']} "
                   f"steps on {m['examples']} examples.")
    trend = _eval_trend(history)
    if trend:
        out.append(trend)
    moved = m.get("weights_changed_frac")
    if moved is not None:
        out.append(f"{moved:.1%} of the weights changed" + (": training barely touched the model." if moved < 0.01
                                                             else " (fp32 master weights, so small updates count)."))
    saved = m.get("weights_changed_frac_saved")
    if saved is not None:
        out.append(f"Saved in {m.get('save_dtype')} (`sft.save_dtype`), {saved:.1%} still differ from the start: the "
                   f"other {max(0.0, (moved or 0) - saved):.1%} moved by less than half a {m.get('save_dtype')} step "
                   "and rounded back. Sampling and evaluation load the model in that dtype anyway; RL starts from "
                   "the rounded weights.")
    return " ".join(out)


def think_findings(m: dict) -> str:
    """What the before/after generations say: the `</think>` rate and the think block's real length."""
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


# Key settings shown beside the paper's (qedlib.display.settings_table).
SETTINGS = [("base model", "base_model", "Qwen3-4B-Thinking-2507"),
            ("data", "sft.dataset", "FineProofs-SFT"),
            ("one sample per problem", "sft.one_per_problem", True),
            ("learning rate", "sft.lr", 3.0e-5),
            ("optimizer steps (-1: by epochs)", "sft.max_steps", "~620"),
            ("epochs", "sft.epochs", NOT_IN_PAPER),
            ("batch size per device", "sft.batch_size", NOT_IN_PAPER),
            ("gradient accumulation", "sft.grad_accum", NOT_IN_PAPER),
            ("lr schedule", "sft.lr_scheduler", NOT_IN_PAPER),
            ("warmup ratio", "sft.warmup_ratio", NOT_IN_PAPER),
            ("max tokens per example", "sft.max_length", NOT_IN_PAPER),
            ("LoRA", "sft.lora.enabled", NOT_IN_PAPER),
            ("padding-free batches", "sft.padding_free", NOT_IN_PAPER),
            ("held-out problems (fraction)", "sft.eval_fraction", NOT_IN_PAPER)]

# Final metrics shown as one small table (qedlib.display.metrics_table).
METRICS = [("optimizer steps", "steps"), ("train examples", "examples"), ("train loss, first log", "train_loss_first"),
           ("train loss, last log", "train_loss_last"), ("eval loss", "eval_loss"),
           ("weights changed (fraction)", "weights_changed_frac"),
           ("weights changed after rounding to save_dtype", "weights_changed_frac_saved"),
           ("rows dropped as overlong", "dropped_overlong"),
           ("tokens seen", "num_input_tokens_seen"), ("train seconds", "train_seconds"),
           ("closes </think>, before", "think_closed_before"), ("closes </think>, after", "think_closed_after"),
           ("think-block tokens, before", "think_tokens_before"), ("think-block tokens, after", "think_tokens_after"),
           ("empty think block, after", "empty_think_after")]

# "Try it" experiments (notebook 02's last section): params overrides on params/cpu.yaml, minutes on a laptop.
EXPERIMENTS = [
    {"name": "lora", "overrides": {"sft.lora.enabled": True, "sft.lr": 1.0e-3},
     "look_for": "LoRA instead of full fine-tuning (10x the lr, as adapters need): the weights-changed fraction "
                 "(the merged adapter touches only the targeted matrices), the loss curve and train seconds beside "
                 "this run's."},
    {"name": "padded", "overrides": {"sft.padding_free": False},
     "look_for": "padded batches instead of padding-free: the tokens/s panel of the curves drops (pad tokens cost "
                 "compute); the loss curve should match this run's closely."},
    {"name": "overfit", "overrides": {"sft.epochs": 10.0, "sft.max_steps": 60, "sft.eval_steps": 5},
     "look_for": "three times the steps on the same few examples, eval loss every 5 steps: train loss falls "
                 "towards 0 while eval loss turns up, and the findings say 'overfitting'."},
    {"name": "low-lr", "overrides": {"sft.lr": 3.0e-5},
     "look_for": "the paper's lr on the 135M model: a slower loss fall in 20 steps and a smaller weights-changed "
                 "fraction; does the model still learn to close `</think>`?"},
]


def try_it(params_file: str = "params/cpu.yaml") -> str:
    """Markdown for the notebook's "Try it" section, built from EXPERIMENTS (one source, tested)."""
    from .display import experiments_markdown
    return experiments_markdown(EXPERIMENTS, params_file, f"{DISTILL} {SFT}")
