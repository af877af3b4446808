"""The generation engine of sample.py against plain full-forward decoding, and its batching invariants."""
import pytest
import torch
from conftest import tiny_model

from sample import KVCache, Request, complete, plan_cache, sample_next_token, uniform_from_keys


def greedy_reference(model, prompt, max_new, stop_ids=()):
    """Greedy decoding by repeated full forward passes, no cache: the independent reference."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = model(torch.tensor([seq]))[0, -1].argmax().item()
            if nxt in stop_ids:
                return out, "stop"
            out.append(nxt)
            seq.append(nxt)
    return out, "length"


def prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (L,), generator=g).tolist() for L in lengths]


@pytest.mark.parametrize("max_rows", [1, 3, 16])
def test_greedy_equals_full_forward_decoding_mixed_lengths(max_rows):
    """Guards the per-row positions, the ragged prefill, slot reuse and tail compaction of the engine."""
    model = tiny_model(seed=11)
    ps = prompts(0, [3, 11, 6, 1, 17, 8])
    reqs = [Request(p, n=1, temperature=0.0, max_new_tokens=9 + i) for i, p in enumerate(ps)]
    out = complete(model, reqs, max_rows=max_rows)
    for p, r, comps in zip(ps, reqs, out):
        want, _ = greedy_reference(model, p, r.max_new_tokens)
        assert comps[0].tokens == want
        assert comps[0].finish_reason == "length" and len(comps[0].tokens) == r.max_new_tokens


def test_stop_tokens_end_each_row_on_its_own():
    model = tiny_model(seed=12)
    ps = prompts(1, [4, 9, 5, 12])
    # pick as stop token the 3rd greedy token of each prompt's reference, so every row stops early
    stops = []
    for p in ps:
        ref, _ = greedy_reference(model, p, 6)
        stops.append(ref[2])
    reqs = [Request(p, temperature=0.0, max_new_tokens=20, stop_ids=(s,)) for p, s in zip(ps, stops)]
    out = complete(model, reqs, max_rows=4)
    for p, s, comps in zip(ps, stops, out):
        want, reason = greedy_reference(model, p, 20, stop_ids=(s,))
        assert comps[0].tokens == want and comps[0].finish_reason == reason == "stop"
        assert s not in comps[0].tokens


def test_output_does_not_depend_on_batch_company():
    """A request's samples (greedy and random) are the same alone, in a crowd, and with other row limits."""
    model = tiny_model(seed=13)
    ps = prompts(2, [5, 14, 3, 9, 7])
    mk = lambda p, i: Request(p, n=3, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=100 + i)
    crowd = complete(model, [mk(p, i) for i, p in enumerate(ps)], max_rows=5)
    for i, p in enumerate(ps):
        alone = complete(model, [mk(p, i)], max_rows=2)[0]
        assert [c.tokens for c in alone] == [c.tokens for c in crowd[i]]
    again = complete(model, [mk(p, i) for i, p in enumerate(ps)], max_rows=16)
    assert [[c.tokens for c in r] for r in again] == [[c.tokens for c in r] for r in crowd]
    # different samples of one request differ (same prompt, shared prefix, independent streams)
    assert len({tuple(c.tokens) for c in crowd[1]}) > 1


def test_seed_changes_samples():
    model = tiny_model(seed=14)
    p = prompts(3, [6])[0]
    a = complete(model, [Request(p, n=2, temperature=1.0, max_new_tokens=10, seed=1)])[0]
    b = complete(model, [Request(p, n=2, temperature=1.0, max_new_tokens=10, seed=2)])[0]
    assert [c.tokens for c in a] != [c.tokens for c in b]


def test_logprobs_match_full_forward():
    model = tiny_model(seed=15)
    p = prompts(4, [7])[0]
    comp = complete(model, [Request(p, n=2, temperature=1.0, max_new_tokens=6, seed=3, logprobs=True)])[0]
    for c in comp:
        seq = torch.tensor([p + c.tokens])
        with torch.no_grad():
            full = torch.log_softmax(model(seq)[0], -1)
        want = [full[len(p) - 1 + t, tok].item() for t, tok in enumerate(c.tokens)]
        assert max(abs(a - b) for a, b in zip(c.logprobs, want)) < 1e-5


def test_sample_next_token_distribution_and_truncation():
    """Inverse-CDF sampling: empirical frequencies match the softmax; top-p / top-k cut the tail."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    keys = torch.arange(20000, dtype=torch.long)
    u = uniform_from_keys(keys, torch.zeros_like(keys))
    one = torch.ones(20000)
    tok = sample_next_token(logits, one, one, torch.zeros(20000, dtype=torch.long), u)
    freq = torch.bincount(tok, minlength=4).float() / 20000
    assert (freq - torch.softmax(logits[0], -1)).abs().max() < 0.015
    p = torch.softmax(logits[0], -1)  # 0.644, 0.237, 0.087, 0.032
    tok = sample_next_token(logits, one, torch.full((20000,), 0.85), torch.zeros(20000, dtype=torch.long), u)
    assert set(tok.tolist()) == {0, 1}  # mass before token 2 is 0.881 >= 0.85
    freq = torch.bincount(tok, minlength=4).float() / 20000
    assert abs(freq[0] - p[0] / (p[0] + p[1])) < 0.015
    # a caller that knows no row is greedy spares the argmax: the same draws
    assert torch.equal(sample_next_token(logits, one, torch.full((20000,), 0.85), torch.zeros(20000, dtype=torch.long), u,
                                         any_greedy=False), tok)
    tok = sample_next_token(logits, one, one, torch.ones(20000, dtype=torch.long), u)
    assert set(tok.tolist()) == {0}
    greedy = sample_next_token(logits[:3], torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.long), u[:3])
    assert greedy.tolist() == [0, 0, 0]


def test_budget_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        complete(model, [Request([1] * 250, max_new_tokens=10)])
    with pytest.raises(ValueError, match="max-cache-tokens"):
        complete(model, [Request([1] * 20, max_new_tokens=10)], max_cache_tokens=16)


def test_truncated_candidates_equal_full_sort():
    """The top-k shortcut for top-p must pick exactly what a full sort would, also for flat distributions
    whose nucleus is larger than the shortcut's candidate set."""
    g = torch.Generator().manual_seed(0)
    # nuclei of (median) 11 tokens, 257 (past the first round's 128 candidates), 1185 (past the second's 1024),
    # 4492 of 5000 (nearly uniform), and all four kinds of rows in one batch (each row leaves at its own round)
    mixed = torch.tensor([5.0, 3.0, 2.0, 0.01]).repeat(16)[:, None]
    for scale in (5.0, 3.0, 2.0, 0.01, mixed):
        logits = torch.randn(64, 5000, generator=g) * scale
        u = uniform_from_keys(torch.arange(64), torch.zeros(64, dtype=torch.long))
        u[:4] = 1.0  # a uniform rounded up to 1 in fp32 still picks within the nucleus (its last token)
        one, tp = torch.ones(64), torch.full((64,), 0.9)
        got = sample_next_token(logits, one, tp, torch.zeros(64, dtype=torch.long), u)
        # reference: full sort, written out plainly
        want = []
        for r in range(64):
            p = torch.softmax(logits[r].double(), -1)
            ps, idx = p.sort(descending=True)
            before = ps.cumsum(0) - ps
            kept = ps[before < 0.9]
            cdf = kept.cumsum(0) / kept.sum()
            want.append(idx[min(int((cdf < u[r].double()).sum()), len(kept) - 1)].item())
        assert got.tolist() == want


def test_shared_prefix_gives_same_outputs():
    """Prompts sharing a prefix (meta-judge battles) prefill it once; outputs equal separate prefills,
    greedy against the no-cache reference and sampled against the unshared engine run."""
    model = tiny_model(seed=17)
    prefix = prompts(7, [13])[0]
    tails = prompts(8, [2, 6, 1, 9])
    mk = lambda shared, t, i, temp: Request(prefix + t, n=2, temperature=temp, max_new_tokens=8, seed=i,
                                            shared_prefix=len(prefix) if shared else 0)
    for temp in (0.0, 1.0):
        shared = complete(model, [mk(True, t, i, temp) for i, t in enumerate(tails)], max_rows=6)
        plain = complete(model, [mk(False, t, i, temp) for i, t in enumerate(tails)], max_rows=6)
        assert [[c.tokens for c in r] for r in shared] == [[c.tokens for c in r] for r in plain]
    for t, r in zip(tails, complete(model, [mk(True, t, i, 0.0) for i, t in enumerate(tails)])):
        assert r[0].tokens == greedy_reference(model, prefix + t, 8)[0]


def test_compiled_decode_step_gives_the_same_tokens():
    """The compile path (static shapes: all rows, whole cache length) must decode exactly like eager."""
    model = tiny_model(seed=3)
    reqs = [Request(prompts(9, [k + 1])[0], n=2, temperature=0.0, max_new_tokens=6) for k in range(3)]
    eager = complete(model, reqs, max_rows=4)
    compiled = complete(model, reqs, max_rows=4, compile=True)
    assert [[c.tokens for c in r] for r in eager] == [[c.tokens for c in r] for r in compiled]


# -----------------------------------------------------------------------------
# The KV cache views against full forwards, and the cache plan


def test_fresh_then_extend_matches_full_forward_with_ragged_rows():
    """Prefill rows of different lengths (right-padded, `fresh`), then decode each at its own position
    (`extend`): logits equal a full forward of each row's sequence. Guards per-row positions and the mask."""
    torch.manual_seed(1)
    model = tiny_model(n_kv_heads=2)
    lengths = [5, 9, 3]
    seqs = [torch.randint(0, 97, (L + 6,)) for L in lengths]  # prompt + 6 decode steps each
    B, Tp = len(lengths), max(lengths)
    cache = KVCache.for_model(model, slots=B, max_len=32)
    slots = torch.arange(B)
    prompt = torch.zeros(B, Tp, dtype=torch.long)
    for b, L in enumerate(lengths):
        prompt[b, :L] = seqs[b][:L]
    with torch.no_grad():
        logits = model(prompt, cache=cache.fresh(slots, Tp))
        got = [[logits[b, L - 1]] for b, L in enumerate(lengths)]
        pos = torch.tensor(lengths)
        for step in range(6):
            tok = torch.stack([seqs[b][lengths[b] + step] for b in range(B)])[:, None]
            out = model(tok, cache=cache.extend(slots, pos, 1, int(pos.max()) + 1))
            for b in range(B):
                got[b].append(out[b, 0])
            pos = pos + 1
        for b, L in enumerate(lengths):
            want = model(seqs[b][None])[0][L - 1: L + 6]
            assert (torch.stack(got[b]) - want).abs().max().item() < 1e-5


def test_slot_subset_copy_and_multi_token_extension():
    """Prefill into a chosen slot, copy its prefix to other slots, and extend two of them by several tokens
    at once (as a shared prefix is continued): logits equal full forwards."""
    torch.manual_seed(2)
    model = tiny_model()
    a, b = torch.randint(0, 97, (7,)), torch.randint(0, 97, (4,))
    cache = KVCache.for_model(model, slots=4, max_len=24)
    with torch.no_grad():
        model(a[None], cache=cache.fresh(torch.tensor([2]), 7))
        cache.copy_slots(torch.tensor([2]), torch.tensor([0, 3]), 7)
        ext = torch.stack([b, b.flip(0)])  # slots 0 and 3 continue differently
        out = model(ext, cache=cache.extend(torch.tensor([0, 3]), torch.tensor([7, 7]), 4, 11))
        for i, cont in enumerate([b, b.flip(0)]):
            full = model(torch.cat([a, cont])[None])[0, 7:]
            assert (out[i] - full).abs().max().item() < 1e-5


def test_grouped_view_shares_one_prompt_copy():
    """Sequences continuing prompts held once per slot (`grouped`): two slots with different prompt lengths,
    members at different steps, an empty member place, an idle sequence pointing at a scratch slot, one-token
    steps and a several-token extension. Every logit equals a full forward of prompt + own tokens."""
    torch.manual_seed(4)
    model = tiny_model(n_heads=4, n_kv_heads=2)
    prompts = [torch.randint(0, 97, (6,)), torch.randint(0, 97, (9,))]
    stride, steps = 3, 5
    # (slot, member): slot 0 has members 0 and 2 (place 1 stays empty), slot 1 has member 1 only
    seqs = [(0, 0), (0, 2), (1, 1)]
    own = [torch.randint(0, 97, (steps + 3,)) for _ in seqs]
    cache = KVCache.for_model(model, slots=3, max_len=9 + stride * (steps + 3))  # slot 2: scratch
    with torch.no_grad():
        model(torch.stack([torch.cat([prompts[0], torch.zeros(3, dtype=torch.long)]), prompts[1]]),
              cache=cache.fresh(torch.tensor([0, 1]), 9))
        slots = torch.tensor([g for g, _ in seqs] + [2])  # the last sequence is idle
        members = torch.tensor([j for _, j in seqs] + [0])
        plen = torch.tensor([len(prompts[g]) for g, _ in seqs] + [0])
        got = [[] for _ in seqs]
        for s in range(steps):  # one token at a time, each sequence at its own step s
            tok = torch.stack([o[s] for o in own] + [torch.tensor(5)])[:, None]
            view = cache.grouped(slots, members, plen, torch.full((4,), s), 1, stride, 2, 9 + stride * (s + 1))
            out = model(tok, cache=view)
            for b in range(len(seqs)):
                got[b].append(out[b, 0])
        ext = torch.stack([o[steps:] for o in own] + [torch.zeros(3, dtype=torch.long)])  # 3 tokens at once
        view = cache.grouped(slots, members, plen, torch.full((4,), steps), 3, stride, 2, 9 + stride * (steps + 3))
        out = model(ext, cache=view)
        for b, (g, _) in enumerate(seqs):
            got[b].extend(out[b])
            full = model(torch.cat([prompts[g], own[b]])[None])[0, len(prompts[g]):]
            assert (torch.stack(got[b]) - full).abs().max().item() < 1e-5


def test_grouped_view_in_order_needs_no_gather():
    """A full batch whose row b is member b % stride of slot b // stride (what the engine decodes most steps)
    takes the in-order path; every logit still equals a full forward of prompt + own tokens."""
    torch.manual_seed(5)
    model = tiny_model(n_heads=4, n_kv_heads=2)
    prompts, stride, steps = [torch.randint(0, 97, (6,)), torch.randint(0, 97, (9,))], 2, 4
    own = [torch.randint(0, 97, (steps,)) for _ in range(4)]
    cache = KVCache.for_model(model, slots=3, max_len=9 + stride * steps)
    slots, members = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    plen = torch.tensor([6, 6, 9, 9])
    with torch.no_grad():
        model(torch.stack([torch.cat([prompts[0], torch.zeros(3, dtype=torch.long)]), prompts[1]]),
              cache=cache.fresh(torch.tensor([0, 1]), 9))
        got = []
        for s in range(steps):
            view = cache.grouped(slots, members, plen, torch.full((4,), s), 1, stride, 2, 9 + stride * (s + 1),
                                 in_order=True)
            assert view.inv is None and view.flat is None
            got.append(model(torch.stack([o[s] for o in own])[:, None], cache=view)[:, 0])
        for b in range(4):
            full = model(torch.cat([prompts[b // 2], own[b]])[None])[0, len(prompts[b // 2]):]
            assert (torch.stack([g[b] for g in got]) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("shapes,max_rows,budget,want", [
    # (prompt length, n, max new tokens) per request -> (rows B, samples per slot M, slots G, positions S)
    ([(10, 4, 5)] * 3, 64, 1 << 20, (12, 4, 3, 30)),  # everything fits: one slot per request
    ([(10, 4, 5)] * 3, 64, 100, (12, 4, 3, 30)),  # 3 slots of 30 positions fit in 100
    ([(10, 4, 5)] * 3, 64, 50, (4, 4, 1, 30)),  # room for one slot: requests take turns
    ([(10, 4, 5)] * 3, 6, 1 << 20, (6, 4, 3, 30)),  # 6 rows: tails of two units can live beside a third
    ([(10, 7, 5)], 64, 30, (4, 4, 1, 30)),  # 7 samples but only 4 fit a slot: units of 4 and 3
    ([(8, 1, 3), (20, 2, 6)], 64, 1 << 20, (3, 2, 2, 32)),  # the longest prompt and the most new tokens size a slot
])
def test_plan_cache(shapes, max_rows, budget, want):
    reqs = [Request(list(range(L)), n=n, max_new_tokens=N) for L, n, N in shapes]
    assert plan_cache(reqs, max_rows, budget) == want


@pytest.mark.parametrize("max_rows", [2, 64])
def test_probe_while_generating_equals_a_full_forward(max_rows):
    """Expected modes read the next-token distribution after a suffix fed where each sample ended (cut back a
    few tokens, or not at all; a sample stopped by a stop token or by its length limit, whose last token was
    never fed): in float64, the log-probs equal a plain forward of prompt + kept tokens + suffix."""
    model = tiny_model(seed=3).double()

    def probe(tokens):  # cut 0-2 tokens off, then a suffix of 1-3 tokens, as a text cut and `Score: ` would
        keep = len(tokens) - len(tokens) % 3 if len(tokens) % 2 else len(tokens)
        return keep, [11, 12, 13][:1 + len(tokens) % 3]
    reqs = [Request(p, n=3, temperature=1.0, max_new_tokens=5 + i, stop_ids=tuple(range(30, 36)), seed=i, probe=probe,
                    probe_ids=(5, 6, 7), probe_room=3) for i, p in enumerate(prompts(11, [5, 9, 7, 3]))]
    out = complete(model, reqs, max_rows=max_rows)
    reasons = {c.finish_reason for comps in out for c in comps}
    assert reasons == {"stop", "length"}  # both ways of ending are covered
    for r, comps in zip(reqs, out):
        for c in comps:
            keep, suffix = probe(c.tokens)
            with torch.no_grad():
                full = torch.log_softmax(model(torch.tensor([r.prompt + c.tokens[:keep] + suffix]))[0, -1], -1)
            assert (torch.tensor(c.probe) - full[[5, 6, 7]]).abs().max() < 1e-6  # float64 inside, float32 out


def test_a_decode_step_syncs_the_host_at_most_four_times():
    """A decode step made 16 host round trips (a tensor per list of row values, reads of device values); on a GPU
    each one stalls it. Now: the step's row values in one copy, the sampling floats in another, one read of the
    sampled tokens, and one read deciding whether a row's nucleus needs the full sort."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import host_syncs
    out = host_syncs.count("cpu", rows=4, new_tokens=8)
    assert out["total_per_step"] <= 4, out["events_per_step"]
