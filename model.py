"""
A Llama-compatible Transformer (Llama 2/3/3.1/3.2, SmolLM, any `LlamaForCausalLM` folder) and reading and
writing Hugging Face checkpoint folders. The model knows nothing of parallelism (train_dpo.py applies FSDP2
from the outside) nor of the generation engine's cache layout (sample.py hands each forward a cache view).

    python model.py --model checkpoints/smollm2-135m-instruct          # print the config and a parameter count
    python -c "from model import Transformer; m = Transformer.from_pretrained('DIR'); print(m.args)"
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: the flash-attn package (GPU, 16-bit only)
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

# Files of an HF folder that belong to the tokenizer and generation settings; copied along on save.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    # the defaults are SmolLM2-135M's shape (the embedded model); a checkpoint's config.json sets them all
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    hidden_dim: int = 1536
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or the `llama3` parameters
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    hf_config: dict = field(default_factory=dict, repr=False)  # the config.json we came from, kept for saving

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        """Build from an HF `LlamaForCausalLM` config dict; refuse what this code cannot run faithfully."""
        # anything this code would compute differently from transformers is an error naming the field:
        # a model that loads and quietly computes something else is the worst outcome
        def refuse(key, why):
            raise ValueError(f"{where}: cannot run this model: `{key}` = {cfg.get(key)!r} ({why})")

        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" or archs != ["LlamaForCausalLM"]:
            key = "model_type" if cfg.get("model_type", "llama") != "llama" else "architectures"
            refuse(key, "only the Llama architecture (LlamaForCausalLM) is implemented")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key, False):
                refuse(key, "biases in attention/MLP projections are not implemented")
        if cfg.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "only SwiGLU with silu is implemented")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
                refuse(key, "a positive integer is required")
        # rope: older configs have `rope_theta` + `rope_scaling`, newer ones a single `rope_parameters`
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            refuse(rope_key, f"rope type {rope_type!r} is not implemented (only default and llama3)")
        scaling = None
        if rope_type == "llama3":
            need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in need if k not in rope]
            if missing:
                refuse(rope_key, f"llama3 rope scaling needs {missing}")
            scaling = {k: rope[k] for k in need}
        n_heads = cfg["num_attention_heads"]
        n_kv_heads = cfg.get("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            refuse("num_key_value_heads", f"must divide num_attention_heads = {n_heads}")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        if head_dim % 2:
            refuse("head_dim", "rotary embeddings need an even head dimension")
        return cls(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
            head_dim=head_dim, hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=scaling, max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), hf_config=dict(cfg))

    def to_hf_config(self, dtype: torch.dtype) -> dict:
        """The config.json to write: the original one (ids, extra keys) with our fields on top."""
        # the source's own keys (token ids, generation defaults) stay, so a trained folder reads like the original
        cfg = dict(self.hf_config)
        for stale in ("rope_parameters", "rope_scaling", "dtype", "torch_dtype", "transformers_version"):
            cfg.pop(stale, None)
        cfg.update({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling, rope_type="llama3") if self.rope_scaling else None,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
        })
        return cfg


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding (D/2,), with `llama3` scaling when configured."""
    D = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    if args.rope_scaling is None:
        return inv_freq.float()
    s = args.rope_scaling
    factor, lo, hi, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept,
    # and the band in between interpolates smoothly between the two
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return scaled.float()


# -----------------------------------------------------------------------------
# The Transformer


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back before the weight, as HF Llama does (matters for bf16 parity)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rotary(x, cos, sin):
    """Rotary embedding, x (B, T, H, D), cos/sin (B, T, 1, D)."""
    # HF checkpoints rotate the pairs (i, i + D/2) of each head ("rotate half"), not adjacent pairs (2i, 2i+1)
    # as the original Llama code and llama.cpp do; the two conventions differ by a permutation of the rows of
    # wq and wk, so a checkpoint read with the wrong one gives a model that runs but is quietly worse
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention(q, k, v, mask=None, backend="auto"):
    """Causal attention. q (B, T, H, D); k, v (B, S, Hkv, D) with S >= T, the last T keys aligned with q.

    `mask` (B, 1, T, S) bool, True = may attend, replaces the causal rule (used with the KV cache, where
    rows sit at different positions). backend: "auto" uses flash-attn when it is installed and the
    tensors are 16-bit on a GPU, otherwise SDPA; "flash" or "sdpa" forces one.
    """
    # flash-attn takes (B, T, H, D) and grouped heads as they are, but only 16-bit CUDA tensors, and it has no
    # arbitrary mask: it serves training and fresh prefills, SDPA everything that reads a cache under a mask
    flash_ok = flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and not flash_ok:
        raise RuntimeError("attention backend 'flash' needs the flash-attn package and 16-bit CUDA tensors")
    if backend == "flash" or (backend == "auto" and flash_ok and mask is None):
        if mask is not None:
            raise RuntimeError("the flash backend supports causal attention without an explicit mask only")
        return flash_attn_func(q, k, v, causal=True)  # GQA handled inside; (B, T, H, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, S, D)
    # grouped-query attention without repeating keys and values H / Hkv times in memory
    gqa = q.size(1) != k.size(1)
    if gqa and mask is not None and q.is_cuda:
        # SDPA's fused kernels on a GPU take a mask or grouped heads, not both, and would fall back to the math
        # kernel (the full attention matrix in memory): repeat the key/value heads instead (head j reads j // rep)
        rep = q.size(1) // k.size(1)
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if mask is None:
        # S > T without a mask would mean "continue after a prefix"; that case always passes a mask
        assert q.size(2) == k.size(2), (q.shape, k.shape)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)  # (B, T, H, D)


def free_memory():
    """Bytes of physical memory free now (Linux and most Unixes; elsewhere unbounded)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return float("inf")


def onednn_cpu(x, w):
    """Whether x @ w.T should run on oneDNN: a CPU, fp32 throughout, plain tensors, no autocast, not compiling.

    PyTorch's fp32 matmuls on a CPU go to MKL, which on some CPUs (AMD's among them) reaches 50-70% of what
    oneDNN's kernels do on the same machine (bench/RESULTS.md: 1.1-1.8x for training shapes, 1.5-2.5x for decode
    batches); the results differ only in rounding order."""
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and type(w.data) is torch.Tensor
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def onednn_linear(x, w):
    """x (..., K) @ w.T, w (N, K) a plain or oneDNN-prepacked weight (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """x @ w.T on oneDNN with its backward: d x = g @ w on oneDNN too, d w = g.T @ x as a plain matmul (faster
    there for the layers' shapes, measured)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return onednn_linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = onednn_linear(g, w.t()) if ctx.needs_input_grad[0] else None
        gw = g.reshape(-1, g.size(-1)).t() @ x.reshape(-1, x.size(-1)) if ctx.needs_input_grad[1] else None
        return gx, gw


class Linear(nn.Linear):
    """nn.Linear without bias (same parameter, same name) whose matmuls run on oneDNN on a CPU in fp32 (see
    `onednn_cpu`), on a copy of its weight prepacked for oneDNN while `Transformer.packed_for_cpu` lasts and no
    gradient is wanted."""

    packed = None

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        if not onednn_cpu(x, self.weight):
            return F.linear(x, self.weight)
        if not torch.is_grad_enabled():
            return onednn_linear(x, self.packed if self.packed is not None else self.weight)
        return OneDNNLinear.apply(x, self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer  # its index: which layer of a KV cache it reads and writes
        self.backend = "auto"  # "auto" | "flash" | "sdpa" (Transformer.attn_backend sets every layer's)
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)

    packed = None  # wq, wk and wv stacked and prepacked for oneDNN (Transformer.packed_for_cpu)

    def forward(self, x, cos, sin, cache=None):
        """x (B, T, dim). Without a cache, causal attention over these T tokens (training, full forwards);
        with one, the cache view stores this step's keys and values and attends as its layout says."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        # keys are rotated before they are cached: a cached key never needs its position again
        if self.packed is not None and not torch.is_grad_enabled():
            # one product for q, k and v and one rotation for q and k: at decode batch sizes each op's fixed cost
            # is a good part of its time
            qkv = onednn_linear(x, self.packed).view(B, T, H + 2 * Hkv, D)
            qk = apply_rotary(qkv[:, :, :H + Hkv], cos, sin)
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
        else:
            q = apply_rotary(self.wq(x).view(B, T, H, D), cos, sin)  # (B, T, H, D)
            k = apply_rotary(self.wk(x).view(B, T, Hkv, D), cos, sin)  # (B, T, Hkv, D)
            v = self.wv(x).view(B, T, Hkv, D)
        if cache is None:
            y = attention(q, k, v, backend=self.backend)
        else:
            y = cache.attend(self.layer, q, k, v, self.backend)
        return self.wo(y.reshape(B, T, -1))  # (B, T, H, D) -> (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)  # gate
        self.w3 = Linear(args.dim, args.hidden_dim)  # up
        self.w2 = Linear(args.hidden_dim, args.dim)  # down

    packed = None  # w1 and w3 stacked and prepacked for oneDNN (Transformer.packed_for_cpu)

    def forward(self, x):
        # SwiGLU: a silu-gated linear unit, w2(silu(w1 x) * w3 x)
        if self.packed is not None and not torch.is_grad_enabled():
            gate, up = onednn_linear(x, self.packed).chunk(2, dim=-1)  # one product for both
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, cache=None):
        # pre-norm residual block; the explicit arguments (no **kwargs) are what FSDP2, activation
        # checkpointing and torch.compile each see of a block
        x = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.activation_checkpointing = False  # recompute each block in backward (train_dpo.py sets it)
        self.logits_chunk = 1024  # rows of the log-prob head computed at once (see TargetLogps)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tie_embeddings:  # small models (SmolLM, Llama-3.2-1B) share the embedding with the head
            self.output.weight = self.tok_embeddings.weight
        # derived from the config, never stored in a checkpoint: not persistent, recomputed on every load
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def rope(self, positions, dtype):
        """cos/sin (B, T, 1, D) for integer positions (B, T)."""
        # in fp32 whatever the model's dtype, as HF does: a bf16 angle at position 3000 is off by whole radians
        angles = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # (B, T, 1, D): each half its own pair
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @property
    def attn_backend(self):
        return self.layers[0].attention.backend

    @attn_backend.setter
    def attn_backend(self, name):  # "auto" | "flash" | "sdpa": a switch for tests and ablations
        for block in self.layers:
            block.attention.backend = name

    def forward(self, tokens, targets=None, cache=None, last=None):
        """tokens (B, T) -> logits (B, T, V); or, with `targets` (B, T), their log-probs (B, T).

        cache: a view of a KV cache (see kvcache.py) that gives the tokens' positions, stores their keys and
        values and says what each attends to; without one the T tokens attend causally among themselves.
        last (B,): one position per row whose logits alone are wanted -> (B, V) (a prefill needs only the last
        prompt token's, and the other T-1 rows of the head would be most of its cost).
        Log-probs are computed `logits_chunk` rows at a time and only where a target is given (ids < 0 in
        `targets` give log-prob 0 and no head work); see `TargetLogps`.
        """
        B, T = tokens.shape
        # a cache view knows where each row's tokens sit (after its prompt, or interleaved with other samples)
        positions = torch.arange(T, device=tokens.device).expand(B, T) if cache is None else cache.positions
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos, sin = self.rope(positions, h.dtype)
        for layer in self.layers:
            # recompute each block in backward instead of keeping its activations; only when a backward will
            # follow (the reference pass and generation run without grad and keep nothing anyway)
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache)
        if last is not None:  # the norm and head act per position, so pick the positions first
            h = h[torch.arange(B, device=tokens.device), last]  # (B, dim)
        h = self.norm(h)
        if targets is None:
            return self.output(h).float()  # fp32 logits: sampling and log-softmax in 16 bits lose the tail
        return self._target_logps(h, targets)

    def _target_logps(self, h, targets):
        """Log-probs of `targets` (B, T) under the head; only the rows with a target (ids >= 0) reach the head."""
        B, T, D = h.shape
        targets = targets.reshape(B * T)
        # prompt and padding positions have no target: skipping them saves most of the head's work on pairs with
        # long prompts (judge pairs); finding them is a host sync, once per training forward
        keep = (targets >= 0).nonzero().squeeze(-1)
        lp = TargetLogps.apply(h.reshape(B * T, D)[keep], self.output.weight, targets[keep], self.logits_chunk,
                               self.activation_checkpointing)
        # scatter back: 0 where there was no target (its log-prob must not count, nor get a gradient)
        return torch.zeros(B * T, dtype=lp.dtype, device=h.device).index_copy(0, keep, lp).view(B, T)

    @contextlib.contextmanager
    def packed_for_cpu(self, enabled=True):
        """While it lasts, forwards without gradient run every linear layer (the head too) on a copy of its
        weight laid out for oneDNN's matrix multiply, on a CPU in fp32, the q/k/v and the w1/w3 weights stacked into
        one product each; elsewhere it changes nothing.

        At decode batch sizes (a few to a few hundred rows) the default fp32 path (MKL) reaches half or less of the
        machine's matmul throughput on some CPUs; the prepacked oneDNN kernels are 1.5-2.5x faster there
        (bench/RESULTS.md). The price: a second copy of the weights for the duration, and 0.4 s per 135M
        parameters to make it. The weights must not change meanwhile (generation only). Where the copy would take
        more than half of the memory the machine has free, nothing is packed (the plain weights still run on oneDNN)."""
        packs = {self.output: [self.output]}
        for m in self.modules():
            if isinstance(m, Attention):
                packs[m], packs[m.wo] = [m.wq, m.wk, m.wv], [m.wo]
            elif isinstance(m, FeedForward):
                packs[m], packs[m.w2] = [m.w1, m.w3], [m.w2]
        w = self.output.weight
        if not enabled or not onednn_cpu(w, w) or any(m.packed is not None for m in packs) \
                or 2 * sum(li.weight.numel() * li.weight.element_size() for ls in packs.values() for li in ls) \
                > free_memory():
            yield self
            return
        try:
            with torch.no_grad():
                for m, ls in packs.items():  # a tied head shares the embedding's weight: packed once more, as the head
                    stacked = torch.cat([li.weight.detach() for li in ls]) if len(ls) > 1 else ls[0].weight.detach()
                    m.packed = torch.ops.mkldnn._reorder_linear_weight(stacked, None)
            yield self
        finally:
            for m in packs:
                m.packed = None

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # -------------------------------------------------------------------------
    # HF checkpoint folders

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "Transformer":
        """Load an HF `LlamaForCausalLM` folder (one model.safetensors or an index with shards).

        dtype None keeps the stored dtype; device None is the CPU.
        """
        args = read_hf_config(path)
        # built on the meta device, so no memory is spent on a random initialisation that the checkpoint's
        # tensors replace anyway (assign=True adopts them as the parameters, in their device and dtype)
        with torch.device("meta"):
            model = cls(args)
        state = read_hf_state(path, model, device=device, dtype=dtype)
        model.load_state_dict(state, assign=True, strict=True)
        if args.tie_embeddings:  # assign=True replaced the Parameter objects: tie them again
            model.output.weight = model.tok_embeddings.weight
        model.inv_freq = rope_inv_freq(args).to(device)
        return model

    def save_pretrained(self, path, tokenizer_dir=None, max_shard_bytes=5 * 2**30):
        """Write an HF folder that `transformers` and vLLM load unchanged (see `save_hf`)."""
        save_hf(self.state_dict(), self.args, path, tokenizer_dir, max_shard_bytes)


def read_hf_config(path) -> ModelArgs:
    return ModelArgs.from_hf_config(_read_json(path, "config.json"), where=os.path.join(path, "config.json"))


def read_hf_state(path, model, device=None, dtype=None) -> dict:
    """The weights of an HF folder under our parameter names, checked against `model`'s (meta) shapes."""
    from safetensors import SafetensorError, safe_open

    args = model.args
    files = _weight_files(path)
    # every tensor is checked against the shape config.json implies before it is used: a wrong shape would
    # otherwise surface as a broadcasting error deep in a forward, or worse, not at all
    expected = {hf_name(k): p for k, p in model.state_dict(keep_vars=True).items()}
    if args.tie_embeddings:
        expected.pop("lm_head.weight")
    ours = {hf_name(k): k for k in model.state_dict()}
    state = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and args.tie_embeddings):
                        continue  # derived or duplicate tensors some writers store
                    if key not in expected:
                        raise ValueError(f"{f}: unexpected tensor {key!r} for a Llama model")
                    t = sf.get_tensor(key)
                    if tuple(t.shape) != tuple(expected[key].shape):
                        raise ValueError(f"{f}: tensor {key!r} has shape {tuple(t.shape)}, "
                                         f"config.json implies {tuple(expected[key].shape)}")
                    state[ours[key]] = t.to(device=device, dtype=dtype or t.dtype)  # one tensor in memory at a time
        except SafetensorError as e:  # a truncated or corrupt file: say which one
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - {hf_name(k) for k in state})
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def save_hf(state_dict, args: ModelArgs, path, tokenizer_dir=None, max_shard_bytes=5 * 2**30):
    """Write an HF folder from a full (unsharded) state dict under our names.

    Weights as safetensors (sharded above `max_shard_bytes`, a tied embedding stored once), config.json,
    and the tokenizer/generation files copied from `tokenizer_dir`. The folder is written under a
    temporary name and renamed at the end, so a killed save never leaves a folder that looks complete.
    """
    path = os.path.normpath(path)
    parent, base = os.path.split(os.path.abspath(path))
    for name in os.listdir(parent) if os.path.isdir(parent) else ():  # left by a save that was killed
        if name.startswith(f"{base}.tmp-") or name.startswith(f"{base}.old-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write_hf(state_dict, args, tmp, tokenizer_dir, max_shard_bytes)
    except Exception as e:  # disk full, a quota, a safetensors error: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise
        raise OSError(str(e)) from e
    # swap in: the old folder (if any) is moved aside first, then the new one takes its name
    old = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _write_hf(state_dict, args, tmp, tokenizer_dir, max_shard_bytes):
    from safetensors.torch import save_file

    os.makedirs(tmp)
    state = {}
    for k, t in state_dict.items():
        if k == "output.weight" and args.tie_embeddings:
            continue  # stored once, under the embedding's name, as HF does for tied models
        state[hf_name(k)] = t.detach().to("cpu").contiguous()
    # greedy sharding in the HF order of names; one file when it fits, else shards plus the index that maps
    # each tensor to its file (what transformers and vLLM read)
    shards, cur, cur_bytes = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k], cur_bytes = state[k], cur_bytes + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), args.to_hf_config(state["model.embed_tokens.weight"].dtype))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copy2(src, os.path.join(tmp, name))
    # safetensors creates its files readable by the owner only; a checkpoint is meant to be shared
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)


class TargetLogps(torch.autograd.Function):
    """log_softmax(h @ weight.T)[n, targets[n]] for rows h (N, D), `chunk` rows at a time, with a hand-written
    backward: d logp / d logits = onehot(target) - softmax. Forward keeps each chunk's fp32 logits for the
    backward (recompute=False) or only their log-sum-exp, recomputing the logits in backward (recompute=True,
    used with activation checkpointing). Either way no (N, V) log-softmax output or gradient of it is made on
    top of the logits, and the softmax is formed in place."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, recompute):
        # chunks of rows bound the fp32 logits alive at once to (chunk, V): at V = 128k a full (N, V) tensor
        # would be gigabytes for one batch
        out, lses, kept = [], [], []
        for i in range(0, h.size(0), chunk):
            logits = _wide(_head(h[i:i + chunk], weight))  # fp32 at least: a 16-bit log-softmax loses too much
            picked = logits.gather(-1, targets[i:i + chunk, None]).squeeze(-1)
            # the log-sum-exp with the exponentials formed in place (torch.logsumexp would make a second
            # (chunk, V) tensor): kept for the backward, exp(logits - max) / their sum is the softmax it needs
            top = logits.amax(-1, keepdim=True)
            e = logits.sub_(top).exp_()
            total = e.sum(-1, keepdim=True)
            lse = (total.log() + top).squeeze(-1)
            out.append(picked - lse)
            lses.append(lse)
            kept.append(None if recompute else (e, total))
        ctx.save_for_backward(h, weight, targets, torch.cat(lses) if lses else h.new_zeros(0, dtype=torch.float32))
        ctx.chunk, ctx.kept = chunk, kept
        # autograd runs backward outside the forward's autocast: remember it, so that the backward's matmuls (and
        # a recomputed logit) run in the same precision as the forward's, not in fp32
        device = h.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if device in ("cuda", "cpu") and \
            torch.is_autocast_enabled(device) else None
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        if ctx.autocast is None:
            return TargetLogps._backward(ctx, grad)
        with torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1]):
            return TargetLogps._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        h, weight, targets, lse = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = _wide(torch.zeros_like(weight)) if ctx.needs_input_grad[1] else None
        for c, i in enumerate(range(0, h.size(0), ctx.chunk)):
            hc, tc = h[i:i + ctx.chunk], targets[i:i + ctx.chunk]
            # log p(target) = logit[target] - lse, so d/d logits = onehot(target) - softmax; the upstream
            # gradient scales each row, and the chain rule through h @ weight.T gives grad_h and grad_w
            if ctx.kept[c] is not None:
                e, total = ctx.kept[c]
                p = e.div_(total)  # softmax, in place
            else:
                p = _wide(_head(hc, weight)).sub_(lse[i:i + ctx.chunk, None]).exp_()
            ctx.kept[c] = None  # freed as soon as its chunk is done
            p.scatter_add_(-1, tc[:, None], -torch.ones_like(p[:, :1]))  # softmax - onehot
            p = p.mul_(-_wide(grad[i:i + ctx.chunk, None])).to(h.dtype)  # d loss / d logits
            if grad_h is not None:
                grad_h[i:i + ctx.chunk] = _head(p, weight.t())  # p @ weight
            if grad_w is not None:
                # += p.T @ hc as a plain matmul, which reads p transposed where it lies (oneDNN would first copy
                # p.T into a new (V, chunk) tensor)
                if grad_w.dtype == p.dtype:
                    grad_w.addmm_(p.t(), hc)
                else:
                    grad_w += _wide(p.t() @ hc)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def _wide(x):
    """x in fp32, or as it is if wider (a float64 model's log-probs stay float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _head(x, w):
    """x @ w.T for the log-prob head and its backward (oneDNN where `onednn_cpu` says so)."""
    return onednn_linear(x, w) if onednn_cpu(x, w) else F.linear(x, w)


# Our parameter names -> HF Llama names. Layer index i is kept; only the leaf names change.
_HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight", "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_name(key: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if key.startswith("layers."):
        _, i, rest = key.split(".", 2)
        return f"model.layers.{i}.{_HF_NAMES[rest]}"
    return _HF_NAMES[key]


def _read_json(folder, name):
    f = os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if not os.path.exists(f):
        raise FileNotFoundError(f"{f}: missing (an HF checkpoint folder needs {name})")
    try:
        with open(f) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None


def _weight_files(path):
    # one model.safetensors, or the shards the index names (each must exist: a missing one is named)
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        index = _read_json(path, "model.safetensors.index.json")
        files = sorted(set(index.get("weight_map", {}).values()))
        for f in files:
            if not os.path.exists(os.path.join(path, f)):
                raise FileNotFoundError(f"{os.path.join(path, f)}: shard named in model.safetensors.index.json is missing")
        return [os.path.join(path, f) for f in files]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _write_json(f, obj):
    with open(f, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Inspect an HF Llama checkpoint folder.")
    parser.add_argument("--model", required=True, help="HF checkpoint folder")
    cli = parser.parse_args()
    t0 = time.time()
    m = Transformer.from_pretrained(cli.model)
    print(m.args)
    print(f"{m.num_params() / 1e6:.1f}M parameters, loaded in {time.time() - t0:.1f}s")
