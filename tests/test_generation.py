"""The in-process backends agree on sampling and token counting; engines close and free before the next starts.

vLLM has no CPU wheel, so a fake `vllm` module (LLM, SamplingParams, the cleanup hook) stands in for it:
these tests check what qedlib hands vLLM and what it does with vLLM's answers.
"""
import json
import random
import shutil
import sys
import types
from types import SimpleNamespace

import pytest

from qedlib.config import Endpoint, Sampling
from qedlib.generation import split_thinking


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


def fake_output(prompt_ids, token_ids, finish_reason, text="x"):
    return SimpleNamespace(prompt_token_ids=prompt_ids,
                           outputs=[SimpleNamespace(text=text, token_ids=token_ids, finish_reason=finish_reason)])


@pytest.fixture
def fake_vllm(monkeypatch, tiny_model_path):
    """A `vllm` module whose LLM records what it is asked and in which order it is shut down."""
    from transformers import AutoTokenizer
    events, calls = [], []
    tok = AutoTokenizer.from_pretrained(tiny_model_path)

    class FakeLLM:
        def __init__(self, model, **kw):
            events.append(f"start {model}")
            self.answers = []
            core = SimpleNamespace(shutdown=lambda: events.append("engine shutdown"))
            self.llm_engine = SimpleNamespace(engine_core=core, model_config=SimpleNamespace(model=model))

        def get_tokenizer(self):
            return tok

        def generate(self, texts, params, use_tqdm=True):
            calls.append(params)
            return self.answers or [fake_output([1, 2, 3], [7, 8], "length") for _ in texts]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    dist = types.ModuleType("vllm.distributed")
    state = types.ModuleType("vllm.distributed.parallel_state")
    state.cleanup_dist_env_and_memory = lambda: events.append("process groups destroyed")
    for name, mod in (("vllm", vllm), ("vllm.distributed", dist), ("vllm.distributed.parallel_state", state)):
        monkeypatch.setitem(sys.modules, name, mod)
    return SimpleNamespace(events=events, calls=calls, LLM=FakeLLM, tok=tok)


def model_with_generation_config(tmp_path, tiny_model_path, **gen):
    """A copy of the tiny model whose generation_config.json sets `gen` (as Qwen3's sets top_k 20)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    cfg = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**cfg, **gen}))
    return str(folder)


def test_vllm_close_shuts_the_engine_down_then_frees_and_refuses_more_work(fake_vllm, tiny_model_path):
    from qedlib.generation import VLLMGenerator
    gen = VLLMGenerator(Endpoint(model=tiny_model_path, backend="vllm"))
    gen.close()
    assert fake_vllm.events == [f"start {tiny_model_path}", "engine shutdown", "process groups destroyed"]
    assert gen.llm is None
    with pytest.raises(RuntimeError, match="closed"):
        gen.generate_text(["hi"], Sampling())


def test_vllm_close_leaves_a_borrowed_engine_running(fake_vllm, tiny_model_path):
    """TRL's colocated engine is TRL's: wrapping it and closing the wrapper must not shut it down."""
    from qedlib.generation import VLLMGenerator
    engine = fake_vllm.LLM(tiny_model_path)
    gen = VLLMGenerator(Endpoint(backend="vllm", model="policy"), llm=engine, tokenizer=fake_vllm.tok)
    gen.close()
    assert "engine shutdown" not in fake_vllm.events and gen.llm is None


@pytest.mark.parametrize("gen_config, top_k", [({}, 50), ({"top_k": 20, "min_p": 0.05}, 20)])
def test_both_backends_sample_with_the_model_generation_config(fake_vllm, tmp_path, tiny_model_path, gen_config, top_k):
    """top_k etc. from the model's generation config (transformers' default 50 when unset) in both backends;
    temperature and top_p from the params; vLLM gets a seed drawn from Python's random (which scaffolds seed)."""
    from qedlib.generation import TransformersGenerator, VLLMGenerator
    path = model_with_generation_config(tmp_path, tiny_model_path, **gen_config)
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=4, n=2)
    hf = TransformersGenerator(Endpoint(model=path, dtype="float32", device="cpu"))
    seen = {}
    real_generate = hf.model.generate

    def spy(**kw):
        seen.update(kw)
        return real_generate(**kw)
    hf.model.generate = spy
    hf.generate_text(["Prove it."], sampling)
    vg = VLLMGenerator(Endpoint(model=path, backend="vllm"))
    random.seed(5)
    vg.generate_text(["Prove it."], sampling)
    random.seed(5)
    vg.generate_text(["Prove it."], sampling)
    vg.generate_text(["Prove it."], sampling)
    first, again, third = (c.kw for c in fake_vllm.calls)
    for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        assert first[k] == seen[k], k
    assert seen["top_k"] == top_k and seen["temperature"] == 0.7 and seen["top_p"] == 0.9
    assert first["n"] == 2 and first["max_tokens"] == 4
    assert first["seed"] == again["seed"] != third["seed"]  # reproducible under a seeded run, fresh per call


def test_vllm_greedy_turns_off_sampling_filters(fake_vllm, tiny_model_path):
    from qedlib.generation import VLLMGenerator
    VLLMGenerator(Endpoint(model=tiny_model_path, backend="vllm")).generate_text(["a"], Sampling(temperature=0.0))
    kw = fake_vllm.calls[0].kw
    assert kw["temperature"] == 0.0 and kw["top_k"] == 0 and kw["top_p"] == 1.0


def test_both_backends_count_tokens_without_the_eos_and_keep_it_in_token_ids(fake_vllm, tiny_model_path):
    """The same generated ids give the same Completion counts from the transformers and the vLLM backend."""
    import torch
    from qedlib.generation import TransformersGenerator, VLLMGenerator
    eos = fake_vllm.tok.eos_token_id
    stopped, cut = [101, 102, eos], [101, 102, 103, 104]
    vg = VLLMGenerator(Endpoint(model=tiny_model_path, backend="vllm"))
    vg.llm.answers = [fake_output([1, 2], stopped, "stop"), fake_output([1, 2], cut, "length")]
    v = [g[0] for g in vg.generate_text(["a", "b"], Sampling(temperature=0.0, max_new_tokens=4))]

    hf = TransformersGenerator(Endpoint(model=tiny_model_path, dtype="float32", device="cpu", batch_size=1))
    queue = [stopped + [eos], cut]  # transformers pads a stopped row after its EOS

    def fake_generate(input_ids, **kw):
        return torch.cat([input_ids, torch.tensor([queue.pop(0)])], dim=1)
    hf.model.generate = fake_generate
    h = [g[0] for g in hf.generate_text(["a", "b"], Sampling(temperature=0.0, max_new_tokens=4))]
    for a, b in zip(v, h):
        assert (a.completion_tokens, a.token_ids, a.finish_reason) == (b.completion_tokens, b.token_ids, b.finish_reason)
    assert (v[0].completion_tokens, v[0].token_ids, v[0].finish_reason) == (2, stopped, "stop")
    assert (v[1].completion_tokens, v[1].finish_reason) == (4, "length")


def test_transformers_close_drops_only_a_model_it_loaded(tiny_model_path):
    import weakref
    from qedlib.generation import TransformersGenerator
    gen = TransformersGenerator(Endpoint(model=tiny_model_path, dtype="float32", device="cpu"))
    ref = weakref.ref(gen.model)
    gen.close()
    assert gen.model is None
    import gc
    gc.collect()
    assert ref() is None
    shared = TransformersGenerator(Endpoint(), model=SimpleNamespace(), tokenizer=SimpleNamespace(padding_side="right"))
    shared.close()
    assert shared.model is not None  # the trainer's model stays with the trainer


def test_release_trainer_shuts_the_colocated_engine_and_drops_the_model(fake_vllm, tiny_model_path):
    from qedlib.generation import release_trainer
    freed = []
    engine = fake_vllm.LLM(tiny_model_path)
    trainer = SimpleNamespace(vllm_generation=SimpleNamespace(llm=engine), model=object(), optimizer=object(),
                              accelerator=SimpleNamespace(free_memory=lambda: freed.append(True)))
    release_trainer(trainer)
    assert fake_vllm.events[-2:] == ["engine shutdown", "process groups destroyed"] and freed == [True]
    assert trainer.model is None and trainer.optimizer is None and trainer.vllm_generation is None


def test_eval_closes_each_engine_before_starting_the_next(tmp_path, fake_openai, shipped_problems, tiny_model_path):
    """The real Evaluation, two checkpoints on the transformers backend (tiny-qwen3) and a fake judge server: while
    any checkpoint's answers are graded, at most one policy model is loaded, and none is left loaded at the end, even
    though the test keeps every generator referenced. It reads the real generators' state (their loaded model), not
    events a test double records."""
    import gc
    from conftest import chat_reply
    from qedlib.config import load_config
    from qedlib.stages.evaluation import Benchmark, Evaluation
    from qedlib.generation import TransformersGenerator

    held = []  # every policy generator seen, kept referenced (as a notebook variable would): only close() frees it
    earlier = [o for o in gc.get_objects() if type(o) is TransformersGenerator]  # other tests' generators: not ours

    def loaded_policies() -> int:
        held.extend(o for o in gc.get_objects() if type(o) is TransformersGenerator
                    and all(o is not h for h in held + earlier))
        return sum(1 for g in held if g.model is not None)
    loaded_at_grading = []

    def reply(body):  # the judge: called while a checkpoint's proofs are graded
        loaded_at_grading.append(loaded_policies())
        return chat_reply("Complete and rigorous. <score>7</score>")
    server = fake_openai(reply)
    judge = {"model": "judge", "backend": "openai", "base_url": server.url, "max_retries": 0}
    cfg = load_config(None, {"thinking": False, "eval.samples": 1, "eval.judge.cache": False, "eval.judge.endpoint": judge,
                             "eval.sampling.max_new_tokens": 4})
    models = [(m, Endpoint(model=tiny_model_path, dtype="float32")) for m in ("base", "sft")]
    problems = [p for p in shipped_problems if p.rubric][:2]
    assert loaded_policies() == 0
    rows = Evaluation(cfg, tmp_path).run([Benchmark("b", problems, "rubric")], models, ["single"])
    assert [(r["checkpoint"], r["score"]) for r in rows] == [("base", 7.0)] * 2 + [("sft", 7.0)] * 2
    assert len(loaded_at_grading) == 4 and max(loaded_at_grading) == 1 and len(held) == 2
    assert loaded_policies() == 0  # the last checkpoint's engine is closed too


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_sampler_logprobs_are_the_models_at_the_temperature_before_top_p(tiny_model_path, top_p):
    """What RL's PPO ratio divides by: each sampled token's log_softmax(logits / T), recorded step by step
    (one step of logits held, not batch x length x vocab), equal to a fresh forward pass's."""
    import torch
    from qedlib.config import Endpoint, Sampling
    from qedlib.generation import TransformersGenerator
    gen = TransformersGenerator(Endpoint(model=tiny_model_path, dtype="float32"))
    prompts = ["Hello there", "Prove that 1 + 1 = 2, carefully and completely."]
    out = gen.generate_text(prompts, Sampling(temperature=0.8, top_p=top_p, max_new_tokens=10, n=2), logprobs=True)
    for prompt, group in zip(prompts, out):
        for c in group:
            assert len(c.token_logprobs) == len(c.token_ids)
            enc = gen.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = gen.model(torch.tensor([enc + c.token_ids])).logits[0, len(enc) - 1:-1].float() / 0.8
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.token_logprobs), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- OpenAI-compatible HTTP: one client per event loop
def test_openai_generator_pools_one_client_per_loop_and_closes_it(fake_openai):
    import asyncio
    import threading
    from conftest import chat_reply
    from qedlib.generation import OpenAIGenerator
    in_flight, peak, lock = [0], [0], threading.Lock()

    def reply(body):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        threading.Event().wait(0.02)
        with lock:
            in_flight[0] -= 1
        return chat_reply("thought</think>Proof.", completion_tokens=4)
    server = fake_openai(reply)
    gen = OpenAIGenerator(Endpoint(model="m", backend="openai", base_url=server.url, max_concurrency=3,
                                   price_out_per_mtok=1.0))
    sampling = Sampling(n=2, max_new_tokens=8)
    out = gen.generate([[{"role": "user", "content": f"q{k}"}] for k in range(5)], sampling, thinking=True)
    assert [len(g) for g in out] == [2] * 5 and out[0][0].final == "Proof." and out[0][0].cost == pytest.approx(4e-6)
    assert gen.stats["clients"] == 1 and not gen._pools  # a blocking call closes the client of its own loop
    assert peak[0] <= 3  # the endpoint's concurrency bound holds over the shared client

    async def many_callers():  # like TRL's concurrent async reward calls: separate coroutines, one loop
        msgs = [{"role": "user", "content": "q"}]
        first = await asyncio.gather(*(gen.acomplete(msgs, sampling) for _ in range(6)))
        second = await gen.agenerate([msgs], sampling)
        assert len(gen._pools) == 1
        await gen.aclose()
        return first + second[0]
    assert len(asyncio.run(many_callers())) == 8 and gen.stats["clients"] == 2  # one more loop, one more client
    assert asyncio.run(many_callers()) and gen.stats["clients"] == 3 and peak[0] <= 3
    assert server.calls == 10 + 2 * 8 and gen.stats["errors"] == 0


def test_split_thinking_on_literal_strings():
    assert split_thinking("a</think>\n\nproof", thinking=True) == ("a", "proof", True)
    assert split_thinking("<think>a</think>b</think> final", thinking=True) == ("a</think>b", "final", True)
    assert split_thinking("still reasoning", thinking=True) == ("still reasoning", "", False)
    assert split_thinking("plain answer", thinking=False) == ("", "plain answer", True)
    assert split_thinking("<think>unfinished", thinking=False) == ("unfinished", "", False)
    assert split_thinking("proof text", thinking=True, reasoning_field="r") == ("r", "proof text", True)
