"""Checks that need a CUDA GPU (marked `gpu`; skipped on CPU machines).

Run them on a GPU machine with `.venv/bin/pytest -m gpu tests/test_gpu.py`. They use the tiny
random Qwen3 and the embedded model, so they need no hub access; the vLLM ones also need vLLM.
"""
import pytest
import yaml

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_varlen_attention_on_cuda_in_bf16_matches_each_example_alone():
    from transformers import AutoModelForCausalLM
    from qedlib import attention
    from qedlib.models import TINY, resolve_model
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.bfloat16,
                                                 attn_implementation=attention.register()).cuda()
    torch.manual_seed(0)
    seqs = [torch.randint(5, 1000, (n,), device="cuda") for n in (300, 17, 1024)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s), device="cuda") for s in seqs])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits.float() for s in seqs], dim=1)
    assert (packed - alone).abs().max().item() < 5e-2  # bf16


def test_padding_free_sft_trains_on_cuda(tmp_path):
    import datasets
    from qedlib import proof_chat as policy
    from qedlib.stages import sft
    from qedlib.config import load_config
    from qedlib.models import TINY
    run = tmp_path / "run"
    rows = [policy.sft_row(f"Prove that {i} + {i} = {2 * i}.", "Add.", f"{i} + {i} = {2 * i}." * (1 + i % 5))
            for i in range(16)]
    datasets.Dataset.from_list(rows).save_to_disk(str(run / "01_distill" / "dataset"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base_model": TINY, "device": "cuda", "sft": {
        "max_length": 256, "max_steps": 4, "batch_size": 4, "save_steps": 4, "eval_fraction": 0.0,
        "padding_free": True, "gradient_checkpointing": True, "lr": 1.0e-3}}))
    m = sft.train(load_config(params), run)
    assert m["steps"] == 4 and m["train_loss_last"] < m["train_loss_first"]


def test_sft_packing_bench_reports_mfu():
    from qedlib.tools.bench_sft import gpu_row
    row = gpu_row(steps=3, seq=2048)
    assert row[4] > 0 and (row[5].endswith("%") or row[5] == "peak unknown")


def test_vllm_generator_on_the_tiny_model_then_close_frees_its_memory():
    pytest.importorskip("vllm")
    from qedlib.config import Endpoint, Sampling
    from qedlib.generation import make_generator
    free_before = torch.cuda.mem_get_info()[0]
    gen = make_generator(Endpoint(model="tiny-qwen3", backend="vllm",
                                  vllm={"gpu_memory_utilization": 0.2, "max_model_len": 1024}))
    out = gen.generate([[{"role": "user", "content": "Prove that 1 + 1 = 2."}]],
                       Sampling(temperature=1.0, max_new_tokens=16, n=2), thinking=True)
    assert len(out) == 1 and len(out[0]) == 2
    assert all(0 < c.completion_tokens <= 16 and c.token_ids for c in out[0])
    # counted without the EOS, kept in token_ids (as the transformers backend does)
    assert all(len(c.token_ids) == c.completion_tokens + (c.finish_reason == "stop") for c in out[0])
    gen.close()
    # the engine took 20% of the GPU for weights and KV cache; after close it is back (1 GiB of slack)
    assert gen.llm is None and torch.cuda.mem_get_info()[0] > free_before - 2**30
