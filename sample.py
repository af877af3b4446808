"""
Batched KV-cache generation, and the stage that turns prompts into responses.

The engine (`generate`) prefills each distinct prompt once into one cache slot that all its samples share:
the prompt is stored once, and the samples' new tokens are interleaved after it, so a decode step reads the
prompt once per slot however many samples it has. Many rows of different lengths decode together, and a row
that finishes hands its place to waiting work (continuous batching). Sampling draws its random numbers from
(seed, sample, step) alone, so a request's output does not depend on what it is batched with, and a resumed
run draws what an uninterrupted one would.

    python sample.py --prompts data/prompts.jsonl --out runs/x/responses.jsonl --n-responses 4 --max-new-tokens 256
    python sample.py --model DIR --prompts p.jsonl --out r.jsonl --n-responses 7 --temperature 0.8 --top-p 0.95 --seed 0
    torchrun --nproc_per_node 8 sample.py --model DIR --prompts p.jsonl --out r.jsonl --n-responses 7
    python sample.py --model BASE --prompts p.jsonl --out r.jsonl --chat-format plain --stop '\\n\\nQ:'  # a base model
"""
import argparse
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from common import (DTYPES, ShardWriter, check_flags, check_prompt_fields, file_digest, finish_stage, finite, init_distributed,
                    load_model, model_fingerprint, print0, read_jsonl, stable_seed, start_stage, stop_argv, unescape)
from kvcache import KVCache
from tokenizer import CHAT_FORMATS

# -----------------------------------------------------------------------------
# Sampling


@dataclass
class Request:
    prompt: list[int]  # token ids, chat format already applied
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop_ids: tuple = ()
    stop_strings: tuple = ()  # text that ends a sample too (its tokens stay, its text is cut); needs `decode`
    decode: object = None  # token ids -> text: with it, each completion carries its text
    seed: int = 0
    logprobs: bool = False  # also return each generated token's log-prob (temperature-1 distribution)
    shared_prefix: int = 0  # leading prompt tokens that other requests share: prefilled once per admission
    # expected modes: when a sample ends, probe(tokens) -> (keep, suffix ids); the sample's first `keep` tokens
    # stay in the cache, the suffix (e.g. "\nScore: ") is fed after them, and the log-probs of the probe_ids
    # tokens that would follow are returned with the completion: no second pass over prompt and sample
    probe: object = None
    probe_ids: tuple = ()
    probe_room: int = 0  # the longest suffix the probe may return, in tokens (cache room is planned for it)


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token, not included in tokens, or a stop string) or "length"
    logprobs: list[float] | None = None
    probe: list[float] | None = None  # log-probs of the request's probe_ids after its probe suffix
    text: str | None = None  # the decoded tokens up to any stop string (when the request has `decode`)


def cut_at_stop(text, stops):
    """`text` up to where the earliest of the stop strings `stops` begins (all of it when none occurs)."""
    return text[:min([i for i in map(text.find, stops) if i >= 0], default=len(text))]


# Counter-based randomness: the uniform that picks token `step` of a sample is a hash of (the sample's key, step).
# No generator state is shared between rows, so what a sample draws cannot depend on which rows it is batched
# with, on the rank that runs it, or on where a killed run stopped; and it costs one hash per row per step.


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping multiplies; masked shifts make them logical)."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def uniform_from_keys(keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row, a pure function of (row key, step): no generator state to share."""
    bits = _mix64(keys + step * -7046029254386353131)  # 0x9e3779b97f4a7c15, the golden-ratio increment
    return ((bits >> 11) & ((1 << 53) - 1)).double().div(2.0 ** 53).float()


def sample_key(seed: int, sample: int) -> int:
    """The random-stream key of sample `sample` of a request with seed `seed` (a host-side int64)."""
    t = _mix64(torch.tensor([(seed * 1_000_003 + sample) % (1 << 63)], dtype=torch.int64))
    return int(t.item())


# candidates of sampling's first round, by device: a GPU, where a host sync costs more than a wider topk, starts wide
FIRST_CANDIDATES = {"cuda": 1024, "cpu": 128}


def sample_next_token(logits, temperature, top_p, top_k, uniform, truncated=None, max_top_k=None, any_greedy=None):
    """logits (B, V) fp32; per-row temperature/top_p (B,), top_k (B,) long (0 = off), uniform (B,) -> tokens (B,).

    Inverse-CDF sampling over the sorted, truncated distribution; temperature 0 rows take the argmax.
    `truncated` (does any row use top-p < 1 or top-k), `max_top_k` and `any_greedy` (does any row have
    temperature 0), when the caller knows them on the host, spare reading them from the device (and an argmax
    over the vocabulary when no row is greedy).
    """
    # inverse CDF: the token whose cumulative probability first exceeds u; one uniform per row, so the draw is a
    # deterministic function of (logits, u) and the counter-based u makes the whole sample reproducible
    V = logits.size(-1)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    # (bool() and int() of a device value are host syncs: the engine passes what it knows on the host instead)
    if truncated is None:
        truncated = not bool(((top_p >= 1) & (top_k <= 0)).all())
    if truncated:
        tokens = _truncated_draw(probs, top_p, top_k, uniform, int(top_k.max()) if max_top_k is None else max_top_k)
    else:
        # no truncation: inverse-CDF sampling works in any order, so skip sorting altogether
        cdf = probs.cumsum(-1)
        tokens = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1).clamp(max=V - 1)
    if any_greedy is not None and not any_greedy:
        return tokens
    return torch.where(temperature > 0, tokens, logits.argmax(-1))


def _truncated_draw(probs, top_p, top_k, uniform, max_top_k):
    """The draw of each row within its top-p / top-k nucleus -> tokens (B,)."""
    # a full sort of the vocabulary costs more than a decode step on a CPU, and even topk(1024) is 5% of one; the
    # nucleus usually lies within the top hundred tokens, so take those first, then the top 1024 for the rows
    # whose nucleus did not fit, then a full sort for what is left (each further round is a host sync)
    V = probs.size(-1)
    k = min(V, max(FIRST_CANDIDATES.get(probs.device.type, 128), max_top_k))
    tokens, rows = None, None  # rows: which rows of the batch this round serves (None: all)
    while True:
        sorted_p, order = probs.topk(k, dim=-1) if k < V else probs.sort(dim=-1, descending=True)
        got = _pick_nucleus(sorted_p, order, top_p, top_k, uniform)
        tokens = got if rows is None else tokens.index_copy_(0, rows, got)
        if k >= V:
            return tokens
        # rows without truncation need every token; top-p rows whose candidates hold less than top_p need more
        more = ((top_p >= 1) & (top_k <= 0)) | ((top_k <= 0) & (sorted_p.sum(-1) < top_p))
        sub = more.nonzero().squeeze(-1)  # (a host sync a round when rows truncate)
        if not len(sub):
            return tokens
        rows = sub if rows is None else rows[sub]
        probs, top_p, top_k, uniform, k = probs[sub], top_p[sub], top_k[sub], uniform[sub], V if k >= 1024 else 8 * k


def _pick_nucleus(sorted_p, order, top_p, top_k, uniform):
    """Inverse-CDF pick within each row's nucleus, given its candidates in descending order of probability."""
    # top-p keeps the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p[:, None]
    rank = torch.arange(sorted_p.size(-1), device=sorted_p.device)
    keep &= (top_k[:, None] <= 0) | (rank[None] < top_k[:, None])
    cdf = (sorted_p * keep).cumsum(-1)
    pick = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1).clamp(max=sorted_p.size(-1) - 1)
    return order.gather(-1, pick[:, None]).squeeze(-1)


def decode_one_token(model, tokens, view):
    """One decode step: tokens (B,), each the newest token of its sequence, fed at the places `view` gives
    -> logits (B, V) of the token after it."""
    # the one function worth compiling (generate(compile=True)): everything else is bookkeeping on the host
    return model(tokens[:, None], cache=view)[:, -1]


# -----------------------------------------------------------------------------
# The engine


@dataclass
class Row:
    """One sample in flight: the single record of where it lives in the cache and how far it has got."""
    request: int  # index of its Request
    sample: int  # which of the request's n samples
    slot: int  # the cache slot holding its prompt
    member: int  # its column among the slot's samples in the interleaved layout
    plen: int  # the prompt's length
    key: int  # its random stream (sample_key)
    tokens: list = field(default_factory=list)  # generated so far; len(tokens) is the next sampling step
    logps: list = field(default_factory=list)
    ended: Completion | None = None  # set when the sample has ended and its probe suffix is being fed
    forced: list = field(default_factory=list)  # the probe suffix tokens still to feed


def plan_cache(requests, max_rows, max_cache_tokens):
    """(B rows decoded together, M samples per slot, G slots, S positions per slot) within the budgets.

    A slot holds the longest prompt plus M interleaved samples of the most new tokens; a request with more
    than M samples is split into units of at most M samples, each with a slot of its own."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    # every slot has the same size, so any unit fits any free slot and the cache is one preallocated tensor
    P, N = max(len(r.prompt) for r in requests), max(r.max_new_tokens + r.probe_room for r in requests)
    if max_cache_tokens < P + N:
        raise ValueError(f"a cache slot needs {P + N} tokens (the longest prompt + the most new tokens), "
                         f"more than --max-cache-tokens {max_cache_tokens}")
    B = min(max_rows, sum(r.n for r in requests))
    # as many samples per slot as the largest request has (the whole point: one prompt copy for all of them),
    # unless the rows or the cache budget cannot hold that many
    M = max(1, min(B, max(r.n for r in requests), (max_cache_tokens - P) // N))
    units = sum(-(-r.n // M) for r in requests)  # ceil(n / M) units per request
    # no more slots than units, than rows (each live slot holds a live row) or than the budget allows
    G = max(1, min(units, B, max_cache_tokens // (P + M * N)))
    return min(B, G * M), M, G, P + M * N


def prefill(model, cache, prompts, slots, shared):
    """Prefill each prompt into its slot -> logits of each prompt's last token (U, V).

    A prompt whose first shared[u] tokens other prompts share (the rubric and question of K judge prompts)
    gets that prefix prefilled once per distinct prefix, copied to the other slots, and then the rest."""
    device = cache.device
    # group the units by their shared prefix (a prefix as long as the whole prompt is nothing to share)
    groups = {}
    for u, (p, n) in enumerate(zip(prompts, shared)):
        if 0 < n < len(p):
            groups.setdefault(tuple(p[:n]), []).append(u)
    start = [0] * len(prompts)
    if groups:
        heads = [slots[us[0]] for us in groups.values()]
        prefixes = list(groups)
        model(pad(prefixes, device), cache=cache.fresh(torch.tensor(heads, device=device), max(map(len, prefixes))),
              last=torch.zeros(len(prefixes), dtype=torch.long, device=device))
        # the first unit of each group holds the prefilled prefix; the others get a copy (cheaper than a forward)
        for head, (prefix, us) in zip(heads, groups.items()):
            if len(us) > 1:
                cache.copy_slots(torch.tensor([head], device=device), torch.tensor([slots[u] for u in us[1:]],
                                                                                   device=device), len(prefix))
            for u in us:
                start[u] = len(prefix)
    # then every prompt's remaining tokens in one ragged batch (all of it where nothing was shared)
    rest = [p[n:] for p, n in zip(prompts, start)]
    tokens, slots_t = pad(rest, device), torch.tensor(slots, device=device)
    last = torch.tensor([len(r) - 1 for r in rest], device=device)  # only the last token's logits are needed
    if groups:
        view = cache.extend(slots_t, torch.tensor(start, device=device), tokens.size(1), max(map(len, prompts)))
    else:  # plain prefill from position 0: causal attention over the new tokens only
        view = cache.fresh(slots_t, tokens.size(1))
    return model(tokens, cache=view, last=last)


def pad(seqs, device):
    """Right-pad token lists into a (B, T) tensor (pad id 0: padded positions are never attended to)."""
    out = torch.zeros(len(seqs), max(len(q) for q in seqs), dtype=torch.long)
    for b, q in enumerate(seqs):
        out[b, :len(q)] = torch.tensor(q)
    return out.to(device)


def to_device(values, dtype, device):
    """Host values as one tensor on `device`: on a GPU from pinned memory, copied without the host waiting."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def sample_rows(logits, rows, requests, ints=None):
    """The next token of each row from its logits (R, V) -> (tokens, log-probs or None) as host lists. `ints`
    (3, R) on the device: each row's random key, step and top-k, when the caller already copied them over; the
    per-row floats go over in one copy here."""
    device, reqs = logits.device, [requests[r.request] for r in rows]
    if ints is None:
        ints = to_device([[r.key for r in rows], [len(r.tokens) for r in rows], [q.top_k for q in reqs]], torch.long, device)
    floats = to_device([[q.temperature for q in reqs], [q.top_p for q in reqs]], torch.float32, device)
    # the step counter of a row is its number of tokens so far: the first token (from the prefill) is step 0
    u = uniform_from_keys(ints[0], ints[1])
    nxt = sample_next_token(logits, floats[0], floats[1], ints[2], u,
                            truncated=any(q.top_p < 1 or q.top_k > 0 for q in reqs), max_top_k=max(q.top_k for q in reqs),
                            any_greedy=any(q.temperature <= 0 for q in reqs))
    lp = None
    if any(q.logprobs for q in reqs):
        lp = torch.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1).tolist()
    # the step's host sync: the host must see the tokens to tell which rows stop and what to feed next
    return nxt.tolist(), lp


@torch.no_grad()
def generate(model, requests, max_rows=64, max_cache_tokens=1 << 20, prefill_tokens=8192, compile=False):
    """Run all `requests`, yielding (request index, its n Completions) as each request finishes.

    max_rows: sequences decoded together; max_cache_tokens: bound on the KV cache size in tokens (it is
    preallocated); prefill_tokens: bound on the prompt tokens of one prefill. The cache has one slot per prompt
    unit in flight (see KVCache); a slot is given back when its last sample finishes.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if not requests:
        return
    longest = max(len(r.prompt) + r.max_new_tokens + r.probe_room for r in requests)
    if longest > model.args.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {longest} exceeds the model's context ({model.args.max_seq_len})")
    if any(r.stop_strings and r.decode is None for r in requests):
        raise ValueError("a request with stop strings needs `decode` to read them")
    B, M, G, S = plan_cache(requests, max_rows, max_cache_tokens)
    # one slot more than planned: empty rows inside a decode batch write their (ignored) keys there, so a step
    # never needs to know which rows are live and the compiled step keeps one shape
    cache = KVCache.for_model(model, slots=G + 1, max_len=S)
    # compile: True, or a torch.compile mode ("reduce-overhead" replays the step as a CUDA graph)
    step_fn = torch.compile(decode_one_token, dynamic=False, mode=compile if isinstance(compile, str) else None) \
        if compile else decode_one_token
    if compile:  # the cache tensors live as long as the run and are written in place: CUDA graphs may keep them
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t)
    eng = Engine(requests, B, M, G)
    # on a CPU, the matmuls run on weights prepacked for oneDNN for the whole run (see Transformer.packed_for_cpu);
    # not under torch.compile, whose CPU lowering takes plain weights
    with model.packed_for_cpu(enabled=not compile):
        while eng.pending or eng.live():
            yield from eng.admit(model, cache, prefill_tokens)
            busy = eng.live()
            if not busy:
                continue
            # decode the first W rows; empty rows among them write to the scratch slot and are ignored. Compiled,
            # every shape is the largest one (all rows, slots and positions), so one graph serves every step.
            W, n_slots, kv_len = (B, G, S) if compile else eng.bounds(busy)
            feed, view, busy_t, ints = eng.step_inputs(cache, busy, W, n_slots, kv_len, compile)
            logits = step_fn(model, feed, view)[busy_t]
            yield from eng.record(busy, *sample_rows(logits, [eng.rows[b] for b in busy], requests, ints), logits)
            # compaction moves rows and slots, so it waits until nothing more can be admitted (the tail of the run,
            # when rows finish one by one); compiled, shapes never shrink and there is nothing to gain
            if not eng.pending and not compile:
                eng.compact(cache)


class Engine:
    """The engine's bookkeeping: a Row (or None) per decode row, the waiting units, the slots in use, and
    the finished samples of each request. Every tensor of a step is derived from the rows."""

    def __init__(self, requests, B, M, G):
        self.requests, self.M, self.G = requests, M, G
        self.rows = [None] * B
        # units of at most M samples of one request: (request, first sample, count)
        self.pending = deque((i, s, min(M, r.n - s)) for i, r in enumerate(requests) for s in range(0, r.n, M))
        self.free_slots, self.slot_live = list(range(G)), [0] * G  # slot_live: unfinished samples per slot
        self.results = [[None] * r.n for r in requests]
        self.left = [r.n for r in requests]

    def live(self):
        return [b for b, r in enumerate(self.rows) if r is not None]

    def admit(self, model, cache, budget):
        """Prefill as many waiting units as fit (a free slot, enough free rows, the prefill budget), sample their
        first tokens; yields the requests this finishes (a first token can already end one)."""
        free = [b for b, r in enumerate(self.rows) if r is None]  # lowest first, so live rows stay packed
        self.free_slots.sort()
        # first come, first served: a unit waits until a slot and all the rows of its samples are free, and a
        # prefill takes units until their prompts fill the budget (at least one, however long)
        units = []
        while (self.pending and self.free_slots and self.pending[0][2] <= len(free)
               and (not units or len(self.requests[self.pending[0][0]].prompt) <= budget)):
            i, s0, count = self.pending.popleft()
            units.append((i, s0, self.free_slots.pop(0), [free.pop(0) for _ in range(count)]))
            budget -= len(self.requests[i].prompt)
        if not units:
            return
        reqs = [self.requests[i] for i, *_ in units]
        logits = prefill(model, cache, [r.prompt for r in reqs], [g for _, _, g, _ in units], [r.shared_prefix for r in reqs])
        new, which = [], []
        for u, (i, s0, g, bs) in enumerate(units):
            self.slot_live[g] = len(bs)
            for j, b in enumerate(bs):
                self.rows[b] = Row(i, s0 + j, g, j, len(reqs[u].prompt), sample_key(reqs[u].seed, s0 + j))
                new.append(b)
                which.append(u)
        rows, logits = [self.rows[b] for b in new], logits[torch.tensor(which, device=logits.device)]
        yield from self.record(new, *sample_rows(logits, rows, self.requests), logits)

    def bounds(self, busy):
        """Host-side sizes of an eager step: rows up to the last busy one, slots up to the highest in use, and
        cache positions up to the furthest member token (the token fed now is number len(tokens) - 1)."""
        rows = [self.rows[b] for b in busy]
        return busy[-1] + 1, max(r.slot for r in rows) + 1, max(r.plen + len(r.tokens) * self.M for r in rows)

    def step_inputs(self, cache, busy, W, n_slots, kv_len, compile=False):
        """A decode step's inputs, made on the host and copied over in one go: the token each of the first W rows
        feeds now (its newest; 0 for an empty row), the cache view, the busy rows' indices, and their random keys,
        steps and top-k for sampling -> (feed (W,), view, busy (R,), ints (3, R))."""
        rows, R = self.rows[:W], len(busy)
        col = lambda f, idle: [f(r) if r else idle for r in rows]  # noqa: E731
        live = [self.rows[b] for b in busy]
        # the fed token is the one sampled last, number len(tokens) - 1: its key goes to that step's place
        t = to_device(col(lambda r: r.tokens[-1], 0) + col(lambda r: r.slot, self.G) + col(lambda r: r.member, 0)
                      + col(lambda r: r.plen, 0) + col(lambda r: len(r.tokens) - 1, 0) + busy + [r.key for r in live]
                      + [len(r.tokens) for r in live] + [self.requests[r.request].top_k for r in live],
                      torch.long, cache.device)
        feed, slots, members, plen, steps = t[:5 * W].view(5, W)
        # a full batch with every row at its own place (row b: member b % M of slot b // M) skips two gathers a
        # layer; a compiled step always gathers (one graph for every step)
        in_order = not compile and W == n_slots * self.M and all(
            r is not None and r.slot * self.M + r.member == b for b, r in enumerate(rows))
        view = cache.grouped(slots, members, plen, steps, 1, self.M, n_slots, kv_len, in_order)
        return feed, view, t[5 * W:5 * W + R], t[5 * W + R:].view(3, R)

    def record(self, rows, tokens, logps, logits):
        """Append each row's sampled token, or end the sample (a stop token or string, or its length limit); a
        sample whose request has a probe then feeds the probe's suffix, one token a step, and reads the probed
        log-probs from the logits after the last one. Yields (request, completions) for every request whose last sample ended."""
        for k, (b, tok) in enumerate(zip(rows, tokens)):
            r = self.rows[b]
            req = self.requests[r.request]
            if r.ended is not None:  # probing: the sampled token is ignored
                if r.forced:
                    r.tokens.append(r.forced.pop(0))
                    continue
                r.ended.probe = torch.log_softmax(logits[k].float(), -1)[list(req.probe_ids)].tolist()
                yield from self.finish(b, r, r.ended)
                continue
            stop = tok in req.stop_ids  # a stop token ends the sample and is not part of it
            if not stop:
                r.tokens.append(tok)
                if req.logprobs:
                    r.logps.append(logps[k])
            said = False  # a stop string formed
            if req.stop_strings and not stop:
                # it lies within the newest tokens, each at least a byte of text: decode only as many as the longest
                # stop string has bytes, and one more for a clean start, not the whole text every step
                tail = req.decode(r.tokens[-1 - max(len(s.encode()) for s in req.stop_strings):])
                said = len(cut_at_stop(tail, req.stop_strings)) < len(tail)
            if stop or said or len(r.tokens) >= req.max_new_tokens:
                text = cut_at_stop(req.decode(r.tokens), req.stop_strings) if req.decode else None
                ended = Completion(r.tokens, "stop" if stop or said else "length", r.logps if req.logprobs else None,
                                   text=text)
                if req.probe is None:
                    yield from self.finish(b, r, ended)
                    continue
                keep, suffix = req.probe(r.tokens)
                assert 0 <= keep <= len(r.tokens) and 1 <= len(suffix) <= req.probe_room, (keep, suffix, req.probe_room)
                # the suffix overwrites the sample's cache from position `keep` on: the fed token of step s sits
                # at step s's place, and a query never sees a place beyond its own step. A sample cut by its
                # length limit (or a stop string) has not fed its last token yet: it goes first, if it is kept
                fed = min(keep, len(r.tokens) - (not stop))
                feed = r.tokens[fed:keep] + list(suffix)
                r.ended, r.tokens, r.forced = ended, r.tokens[:fed] + feed[:1], feed[1:]

    def finish(self, b, r, completion):
        self.results[r.request][r.sample] = completion
        self.rows[b] = None  # its row is free at once; its slot when its last sibling finishes
        self.slot_live[r.slot] -= 1
        if self.slot_live[r.slot] == 0:
            self.free_slots.append(r.slot)
        self.left[r.request] -= 1
        if self.left[r.request] == 0:
            yield r.request, self.results[r.request]

    def compact(self, cache):
        """At the tail (nothing waiting), pack live rows at the lowest row indices and their slots at the lowest
        slots once either is sparse, so the decode batch and the attended cache shrink as samples finish."""
        # a factor-2 rule: repacking costs a little, so it happens only when it at least halves the work; moving a
        # row is free (its state is its Row record), moving a slot copies its cache
        live = [r for r in self.rows if r is not None]
        if live and self.live()[-1] + 1 > 2 * len(live):
            self.rows = live + [None] * (len(self.rows) - len(live))
        used = sorted({r.slot for r in live})
        if used and used[-1] + 1 > 2 * len(used):
            src, dst = torch.tensor(used, device=cache.device), torch.arange(len(used), device=cache.device)
            cache.move_slots(src, dst)
            new = {g: n for n, g in enumerate(used)}
            for r in live:
                r.slot = new[r.slot]
            self.slot_live = [self.slot_live[g] for g in used] + [0] * (self.G - len(used))
            self.free_slots = list(range(len(used), self.G))


def complete(model, requests, **kw):
    """Every request's completions, in request order (for callers that want them all at once)."""
    done = dict(generate(model, requests, **kw))
    return [done[i] for i in range(len(requests))]


def stage_generate(model, requests, args, rank, desc, unit, stats):
    """generate() as a stage runs it: this rank's requests, the engine flags in `args`, a progress bar on rank 0.
    `stats` counts the `tokens` generated, and gets `seconds` and `tokens_per_s` once the last request is done."""
    from tqdm import tqdm
    bar = tqdm(total=sum(r.n for r in requests), desc=f"{desc}[{rank}]", unit=unit, disable=rank != 0 or not requests)
    t0, stats["tokens"] = time.time(), 0
    for i, comps in generate(model, requests, max_rows=args.max_rows, max_cache_tokens=args.max_cache_tokens,
                             compile=args.compile):
        stats["tokens"] += sum(len(c.tokens) for c in comps)
        bar.update(len(comps))
        bar.set_postfix(tok_s=f"{stats['tokens'] / max(time.time() - t0, 1e-9):.0f}")
        yield i, comps
    bar.close()
    dt = time.time() - t0
    stats.update(seconds=round(dt, 2), tokens_per_s=round(stats["tokens"] / max(dt, 1e-9), 1))


def common_prefix(seqs):
    """The length of the longest prefix that all token lists share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


# -----------------------------------------------------------------------------
# The prompts -> responses stage


def stage_settings(args, model_path, files, keep, **more):
    """What decides a generation stage's output; a resumed run must have the same (see common.start_stage): the
    model's fingerprint (none without a model), the digests of the files the flags `files` name, the flags `keep`,
    any --stop, and `more`."""
    return {**({"model": model_fingerprint(model_path)} if model_path else {}),
            **{f: file_digest(getattr(args, f)) for f in files}, **{k: getattr(args, k) for k in keep},
            **({"stop": args.stop} if args.stop else {}), **more}


def run_stage(args, model, tok, model_path, rank, world, probe=None):
    """The actor stage. `probe` (a caller's: the tokenizer -> Request probe fields) also reads a verdict's
    distribution where each response ends, written as `probes` (log-probs per response)."""
    probe = probe(tok) if probe else {}
    prompts = read_jsonl(args.prompts, required=("id", "prompt"), what="prompt", check=check_prompt_fields)
    n_use = min(args.limit or len(prompts), len(prompts))
    if args.limit > len(prompts):
        print0(f"note: --limit {args.limit}, but {args.prompts} holds {len(prompts)} prompts; using all of them")
    order = [str(p["id"]) for p in prompts[:n_use]]
    keep = ("limit", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "dedup", "dtype", "chat_format")
    settings = stage_settings(args, model_path, ("prompts",), keep, **({"probe_ids": probe["probe_ids"]} if probe else {}))
    done = start_stage(args.out, settings, args.redo, rank, world)
    todo = [k for k in range(n_use) if order[k] not in done and k % world == rank]
    limit = model.args.max_seq_len - args.max_new_tokens - probe.get("probe_room", 0)
    encoded = [tok.encode_prompt(prompts[k]["prompt"], prompts[k].get("system")) for k in todo]
    # a head every prompt shares (a system prompt, few-shot examples, a judge's instructions) is prefilled once
    # per admission and copied, not once per prompt
    shared = common_prefix(encoded) if len(encoded) > 1 else 0
    requests = []
    for k, ids in zip(todo, encoded):
        if len(ids) > limit:
            raise SystemExit(f"{prompts.where(k)}: prompt is {len(ids)} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} the model's context ({model.args.max_seq_len}) allows {limit}")
        requests.append(Request(ids, n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, stop_ids=tuple(tok.stop_ids),
                                stop_strings=tuple(args.stop), decode=tok.decode, seed=stable_seed(args.seed, prompts[k]["id"]),
                                shared_prefix=shared if shared >= 16 else 0, **probe))
    print0(f"{n_use} prompts, {len(done)} already done, {len(todo)} on rank {rank}")
    writer = ShardWriter(args.out, rank)
    counts = {"samples": 0, "tokens": 0, "duplicates": 0, "length_stops": 0}
    for i, comps in stage_generate(model, requests, args, rank, "sample", "sample", counts):
        p = prompts[todo[i]]
        texts, reasons, ntoks, probes = [], [], [], []
        for c in comps:
            text = c.text
            counts["length_stops"] += c.finish_reason == "length"
            if args.dedup and text in texts:
                counts["duplicates"] += 1
                continue
            texts.append(text)
            reasons.append(c.finish_reason)
            ntoks.append(len(c.tokens))
            probes.append(c.probe)
        counts["samples"] += len(comps)
        extra = {k: v for k, v in p.items() if k not in ("id", "prompt", "system")}  # e.g. a gold `answer`
        writer.write({"id": p["id"], "prompt": p["prompt"], **({"system": p["system"]} if p.get("system") else {}), **extra,
                      "responses": texts, "finish_reasons": reasons, "num_tokens": ntoks, "model": model_path,
                      "seed": args.seed, "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                      "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, **({"probes": probes} if probe else {})})
    writer.close()
    finish_stage(args.out, order, rank, world)
    print0(f"sample | prompts {len(requests)} (rank 0) | samples {counts['samples']} | tokens {counts['tokens']} | "
           f"duplicates dropped {counts['duplicates']} | stopped by length {counts['length_stops']} | "
           f"{counts['tokens_per_s']:.1f} tok/s | {counts['seconds']:.1f}s")
    return counts


def add_sampling_args(g, what, temperature, top_p, max_new_tokens, seed="run seed", limit=None):
    """--temperature, --top-p, --max-new-tokens and --seed at a script's own defaults (`what`: what it generates)."""
    g.add_argument("--temperature", type=float, default=temperature, help=f"{what} sampling temperature (0 = greedy)")
    g.add_argument("--top-p", type=float, default=top_p, help=f"{what} nucleus mass")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=limit or f"{what} length limit")
    g.add_argument("--seed", type=int, default=0, help=seed)


def sampling_rules(args):
    """The checks of the sampling flags (add_sampling_args): temperature, top-p and the length limit."""
    return [("--temperature", args.temperature, finite(args.temperature) and args.temperature >= 0, ">= 0"),
            ("--top-p", args.top_p, finite(args.top_p) and 0 < args.top_p <= 1, "in (0, 1]"),
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1")]


def add_engine_args(parser, passed_on=False):
    """The engine flags; `passed_on`: only those a script passes on to the sample.py runs it makes (--max-rows,
    --dtype, --chat-format, --redo)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--max-rows", type=int, default=64, help="sequences decoded together")
    if not passed_on:
        g.add_argument("--max-cache-tokens", type=int, default=1 << 20, help="bound on the KV cache in tokens: slots x "
                       "(longest prompt + samples per slot x new tokens)")
        g.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU; static shapes)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--chat-format", default=None, choices=CHAT_FORMATS, help="override the detected chat format "
                   "(plain: no chat markers, for base models prompted as completions)")
    if not passed_on:
        g.add_argument("--stop", action="append", default=[], type=unescape, help="text that ends a generation, cut "
                       "from it (repeat for several; escapes such as \\n are decoded)")
    g.add_argument("--redo", action="store_true", help="discard this stage's earlier output instead of resuming it")


def chat_flag(args):
    return ["--chat-format", args.chat_format] if args.chat_format else []


def engine_flags(args):
    """The engine flags a script passes on to the sample.py runs it makes (add_engine_args(passed_on=True))."""
    return ["--max-rows", str(args.max_rows), "--dtype", args.dtype] + chat_flag(args)


def engine_rules(args):
    """The checks of the engine flags that `args` has (all of add_engine_args', or those passed on)."""
    have = vars(args)
    return [(flag, have[key], ok(have[key]), need) for flag, key, ok, need in (
        ("--max-rows", "max_rows", lambda v: v >= 1, "at least 1"),
        ("--max-cache-tokens", "max_cache_tokens", lambda v: v >= 1, "at least 1"),
        ("--dtype", "dtype", lambda v: v == "auto" or v in DTYPES, f"auto or one of {', '.join(DTYPES)}"),
        ("--stop", "stop", all, "non-empty text")) if key in have]


def build_parser():
    parser = argparse.ArgumentParser(description="Generate K responses per prompt (the actor stage).")
    # io
    parser.add_argument("--model", default=None, help="HF checkpoint folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", required=True, help="JSONL with `id`, `prompt` (optional `system`)")
    parser.add_argument("--out", required=True, help="output JSONL of responses (resumed if it exists)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N prompts of the file (0 = all)")
    # sampling
    parser.add_argument("--n-responses", dest="n", type=int, default=4, help="responses per prompt (K)")
    add_sampling_args(parser, "response", 0.8, 0.95, 512, seed="run seed; each prompt's stream derives from it and its id")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact duplicate responses")
    add_engine_args(parser)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(("--n-responses", args.n, args.n >= 1, "at least 1"), ("--limit", args.limit, args.limit >= 0, ">= 0"),
                ("--top-k", args.top_k, args.top_k >= 0, ">= 0"), *sampling_rules(args), *engine_rules(args))
    return args


def argv_for(args, model, prompts, out, n=1, temperature=None, dedup=True, limit=None):
    """This stage's command line as another script runs it (evaluate.py, evaluator.py), at that script's sampling
    and engine flags `args` (its `stops`, a template's stop strings, too); --model only when one is given."""
    return (["--prompts", prompts, "--out", out, "--n-responses", str(n), "--temperature",
             str(args.temperature if temperature is None else temperature), "--top-p", str(args.top_p),
             "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed)] + engine_flags(args)
            + (["--model", model] if model else []) + (["--limit", str(limit)] if limit is not None else [])
            + ([] if dedup else ["--no-dedup"]) + (["--redo"] if args.redo else []) + stop_argv(getattr(args, "stops", ())))


def main(argv=None, probe=None):
    args = parse_args(argv)
    rank, world, device = init_distributed()
    model, tok, path = load_model(args.model, device, args.dtype, args.chat_format)
    return run_stage(args, model, tok, path, rank, world, probe)


if __name__ == "__main__":
    main()
