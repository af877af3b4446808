"""The model, the engine and the training math on the device named by TEST_DEVICE (default cpu), in fp32 and
bf16, against float64 references on the CPU. On a GPU node: `TEST_DEVICE=cuda pytest tests/test_device.py`
(bench/gpu.sh runs it; `python bench/minitest.py tests/test_device.py` where pytest is missing; TEST_COMPILE=0
skips the compiled decode where torch.compile cannot build kernels). bf16 on this CPU is slow, so the models
are tiny.

Greedy tokens are checked against the reference allowing near-ties only: where the engine's token is not the
reference's argmax, the two reference logits must be within the dtype's tolerance. Exact equality of tokens is
asked only of fp32 on the CPU, where the same rows give the same bits whatever the batch; a GPU's kernels may
pick another reduction order for another batch shape or a compiled graph, which moves a near-tie."""
import copy
import os

import pytest
import torch
from conftest import tiny_model

from sample import Request, complete
from train_dpo import collate_pairs, pair_logps, preference_loss, sequence_logps

DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
EXACT = DEVICE.type == "cpu"  # fp32 results independent of the batch's shape, bit for bit (see the docstring)
DTYPES = [torch.float32, torch.bfloat16]
LOGIT_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.25}  # tiny models' logits are O(1-10)


def on_device(model, dtype):
    return copy.deepcopy(model).to(DEVICE, dtype)


def check_greedy(ref, prompt, tokens, tol):
    """Every token is the float64 reference's argmax after prompt + the tokens before it, or a near-tie."""
    seq = torch.tensor(prompt + tokens, dtype=torch.long)
    with torch.no_grad():
        logits = ref(seq[None])[0, len(prompt) - 1:-1]  # (T_new, V): the logits each new token was picked from
    for s, t in enumerate(tokens):
        gap = (logits[s].max() - logits[s, t]).item()
        assert gap <= tol, f"step {s}: token {t} is {gap:.4f} below the reference's best"


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_decoding_matches_a_float64_full_forward(dtype):
    base = tiny_model(seed=3)
    model, ref = on_device(base, dtype), copy.deepcopy(base).double()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    reqs = [Request(prompt=p, temperature=0.0, max_new_tokens=12) for p in prompts]
    for p, (c,) in zip(prompts, complete(model, reqs, max_rows=4)):
        assert len(c.tokens) == 12
        check_greedy(ref, p, c.tokens, LOGIT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_request_does_not_depend_on_its_batch(dtype):
    # alone, or decoded beside others (other shapes, shared-prefix groups): the same tokens up to a near-tie
    base = tiny_model(seed=4)
    model, ref = on_device(base, dtype), copy.deepcopy(base).double()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 97, (6,), generator=g).tolist()
    others = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (2, 9, 13)]
    alone = complete(model, [Request(prompt=prompt, temperature=0.0, max_new_tokens=10)])[0][0].tokens
    batch = [Request(prompt=p, temperature=0.0, max_new_tokens=10, n=2) for p in others]
    together = complete(model, batch + [Request(prompt=prompt, temperature=0.0, max_new_tokens=10)], max_rows=8)[-1][0].tokens
    for tokens in (alone, together):
        check_greedy(ref, prompt, tokens, LOGIT_TOL[dtype])
    if dtype == torch.float32 and EXACT:
        assert alone == together


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiling the decode step is for GPUs (the CPU check is in test_sample)")
@pytest.mark.skipif(os.environ.get("TEST_COMPILE") == "0", reason="TEST_COMPILE=0: torch.compile cannot build kernels here")
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_decode_matches_float64(dtype):
    # compiled and eager may break a near-tie differently (fused kernels round differently): each is checked
    # against the float64 reference instead of against the other
    base = tiny_model(seed=5)
    model, ref = on_device(base, dtype), copy.deepcopy(base).double()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    reqs = [Request(prompt=p, temperature=0.0, max_new_tokens=16) for p in prompts]
    for p, (c,) in zip(prompts, complete(model, reqs, max_rows=4, compile=True)):
        assert len(c.tokens) == 16
        check_greedy(ref, p, c.tokens, LOGIT_TOL[dtype])


def naive_logps(model, tokens, mask):
    """float64 reference: log-softmax of a full forward, gathered at each next token, summed over the mask."""
    logits = model(tokens[:, :-1]).double().log_softmax(-1)
    picked = logits.gather(-1, tokens[:, 1:, None])[..., 0]
    return (picked * mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_logps_and_gradients_against_float64(dtype):
    # training keeps fp32 master weights; bf16 is autocast compute, as train_dpo.py does on one GPU
    base = tiny_model(seed=6, std=0.05)
    model, ref = on_device(base, torch.float32).train(), copy.deepcopy(base).double().train()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 97, (3, 14), generator=g)
    mask = torch.zeros(3, 14, dtype=torch.long)
    mask[0, 4:14], mask[1, 2:9], mask[2, 10:12] = 1, 1, 1
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got, n = sequence_logps(model, tokens.to(DEVICE), mask.to(DEVICE))
    want = naive_logps(ref, tokens, mask)
    assert n.tolist() == [10, 7, 2]
    rel = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert torch.allclose(got.double().cpu(), want, rtol=rel, atol=rel)
    (got * torch.tensor([1.0, -0.5, 2.0], device=DEVICE)).sum().backward()
    (want * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        err = (p.grad.double().cpu() - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
        assert err < {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype], f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_pair_logps_and_gradients_against_float64(dtype):
    # what training runs: each pair one row (the prompt once, a masked attention with grouped heads, which a GPU
    # serves with another SDPA kernel than the CPU), against plain float64 forwards of prompt + each response
    base = tiny_model(seed=7, std=0.05)
    model, ref = on_device(base, torch.float32).train(), copy.deepcopy(base).double().train()
    g = torch.Generator().manual_seed(4)
    rand = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt": rand(p), "responses": [rand(c), rand(r)]} for p, c, r in ((7, 5, 3), (1, 2, 1), (4, 9, 6))]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        chosen, rejected, n_c, n_r = pair_logps(model, collate_pairs(examples, [0, 1, 2], DEVICE))
    got = torch.stack([chosen, rejected], 1).flatten()
    assert n_c.tolist() == [5, 2, 9] and n_r.tolist() == [3, 1, 6]
    want = []
    for ex in examples:
        for resp in ex["responses"]:
            seq = torch.tensor([ex["prompt"] + resp])
            mask = torch.zeros_like(seq)
            mask[0, len(ex["prompt"]):] = 1
            want.append(naive_logps(ref, seq, mask)[0])
    want = torch.stack(want)
    rel = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert torch.allclose(got.double().cpu(), want, rtol=rel, atol=rel)
    scale = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.0, 0.7], dtype=torch.float64)
    (got * scale.to(DEVICE, got.dtype)).sum().backward()
    (want * scale).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        err = (p.grad.double().cpu() - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
        assert err < {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype], f"{name}: relative gradient error {err:.2e}"


def test_preference_loss_on_the_device_matches_closed_form():
    # sigmoid DPO with beta 0.5: margins (2 - 1) - (1 - 0.5) = 0.5 and (0 - 1) - (1 - 0) = -2
    t = lambda *x: torch.tensor(x, device=DEVICE)  # noqa: E731
    losses, rc, rr = preference_loss(t(2.0, 0.0), t(1.0, 1.0), t(1.0, 1.0), t(0.5, 0.0), t(4, 4), t(4, 4),
                                     t(1.0, 1.0), "sigmoid", 0.5, 0.0, 0.0)
    want = torch.nn.functional.softplus(-0.5 * torch.tensor([0.5, -2.0], dtype=torch.float64))
    assert losses.device.type == DEVICE.type and torch.allclose(losses.double().cpu(), want, atol=1e-6)
