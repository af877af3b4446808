"""Device placement without a GPU: the model, every KV-cache view, decoding and a DPO training step run with
every tensor on the `meta` device (shapes and devices only, no data). A tensor made on the default device
(a `torch.arange(T)` without `device=`) meets a meta tensor and raises here, as it would meet a CUDA tensor
on a GPU node. (`FakeTensorMode` on "cuda" cannot stand in on a CPU-only build of PyTorch: its indexing and
autograd ask for a CUDA device guard and abort.)"""
import pytest
import torch
import torch.fx.experimental._config  # noqa: F401
from conftest import tiny_args

from model import Transformer
from sample import KVCache, decode_one_token
from train_dpo import collate_pairs, pair_logps, preference_loss, sequence_logps

META = torch.device("meta")


def meta_model(**kw):
    with META:
        return Transformer(tiny_args(**kw))


def ints(*shape, fill=1):
    return torch.full(shape, fill, dtype=torch.long, device=META)


def test_mixing_a_default_device_tensor_fails_here():
    # what the test relies on: a CPU tensor (what a GPU node would get from a missing device=) next to a meta one
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.arange(5) + torch.zeros(5, device=META)


def test_inference_paths_keep_to_the_model_device():
    model = meta_model().eval()
    cache = KVCache.for_model(model, slots=3, max_len=40)
    assert cache.device == META and all(t.device == META for t in cache.k + cache.v)
    with torch.no_grad():
        out = model(ints(2, 9), cache=cache.fresh(ints(2, fill=0) + torch.arange(2, device=META), 9))  # prefill
        assert out.device == META and out.shape == (2, 9, 97)
        view = cache.extend(ints(2, fill=0), ints(2, fill=9), 1, 10)  # one more token per sequence
        assert model(ints(2, 1), cache=view).shape == (2, 1, 97)
        # grouped: 3 sequences sharing 2 prompt slots (stride 3), one idle sequence on the scratch slot
        view = cache.grouped(ints(4, fill=0), ints(4, fill=0), ints(4, fill=6), ints(4, fill=0), 1, 3, 2, 12)
        assert model(ints(4, 1), cache=view).shape == (4, 1, 97)
        assert model(ints(2, 7)).shape == (2, 7, 97)  # a plain forward
        assert model(ints(2, 7), last=ints(2, fill=6)).device == META
        logits = decode_one_token(model, ints(2), cache.extend(ints(2, fill=0), ints(2, fill=10), 1, 11))
        assert logits.device == META and logits.shape == (2, 97)


# the log-prob head skips positions without a target (a nonzero); meta tensors have no values to count
NONZERO_ON_META = torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True)


@NONZERO_ON_META
def test_a_dpo_step_keeps_to_the_model_device():
    model = meta_model()
    tokens, mask = ints(4, 12), ints(4, 12)  # 2 pairs: chosen rows, then rejected rows
    logps, lengths = sequence_logps(model, tokens, mask)
    assert logps.device == META and lengths.device == META
    zeros = torch.zeros(2, device=META)
    losses, rc, rr = preference_loss(logps[:2], logps[2:], zeros, zeros, lengths[:2], lengths[2:],
                                     torch.ones(2, device=META), "sigmoid", 0.1, 0.0, 1.0)
    losses.sum().backward()
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    opt.step()
    assert all(s["exp_avg"].device == META for s in opt.state.values())


@NONZERO_ON_META
def test_a_packed_pair_step_keeps_to_the_model_device():
    # what training runs: one row per pair and its branch mask (train_dpo.SharedPromptView), built on the device
    model = meta_model()
    examples = [{"prompt": [5, 6, 7], "responses": [[8, 9], [10]]}, {"prompt": [11], "responses": [[12, 13, 14], [15, 16]]}]
    batch = collate_pairs(examples, [0, 1], META)
    assert batch["tokens"].device == META and batch["view"].mask.device == META
    chosen, rejected, n_c, n_r = pair_logps(model, batch)
    assert {t.device for t in (chosen, rejected, n_c, n_r)} == {META}
    (chosen - rejected).sum().backward()
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())
