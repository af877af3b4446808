"""Random-initialised Llama-shaped models for the benchmarks (real weights cannot travel to a GPU machine that has
no network): the shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3-8B with the embedded tokenizer (its ids all lie
inside the 128,256-row vocabulary; Llama 3.2's rope scaling is left out: it changes no cost). Built on the device,
in the target dtype, so an 8B model takes seconds, no 32 GB fp32 copy on the host and no checkpoint on disk; the
transformers side of a benchmark gets the same tensors (`hf_model`), not a second copy.

Also what every benchmark's JSON records: library versions and the GPU's data-sheet figures (`environment`), the
bytes a batch-1 decode step must read (`decode_step_bytes`), and which SDPA kernels take the model's attention
calls (`attention_report`)."""
import importlib.metadata
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer, hf_name, rope_inv_freq  # noqa: E402

LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_seq_len=8192, norm_eps=1e-5)
SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=49152,
                 rope_theta=10000.0, max_seq_len=4096, tie_embeddings=True),  # smoke runs on a CPU
    "1b": dict(LLAMA3, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192, tie_embeddings=True),
    "3b": dict(LLAMA3, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8192, tie_embeddings=True),
    "8b": dict(LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, tie_embeddings=False),
}


def random_model(shape, device, dtype, std=0.02):
    """Our Transformer of a named shape with normal(0, std) weights (unit norms), made on `device`. The same
    seed on the same device gives the same weights, so two processes of a benchmark build the same model."""
    with torch.device(device):
        model = Transformer(ModelArgs(**SHAPES[shape]))
    model = model.to(dtype)
    model.inv_freq = rope_inv_freq(model.args).to(device)  # stays fp32 (.to(dtype) cast it)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, std)
    return model


def hf_model(model):
    """transformers' LlamaForCausalLM holding `model`'s weights: the same tensors (no copy), so a side-by-side
    benchmark holds one model's memory. Built on the meta device, then given the tensors; its rotary buffers,
    which no checkpoint stores, are made on the device as from_pretrained makes them."""
    import transformers
    w = model.tok_embeddings.weight
    config = transformers.LlamaConfig(**model.args.to_hf_config(w.dtype))
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    hf.load_state_dict({hf_name(k): t for k, t in model.state_dict().items()}, assign=True, strict=True)
    if model.args.tie_embeddings:  # one Parameter for both names, as transformers ties them (one gradient)
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config).to(w.device)  # fp32, as from_pretrained has it
    meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    assert not meta, f"tensors left on the meta device: {meta[:3]}"
    return hf


TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "tokenizer")


def tokenizer_dir():
    """The embedded model's tokenizer files: checkpoints/tokenizer when present (3.5 MB, what a GPU machine
    without the model package is given: `python bench/shapes.py` writes it), else the converted model's folder."""
    if os.path.exists(os.path.join(TOKENIZER, "tokenizer.json")):
        return TOKENIZER
    from data.prepare_default import ensure_default_model
    return ensure_default_model()


def random_checkpoint(shape, folder, device, dtype, stop_every=0):
    """An HF folder (config, safetensors, the embedded tokenizer) of a random model of `shape`; returns it.
    stop_every > 0 also makes every stop_every-th token id (from 17 on, past the special tokens) an end token
    in generation_config.json: a random model never writes the end of a turn, and a loop whose answers never
    end makes no pairs (a cut answer never wins one); with these its answers end after about stop_every tokens."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        random_model(shape, device, dtype).save_pretrained(folder, tokenizer_dir=tokenizer_dir())
    if stop_every:
        path = os.path.join(folder, "generation_config.json")
        cfg = json.load(open(path)) if os.path.exists(path) else {}
        eos = cfg.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        cfg["eos_token_id"] = sorted(set(eos) | set(range(17, SHAPES[shape]["vocab_size"], stop_every)))
        with open(path, "w") as f:
            json.dump(cfg, f)
    return folder


# -----------------------------------------------------------------------------
# What a JSON records: versions, the device's data-sheet figures, the bytes and FLOPs a step needs

# (a part of torch.cuda.get_device_name(), HBM bandwidth GB/s, dense bf16 tensor TFLOP/s), from NVIDIA's data
# sheets; the first match wins, so the more specific names come first. An unknown device gets None for both.
GPU_SPECS = (
    ("H200 NVL", 4800, 835), ("H200", 4800, 989),
    ("H100 PCIe", 2000, 756), ("H100 NVL", 3900, 835), ("H100", 3350, 989),  # "NVIDIA H100 80GB HBM3": SXM
    ("A100 80GB PCIe", 1935, 312), ("A100-SXM4-80GB", 2039, 312), ("A100", 1555, 312),  # 40 GB: 1,555 GB/s
)


def device_spec(name):
    """{"name", "bandwidth_gb_s", "peak_bf16_tflops", "matched"} for a device name; "unknown" when not listed."""
    for key, bw, tflops in GPU_SPECS:
        if name and key in name:
            return {"name": name, "matched": key, "bandwidth_gb_s": bw, "peak_bf16_tflops": tflops}
    return {"name": name, "matched": "unknown", "bandwidth_gb_s": None, "peak_bf16_tflops": None}


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device):
    """Library versions and the device with its data-sheet figures: recorded in every benchmark JSON."""
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": version("transformers"),
            "triton": version("triton"), "flash_attn": version("flash-attn"), "python": platform.python_version(),
            "device": str(device), "spec": device_spec(name) if torch.device(device).type == "cuda" else device_spec(None)}


def decode_step_bytes(model):
    """Bytes of weights one decode step of one sequence must read: every parameter once (`parameters()` yields a
    tied embedding once: it is the head's matrix, read whole), less an untied embedding table, of which the step
    reads only the row it looks up (counted)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.tok_embeddings.weight
    if model.output.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total + emb.size(1) * emb.element_size()


def kv_bytes_per_position(model):
    """Bytes of cached keys and values one position holds across the layers (what attention reads per position)."""
    a, w = model.args, model.tok_embeddings.weight
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * w.element_size()


def matmul_params(model):
    """Parameters a token's forward multiplies with: all of them but an untied embedding table (a lookup)."""
    emb = model.tok_embeddings.weight
    n = sum(p.numel() for p in model.parameters())
    return n - emb.numel() if model.output.weight is not emb else n


# -----------------------------------------------------------------------------
# Attention kernels


def _backend_names():
    from torch.nn.attention import SDPBackend
    return {int(b.value): name.lower() for name, b in SDPBackend.__members__.items()}


def attention_report(device, dtype, heads=32, kv_heads=8, head_dim=64, T=512):
    """Which SDPA kernel takes each of the project's attention calls on `device`, and which would accept it, with
    each one's largest difference from a float64 reference (None: the kernel refuses these inputs):
      causal_gqa     no mask, grouped heads by enable_gqa: training rows, fresh prefills (model.attention)
      masked_gqa     a boolean mask and enable_gqa: packed DPO pairs (train_dpo.SharedPromptView) and prefills
                     after a shared prefix (kvcache.ExtendView)
      grouped_decode a boolean mask, the query heads of a key/value head stacked as rows: the decode step
                     (kvcache.GroupedView), 8 samples of one prompt, one new token each
    The flash kernel takes no mask; where the efficient kernel refuses grouped heads, a masked GQA call falls
    to the math kernel, which forms the whole (T, T) score matrix per head."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import model as m
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    qpk, M, S = heads // kv_heads, 8, T
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    vis = torch.rand(4, 1, M * qpk, S, device=device, generator=g) < 0.7
    vis[..., 0] = True  # every query sees at least one key
    calls = {
        "causal_gqa": (rand(2, heads, T, head_dim), rand(2, kv_heads, T, head_dim), rand(2, kv_heads, T, head_dim),
                       dict(is_causal=True, enable_gqa=True)),
        "masked_gqa": (rand(2, heads, T, head_dim), rand(2, kv_heads, T, head_dim), rand(2, kv_heads, T, head_dim),
                       dict(attn_mask=causal, enable_gqa=True)),
        "grouped_decode": (rand(4, kv_heads, M * qpk, head_dim), rand(4, kv_heads, S, head_dim),
                           rand(4, kv_heads, S, head_dim), dict(attn_mask=vis)),
    }
    names = _backend_names()
    out = {"flash_attn_package": m.flash_attn_func is not None}
    for call, (q, k, v, kw) in calls.items():
        cpu = {key: (x.cpu() if torch.is_tensor(x) else x) for key, x in kw.items()}
        with sdpa_kernel(SDPBackend.MATH):  # the reference: the math kernel in float64 on the CPU
            want = F.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), **cpu)
        res = {}
        try:  # the kernel SDPA picks for these inputs when left to itself
            res["picked"] = names.get(int(torch._fused_sdp_choice(q, k, v, attn_mask=kw.get("attn_mask"), dropout_p=0.0,
                                                                  is_causal=kw.get("is_causal", False),
                                                                  enable_gqa=kw.get("enable_gqa", False))), "unknown")
        except (AttributeError, RuntimeError, TypeError) as e:
            res["picked"] = f"not known ({type(e).__name__})"
        for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel(b):
                    got = F.scaled_dot_product_attention(q, k, v, **kw)
                res[b.name.lower()] = round((got.cpu().double() - want).abs().max().item(), 5)
            except RuntimeError:
                res[b.name.lower()] = None  # this kernel refuses these inputs
        out[call] = res
    return out


if __name__ == "__main__":  # write checkpoints/tokenizer: the tokenizer files a GPU machine needs (carry that folder)
    import shutil
    src = tokenizer_dir()
    os.makedirs(TOKENIZER, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, name)) and src != TOKENIZER:
            shutil.copy2(os.path.join(src, name), TOKENIZER)
    print(f"tokenizer files in {TOKENIZER}: {sorted(os.listdir(TOKENIZER))}")
