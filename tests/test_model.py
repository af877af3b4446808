"""model.py against a naive float64 Llama written here, the KV cache against full forwards, checkpoints."""
import json
import math
import os

import pytest
import torch
from conftest import tiny_args, tiny_model

from model import ModelArgs, Transformer, hf_name

# -----------------------------------------------------------------------------
# A naive float64 reference: explicit loops over heads, repeated KV heads, complex-number rotary,
# hand-written softmax. It shares no code with model.py.


def naive_inv_freq(args):
    D = args.head_dim
    freqs = []
    for i in range(D // 2):
        f = 1.0 / args.rope_theta ** (2 * i / D)
        s = args.rope_scaling
        if s:
            wavelen = 2 * math.pi / f
            lo_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
            hi_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
            if wavelen > lo_wavelen:  # low frequency: slowed by the factor
                f = f / s["factor"]
            elif wavelen >= hi_wavelen:  # in between: blend
                a = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                    s["high_freq_factor"] - s["low_freq_factor"])
                f = (1 - a) * f / s["factor"] + a * f
        freqs.append(f)
    return torch.tensor(freqs, dtype=torch.float64)


def naive_rotary(x, pos, inv_freq):
    """x (H, D) at one position: rotate pairs (i, i + D/2) as complex numbers."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(inv_freq), pos * inv_freq)
    return torch.cat([z.real, z.imag], dim=-1)


def naive_logits(model, tokens):
    args = model.args
    P = {k: v.double() for k, v in model.state_dict().items()}
    inv_freq = naive_inv_freq(args)
    rep = args.n_heads // args.n_kv_heads

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + args.norm_eps)

    out = []
    for seq in tokens.tolist():
        T = len(seq)
        h = P["tok_embeddings.weight"][seq]  # (T, dim)
        for i in range(args.n_layers):
            pre = f"layers.{i}."
            x = rms(h, P[pre + "attention_norm.weight"])
            q = (x @ P[pre + "attention.wq.weight"].T).view(T, args.n_heads, args.head_dim)
            k = (x @ P[pre + "attention.wk.weight"].T).view(T, args.n_kv_heads, args.head_dim)
            v = (x @ P[pre + "attention.wv.weight"].T).view(T, args.n_kv_heads, args.head_dim)
            q = torch.stack([naive_rotary(q[t], t, inv_freq) for t in range(T)])
            k = torch.stack([naive_rotary(k[t], t, inv_freq) for t in range(T)])
            k = k.repeat_interleave(rep, dim=1)  # query head j uses key head j // rep
            v = v.repeat_interleave(rep, dim=1)
            y = torch.zeros(T, args.n_heads, args.head_dim, dtype=torch.float64)
            for hd in range(args.n_heads):
                for t in range(T):
                    scores = torch.tensor([q[t, hd] @ k[s, hd] / math.sqrt(args.head_dim) for s in range(t + 1)])
                    w = torch.exp(scores - scores.max())
                    w = w / w.sum()
                    y[t, hd] = (w[:, None] * v[: t + 1, hd]).sum(0)
            h = h + y.reshape(T, -1) @ P[pre + "attention.wo.weight"].T
            x = rms(h, P[pre + "ffn_norm.weight"])
            g = x @ P[pre + "feed_forward.w1.weight"].T
            h = h + ((g / (1 + torch.exp(-g))) * (x @ P[pre + "feed_forward.w3.weight"].T)) @ P[pre + "feed_forward.w2.weight"].T
        h = rms(h, P["norm.weight"])
        out.append(h @ P["output.weight"].T)
    return torch.stack(out)


LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("kw", [
    dict(),  # grouped-query attention 4 query / 2 key-value heads, untied
    dict(tie_embeddings=True),
    dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    dict(head_dim=12),  # explicit head_dim: n_heads * head_dim != dim
    dict(n_kv_heads=1, head_dim=16, tie_embeddings=True),  # multi-query
], ids=["gqa", "tied", "llama3-rope", "head-dim", "mqa-tied"])
def test_logits_match_naive_float64(kw):
    """Guards against rotary convention (interleaved vs rotate-half), GQA head mapping, llama3 scaling bugs."""
    torch.manual_seed(0)
    model = tiny_model(**kw)
    tokens = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        got = model(tokens)
    want = naive_logits(model, tokens)
    assert got.shape == (2, 19, 97)
    assert (got.double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=True)], ids=["gqa", "tied"])
def test_packed_cpu_weights_match_naive_float64(kw):
    """Forwards on the oneDNN-prepacked weights (what generation uses on a CPU: q/k/v and w1/w3 stacked into one
    weight each) are as close to float64 as the plain ones, also for 1, 7 and 64 rows (the kernels differ by
    batch size); with a gradient wanted they use the parameters themselves, and after the context nothing
    packed is left."""
    torch.manual_seed(0)
    model = tiny_model(**kw)
    linears = [m for m in model.modules() if type(m).__name__ == "Linear"]
    assert len(linears) == 7 * model.args.n_layers + 1
    # what gets a packed weight: per layer the attention (q|k|v), wo, the feed-forward (w1|w3) and w2; the head
    blocks = [m for b in model.layers for m in (b.attention, b.attention.wo, b.feed_forward, b.feed_forward.w2)]
    packable = blocks + [model.output]
    stacked = {b.attention: (b.attention.wq, b.attention.wk, b.attention.wv) for b in model.layers}
    stacked.update({b.feed_forward: (b.feed_forward.w1, b.feed_forward.w3) for b in model.layers})
    everything = linears + list(stacked)
    for rows in (1, 7, 64):
        tokens = torch.randint(0, 97, (rows, 5))
        want = naive_logits(model, tokens)
        with model.packed_for_cpu(), torch.no_grad():
            assert all(m.packed is not None for m in packable)
            assert all(m.packed is None for m in everything if m not in packable)  # no second copy of stacked ones
            got = model(tokens)
        assert (got.double() - want).abs().max().item() <= 1e-5
    assert all(m.packed is None for m in everything)
    with model.packed_for_cpu():
        for m in packable:  # a planted wrong packed weight: a forward with grad must not read it
            w = torch.cat([li.weight for li in stacked[m]]) if m in stacked else m.weight
            m.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(w), None)
        out = model(tokens)
        out.sum().backward()
    assert (out.detach().double() - want).abs().max().item() <= 1e-5
    assert model.layers[0].attention.wq.weight.grad is not None
    assert all(m.packed is None for m in everything)
    import model as model_py
    real = model_py.free_memory
    model_py.free_memory = lambda: 1000  # a machine without room for a second copy of the weights: no copy
    try:
        with model.packed_for_cpu(), torch.no_grad():
            assert all(m.packed is None for m in everything)
            assert (model(tokens).double() - want).abs().max().item() <= 1e-5
    finally:
        model_py.free_memory = real
    bf16 = tiny_model(**kw).to(torch.bfloat16)
    with bf16.packed_for_cpu(), model.packed_for_cpu(enabled=False):  # only fp32 on a CPU, and only when asked
        assert all(getattr(m, "packed", None) is None for m in bf16.modules())
        assert all(m.packed is None for m in everything)


def test_llama3_scaling_changes_frequencies():
    """The scaled inverse frequencies differ from the plain ones only at low frequencies, as the rule says."""
    from model import rope_inv_freq
    plain = rope_inv_freq(tiny_args(head_dim=32, rope_theta=500000.0))
    scaled = rope_inv_freq(tiny_args(head_dim=32, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE))
    assert torch.allclose(plain[0], scaled[0])  # highest frequency untouched
    assert torch.allclose(plain[-1] / 8.0, scaled[-1])  # lowest slowed by the factor
    torch.testing.assert_close(scaled.double(), naive_inv_freq(tiny_args(head_dim=32, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept-logits", "recomputed-logits"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_target_logps_equal_full_log_softmax_with_grads(recompute, tied):
    """The chunked log-prob head with its hand-written backward must equal log_softmax of the full logits:
    values, and gradients of every parameter under an arbitrary upstream gradient."""
    torch.manual_seed(3)
    model = tiny_model(tie_embeddings=tied).train()
    model.activation_checkpointing = recompute  # also recomputes the head's logits in backward
    tokens = torch.randint(0, 97, (3, 11))
    targets = torch.randint(0, 97, (3, 11))
    targets[0, :4] = -100  # ignored positions give 0
    targets[2, 9:] = -1
    upstream = torch.randn(3, 11)
    model.logits_chunk = 5
    lp = model(tokens, targets=targets)
    (lp * upstream).sum().backward()
    g_chunk = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = False
    full = torch.log_softmax(model(tokens).double(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    full = torch.where(targets >= 0, full, 0.0)
    (full * upstream).sum().backward()
    assert (lp - full).abs().max().item() < 1e-5
    assert lp[0, :4].abs().max().item() == 0.0 and lp[2, 9:].abs().max().item() == 0.0
    for g, p in zip(g_chunk, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5), (g - p.grad).abs().max()


# -----------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("tied,shard", [(False, None), (True, None), (False, 20_000)], ids=["untied", "tied", "sharded"])
def test_save_then_load_is_bit_exact(tmp_path, tied, shard):
    model = tiny_model(tie_embeddings=tied, seed=4)
    kw = {} if shard is None else {"max_shard_bytes": shard}
    model.save_pretrained(tmp_path / "ckpt", **kw)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    if shard:
        assert "model.safetensors.index.json" in files and sum(f.startswith("model-0") for f in files) > 1
    back = Transformer.from_pretrained(str(tmp_path / "ckpt"))
    for (k, p), (k2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(p, p2), k
    if tied:
        assert back.output.weight is back.tok_embeddings.weight
        from safetensors import safe_open
        with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # stored once
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens), back(tokens))


def test_save_overwrites_atomically(tmp_path):
    """A second save to the same folder replaces it; no temporary folders are left behind."""
    tiny_model(seed=5).save_pretrained(tmp_path / "ckpt")
    m2 = tiny_model(seed=6)
    m2.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    back = Transformer.from_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(back.output.weight, m2.output.weight)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True, rope_scaling=LLAMA3_ROPE, head_dim=12)], ids=["plain", "tied-llama3-headdim"])
def test_saved_checkpoint_loads_in_transformers(tmp_path, kw):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(seed=7, **kw)
    model.save_pretrained(tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
    tokens = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)).abs().max().item()
    assert diff < 1e-5


def write_folder(tmp_path, cfg_changes=None, drop=None, reshape=None):
    model = tiny_model(seed=8)
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    if cfg_changes:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(cfg_changes)
        (d / "config.json").write_text(json.dumps(cfg))
    if drop or reshape:
        from safetensors.torch import load_file, save_file
        sd = load_file(str(d / "model.safetensors"))
        if drop:
            sd.pop(drop)
        if reshape:
            sd[reshape] = sd[reshape][:-1].contiguous()
        save_file(sd, str(d / "model.safetensors"))
    return str(d)


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["MistralForCausalLM"]}, "`architectures`"),
    ({"model_type": "qwen2"}, "`model_type`"),
    ({"attention_bias": True}, "`attention_bias`"),
    ({"mlp_bias": True}, "`mlp_bias`"),
    ({"hidden_act": "gelu"}, "`hidden_act`"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "`rope_parameters`"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling needs"),
    ({"num_key_value_heads": 3}, "`num_key_value_heads`"),
])
def test_refused_configs_name_the_field(tmp_path, change, message):
    d = write_folder(tmp_path, cfg_changes=change)
    with pytest.raises(ValueError, match=message) as e:
        Transformer.from_pretrained(d)
    assert "config.json" in str(e.value)


def test_rope_parameters_key_is_accepted():
    """Newer configs carry rope_theta and scaling inside `rope_parameters`."""
    a = ModelArgs.from_hf_config({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "vocab_size": 10,
                                  "rope_parameters": dict(LLAMA3_ROPE, rope_type="llama3", rope_theta=5e5)})
    assert a.rope_theta == 5e5 and a.rope_scaling == LLAMA3_ROPE and a.n_kv_heads == 4 and a.head_dim == 8


def test_broken_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        Transformer.from_pretrained(str(tmp_path / "nope"))
    d = write_folder(tmp_path)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        Transformer.from_pretrained(d)
    d = write_folder(tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(d)
    d = write_folder(tmp_path, reshape="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"up_proj.weight' has shape \(63, 32\), config.json implies \(64, 32\)"):
        Transformer.from_pretrained(d)
    d = write_folder(tmp_path, drop="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        Transformer.from_pretrained(d)
    d = write_folder(tmp_path)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        Transformer.from_pretrained(d)


def test_missing_shard_named(tmp_path):
    model = tiny_model(seed=9)
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=20_000)
    shard = sorted(f for f in os.listdir(tmp_path / "ckpt") if f.startswith("model-0"))[1]
    os.remove(tmp_path / "ckpt" / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        Transformer.from_pretrained(str(tmp_path / "ckpt"))


def test_hf_names_cover_every_parameter():
    names = {hf_name(k) for k in tiny_model().state_dict()}
    assert "model.layers.1.self_attn.o_proj.weight" in names and "lm_head.weight" in names
    assert len(names) == len(tiny_model().state_dict())


# -----------------------------------------------------------------------------
# GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_flash_and_sdpa_agree_in_bf16():
    pytest.importorskip("flash_attn")
    model = tiny_model(dim=256, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512).cuda().to(torch.bfloat16)
    tokens = torch.randint(0, 97, (2, 128), device="cuda")
    with torch.no_grad():
        model.attn_backend = "flash"
        a = model(tokens)
        model.attn_backend = "sdpa"
        b = model(tokens)
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()


def test_log_prob_head_backward_keeps_the_forwards_precision():
    """The hand-written head backward ran outside the forward's autocast: under bf16 autocast with the logits
    recomputed (activation checkpointing) it mixed fp32 logits with a bf16 log-sum-exp, and its gradient was
    about twice as far from float64 as with the logits kept. Both must be as close as bf16 allows."""
    from model import TargetLogps
    g = torch.Generator().manual_seed(0)
    h64, w64 = torch.randn(64, 32, generator=g, dtype=torch.float64), torch.randn(500, 32, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 500, (64,), generator=g)
    up = torch.randn(64, generator=g, dtype=torch.float64)

    def grads(dtype, recompute, autocast):
        h, w = (x.detach().to(dtype).clone().requires_grad_() for x in (h64, w64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp = TargetLogps.apply(h, w, targets, 16, recompute)
        (lp.double() * up).sum().backward()
        return h.grad.double(), w.grad.double()

    ref = grads(torch.float64, False, False)
    err = lambda got: max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))  # noqa: E731
    kept, recomputed = err(grads(torch.float32, False, True)), err(grads(torch.float32, True, True))
    assert kept < 0.05 and recomputed < 1.3 * kept, (kept, recomputed)
    assert err(grads(torch.float32, True, False)) < 1e-5  # without autocast: fp32 throughout
