"""Random-initialised Llama-shaped checkpoints for the benchmarks (real weights cannot travel to a GPU machine
that has no network): the shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3-8B with the embedded tokenizer
(its ids all lie inside the 128,256-row vocabulary; Llama 3.2's rope scaling is left out: it changes
no cost). Initialised on the device, in the target dtype, so an 8B
model takes seconds and no 32 GB fp32 copy on the host."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer, rope_inv_freq  # noqa: E402

LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_seq_len=8192, norm_eps=1e-5)
SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=49152,
                 rope_theta=10000.0, max_seq_len=4096, tie_embeddings=True),  # smoke runs on a CPU
    "1b": dict(LLAMA3, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192, tie_embeddings=True),
    "3b": dict(LLAMA3, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8192, tie_embeddings=True),
    "8b": dict(LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, tie_embeddings=False),
}


def random_model(shape, device, dtype, std=0.02):
    """Our Transformer of a named shape with normal(0, std) weights (unit norms), made on `device`."""
    with torch.device(device):
        model = Transformer(ModelArgs(**SHAPES[shape]))
    model = model.to(dtype)
    model.inv_freq = rope_inv_freq(model.args).to(device)  # stays fp32 (.to(dtype) cast it)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, std)
    return model


TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "tokenizer")


def tokenizer_dir():
    """The embedded model's tokenizer files: checkpoints/tokenizer when present (3.5 MB, what a GPU machine
    without the model package is given: `python bench/shapes.py` writes it), else the converted model's folder."""
    if os.path.exists(os.path.join(TOKENIZER, "tokenizer.json")):
        return TOKENIZER
    from data.prepare_default import ensure_default_model
    return ensure_default_model()


def random_checkpoint(shape, folder, device, dtype):
    """An HF folder (config, safetensors, the embedded tokenizer) of a random model of `shape`; returns it."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        random_model(shape, device, dtype).save_pretrained(folder, tokenizer_dir=tokenizer_dir())
    return folder


def attention_report(device, dtype, heads=32, kv_heads=8, head_dim=64, T=512):
    """Which SDPA kernels accept this project's two attention calls on `device` (causal without a mask: prefill
    and training; with a boolean mask: the cache views), and each one's largest difference from the math kernel.
    SDPA takes the first that accepts, in its priority order; `flash_attn` (the package) is reported apart."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    import model as m
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, heads, T, head_dim, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(2, kv_heads, T, head_dim, device=device, dtype=dtype, generator=g) for _ in range(2))
    k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    out = {"flash_attn_package": m.flash_attn_func is not None}
    for name, kw in (("causal", dict(is_causal=True)), ("masked", dict(attn_mask=mask))):
        cpu = {k2: (x.cpu() if torch.is_tensor(x) else x) for k2, x in kw.items()}
        with sdpa_kernel(SDPBackend.MATH):  # the reference: the math kernel in float64 on the CPU
            want = F.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), **cpu)
        res = {}
        for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel(b):
                    got = F.scaled_dot_product_attention(q, k, v, **kw)
                res[b.name.lower()] = round((got.cpu().double() - want).abs().max().item(), 5)
            except RuntimeError:
                res[b.name.lower()] = None  # this kernel refuses these inputs
        out[name] = res
    return out


if __name__ == "__main__":  # write checkpoints/tokenizer: the tokenizer files a GPU machine needs (carry that folder)
    import shutil
    src = tokenizer_dir()
    os.makedirs(TOKENIZER, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, name)) and src != TOKENIZER:
            shutil.copy2(os.path.join(src, name), TOKENIZER)
    print(f"tokenizer files in {TOKENIZER}: {sorted(os.listdir(TOKENIZER))}")
