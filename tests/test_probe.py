"""policy_shift on real tiny models: zero shift against itself, a measured shift after one real optimizer step."""
import pytest


def test_a_model_against_itself_has_no_shift(tiny_model_path):
    from qedlib.probe import policy_shift
    out = policy_shift(tiny_model_path, tiny_model_path, ["Prove it.", "Hello"], [" Since 2 is even.", " world"])
    assert out["probe_items"] == 2 and out["logprob_gain"] == 0 and abs(out["kl"]) < 1e-6
    assert out["logprob_start"] == out["logprob_trained"] < 0


def test_one_step_of_likelihood_training_raises_the_probe_logprob(tiny_model_path, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qedlib.probe import policy_shift
    prompts, completions = ["Prove it.", "Show that"], [" Since 2 is even, done.", " the sum is even."]
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for p, c in zip(prompts, completions):  # one gradient step up the completions' likelihood
        ids = torch.tensor([tok(p + c, add_special_tokens=False)["input_ids"]])
        model(ids, labels=ids).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = policy_shift(tiny_model_path, str(tmp_path / "m"), prompts, completions)
    assert out["logprob_gain"] > 0 and out["kl"] > 0


def test_mismatched_probe_lists_are_refused(tiny_model_path):
    from qedlib.probe import policy_shift
    with pytest.raises(ValueError, match="as many prompts as completions"):
        policy_shift(tiny_model_path, tiny_model_path, ["a"], [])
