"""
Batched KV-cache generation, and the stage that turns prompts into responses.

The engine (`generate`) prefills each distinct prompt once into one cache slot that its n samples share
(prefix sharing: the prompt is stored once and read once per decode step, see model.Groups), keeps many rows
of different lengths in flight, and hands a finished row to waiting work (continuous batching). Sampling draws its random numbers from (seed, sample, step) alone, so a request's
output does not depend on what it is batched with, and a resumed run reproduces an uninterrupted one.

    python sample.py --prompts data/prompts.jsonl --out runs/x/responses.jsonl --n-responses 4 --max-new-tokens 256
    python sample.py --model DIR --prompts p.jsonl --out r.jsonl --n-responses 7 --temperature 0.8 --top-p 0.95 --seed 0
    torchrun --nproc_per_node 8 sample.py --model DIR --prompts p.jsonl --out r.jsonl --n-responses 7
"""
import argparse
import time
from collections import deque
from dataclasses import dataclass

import torch

from common import (ShardWriter, add_engine_args, check_flags, check_prompt_fields, engine_rules, file_digest,
                    finish_stage, init_distributed, load_model, model_fingerprint, print0, read_jsonl, sampling_rules,
                    stable_seed, start_stage)
from model import Groups, KVCache

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
    seed: int = 0
    logprobs: bool = False  # also return each generated token's log-prob (temperature-1 distribution)
    shared_prefix: int = 0  # leading prompt tokens that other requests share: prefilled once per admission


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token, not included in tokens) or "length"
    logprobs: list[float] | None = None


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


def sample_next_token(logits, temperature, top_p, top_k, uniform):
    """logits (B, V) fp32; per-row temperature/top_p (B,), top_k (B,) long (0 = off), uniform (B,) -> tokens (B,).

    Inverse-CDF sampling over the sorted, truncated distribution; temperature 0 rows take the argmax.
    """
    greedy = logits.argmax(-1)
    V = logits.size(-1)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    if bool(((top_p >= 1) & (top_k <= 0)).all()):
        # no truncation: inverse-CDF sampling works in any order, so skip sorting altogether
        cdf = probs.cumsum(-1)
        tokens = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1).clamp(max=V - 1)
        return torch.where(temperature > 0, tokens, greedy)
    # a full sort of the vocabulary costs more than a decode step on a CPU; the nucleus usually lies within
    # the top few hundred tokens, so take those first and sort everything only when some row needs more
    sorted_p, order = probs.topk(min(V, max(1024, int(top_k.max()))), dim=-1)
    whole = (top_p >= 1) & (top_k <= 0)
    short = (top_k <= 0) & (sorted_p.sum(-1) < top_p)
    if bool((whole | short).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
    # top-p keeps the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p[:, None]
    rank = torch.arange(sorted_p.size(-1), device=logits.device)
    keep &= (top_k[:, None] <= 0) | (rank[None] < top_k[:, None])
    cdf = (sorted_p * keep).cumsum(-1)
    pick = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1).clamp(max=sorted_p.size(-1) - 1)
    tokens = order.gather(-1, pick[:, None]).squeeze(-1)
    return torch.where(temperature > 0, tokens, greedy)


def decode_one_token(model, tokens, cache, start, kv_len, groups):
    """One decode step: tokens (B,), each the start[b]-th new token of its sequence in `groups` -> logits (B, V)."""
    return model(tokens[:, None], cache=cache, start=start, kv_len=kv_len, groups=groups)[:, -1]


# -----------------------------------------------------------------------------
# The engine


@torch.no_grad()
def generate(model, requests, max_rows=64, max_cache_tokens=1 << 20, prefill_tokens=8192, compile=False,
             on_done=None, progress=None):
    """Run all `requests`; returns one list of `n` Completions per request (also passed to `on_done(i, list)`
    as each request finishes).

    max_rows: sequences decoded together; max_cache_tokens: bound on the KV cache size in tokens (it is
    preallocated); prefill_tokens: bound on the tokens of one prefill batch. progress: a tqdm bar to update
    with finished samples.

    The cache has one row (slot) per prompt in flight: the prompt, then its samples' new tokens interleaved
    (see model.Groups), so a prompt is prefilled once, stored once and read once per decode step however
    many samples it has. A slot is given back when its last sample finishes.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if not requests:
        return []
    device = model.tok_embeddings.weight.device
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    if max_len > model.args.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds the model's context ({model.args.max_seq_len})")
    total = sum(r.n for r in requests)
    P, N = max(len(r.prompt) for r in requests), max(r.max_new_tokens for r in requests)
    if max_cache_tokens < P + N:
        raise ValueError(f"a cache slot needs {P + N} tokens (the longest prompt + the most new tokens), "
                         f"more than --max-cache-tokens {max_cache_tokens}")
    B = min(max_rows, total)
    # samples per slot (a request with more is split into units of at most M), then slots within the budget
    M = max(1, min(B, max(r.n for r in requests), (max_cache_tokens - P) // N))
    S = P + M * N  # cache positions per slot
    pending = deque((i, s, min(M, r.n - s)) for i, r in enumerate(requests) for s in range(0, r.n, M))
    G = max(1, min(len(pending), B, max_cache_tokens // S))
    B = min(B, G * M)
    cache = KVCache.for_model(model, rows=G + 1, max_len=S)  # slot G: scratch for idle rows
    step_fn = decode_one_token
    if compile:  # static shapes: always all B rows, all G slots and the whole cache length
        step_fn = torch.compile(decode_one_token, dynamic=False)

    results = [[None] * r.n for r in requests]
    left = [r.n for r in requests]
    n_stop = max([len(r.stop_ids) for r in requests] + [1])
    # per-row state: tensors for the step, lists for the host-side bookkeeping
    cur = torch.zeros(B, dtype=torch.long, device=device)  # last sampled token, fed at the next step
    pos = torch.zeros(B, dtype=torch.long, device=device)  # its position in the sequence
    gen = torch.zeros(B, dtype=torch.long, device=device)  # tokens generated so far (the sampling step)
    keys = torch.zeros(B, dtype=torch.long, device=device)
    temp, top_p = torch.zeros(B, device=device), torch.ones(B, device=device)
    top_k = torch.zeros(B, dtype=torch.long, device=device)
    stops = torch.full((B, n_stop), -1, dtype=torch.long, device=device)
    slot = torch.full((B,), G, dtype=torch.long, device=device)  # the cache slot of each row (G: idle)
    member = torch.zeros(B, dtype=torch.long, device=device)
    plen = torch.zeros(B, dtype=torch.long, device=device)  # the prompt length held in that slot
    state = dict(cur=cur, pos=pos, gen=gen, keys=keys, temp=temp, top_p=top_p, top_k=top_k, stops=stops,
                 slot=slot, member=member, plen=plen)  # every per-row tensor, by name (_compact moves them)
    owner = [None] * B  # (request, sample) of each busy row
    host = {"pos": [0] * B, "plen": [0] * B, "slot": [G] * B, "tokens": [[] for _ in range(B)],
            "logps": [[] for _ in range(B)]}
    free = list(range(B))
    free_slots, slot_live = list(range(G)), [0] * G  # slot_live: unfinished samples in each slot
    want_logps = any(r.logprobs for r in requests)

    def finish_tokens(rows, rows_t, logits):
        """Sample the next token of `rows` (also as the index tensor `rows_t`) from `logits`, record it,
        retire finished rows."""
        u = uniform_from_keys(keys[rows_t], gen[rows_t])
        nxt = sample_next_token(logits, temp[rows_t], top_p[rows_t], top_k[rows_t], u)
        is_stop = (nxt[:, None] == stops[rows_t]).any(-1)
        lp = torch.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1).tolist() if want_logps else None
        cur[rows_t], gen[rows_t] = nxt, gen[rows_t] + 1
        for j, (b, tok, stop) in enumerate(zip(rows, nxt.tolist(), is_stop.tolist())):  # one host sync
            i, s = owner[b]
            r = requests[i]
            if not stop:
                host["tokens"][b].append(tok)
                if r.logprobs:
                    host["logps"][b].append(lp[j])
            if stop or len(host["tokens"][b]) >= r.max_new_tokens:
                results[i][s] = Completion(host["tokens"][b], "stop" if stop else "length",
                                           host["logps"][b] if r.logprobs else None)
                g = host["slot"][b]
                slot_live[g] -= 1
                if slot_live[g] == 0:
                    free_slots.append(g)
                owner[b], host["tokens"][b], host["logps"][b] = None, [], []
                host["pos"][b], host["plen"][b], host["slot"][b] = 0, 0, G
                pos[b], plen[b], slot[b], member[b] = 0, 0, G, 0
                free.append(b)
                left[i] -= 1
                if progress is not None:
                    progress.update(1)
                if left[i] == 0 and on_done is not None:
                    on_done(i, results[i])

    def admit():
        """Prefill as many waiting units as fit, each prompt once into its own slot; shared prefixes of
        different prompts are prefilled once and copied."""
        units, budget = [], prefill_tokens
        free.sort()  # lowest rows and slots first, so live ones stay packed at the front
        free_slots.sort()
        while (pending and free_slots and pending[0][2] <= len(free)
               and (not units or len(requests[pending[0][0]].prompt) <= budget)):
            i, s0, count = pending.popleft()
            units.append((i, s0, free_slots.pop(0), [free.pop(0) for _ in range(count)]))
            budget -= len(requests[i].prompt)
        if not units:
            return
        # 1. prompts that share a prefix with others: prefill each distinct prefix once, copy it to the rest
        groups = {}
        for u, (i, _, _, _) in enumerate(units):
            L0 = requests[i].shared_prefix
            if 0 < L0 < len(requests[i].prompt):
                groups.setdefault(tuple(requests[i].prompt[:L0]), []).append(u)
        start = [0] * len(units)
        if groups:
            heads = [units[us[0]][2] for us in groups.values()]
            model(_pad(list(groups), device), cache=cache, rows=torch.tensor(heads, device=device),
                  last=torch.zeros(len(heads), dtype=torch.long, device=device))
            for head, (prefix, us) in zip(heads, groups.items()):
                others = [units[u][2] for u in us[1:]]
                if others:
                    cache.copy_rows(torch.tensor([head], device=device), torch.tensor(others, device=device), len(prefix))
                for u in us:
                    start[u] = len(prefix)
        # 2. the rest of each prompt (all of it where nothing is shared), ragged and right-padded;
        #    logits of each prompt's last token only: (U, V)
        slots_t = torch.tensor([g for _, _, g, _ in units], device=device)
        rest = [requests[i].prompt[start[u]:] for u, (i, _, _, _) in enumerate(units)]
        last = torch.tensor([len(r) - 1 for r in rest], device=device)
        if groups:
            kv_len = max(len(requests[i].prompt) for i, _, _, _ in units)
            logits = model(_pad(rest, device), cache=cache, rows=slots_t, start=torch.tensor(start, device=device),
                           kv_len=kv_len, last=last)
        else:  # plain prefill from position 0: causal attention over the new tokens only
            logits = model(_pad(rest, device), cache=cache, rows=slots_t, last=last)
        rows, row_logits = [], []
        for u, (i, s0, g, slots) in enumerate(units):
            r, L = requests[i], len(requests[i].prompt)
            slot_live[g] = len(slots)
            for k, b in enumerate(slots):
                owner[b] = (i, s0 + k)
                host["pos"][b], host["plen"][b], host["slot"][b] = L, L, g
                keys[b] = sample_key(r.seed, s0 + k)
                temp[b], top_p[b], top_k[b], pos[b], gen[b] = r.temperature, r.top_p, r.top_k, L, 0
                slot[b], member[b], plen[b] = g, k, L
                stops[b] = -1
                if r.stop_ids:
                    stops[b, :len(r.stop_ids)] = torch.tensor(list(r.stop_ids))
                rows.append(b)
                row_logits.append(u)
        finish_tokens(rows, torch.tensor(rows, device=device), logits[torch.tensor(row_logits, device=device)])

    while pending or any(o is not None for o in owner):
        if pending and free and free_slots:
            admit()
        busy = [b for b in range(B) if owner[b] is not None]
        if not busy:
            continue
        # decode the first W rows; idle rows inside that range write to the scratch slot and are ignored
        if compile:
            W, kv_len, n_slots = B, S, G
        else:
            W = busy[-1] + 1
            kv_len = max(host["plen"][b] + (host["pos"][b] - host["plen"][b] + 1) * M for b in busy)
            n_slots = max(host["slot"][b] for b in busy) + 1
        grp = Groups(slot[:W], member[:W], plen[:W], M, n_slots)
        logits = step_fn(model, cur[:W], cache, pos[:W] - plen[:W], kv_len, grp)
        busy_t = torch.tensor(busy, device=device)
        pos[busy_t] += 1
        for b in busy:
            host["pos"][b] += 1
        finish_tokens(busy, busy_t, logits[busy_t])
        if not pending and not compile:
            _compact(cache, owner, state, host, free, free_slots, G)
    return results


def _pad(seqs, device):
    """Right-pad token lists into a (B, T) tensor (pad id 0: padded positions are never attended to)."""
    out = torch.zeros(len(seqs), max(len(q) for q in seqs), dtype=torch.long)
    for b, q in enumerate(seqs):
        out[b, :len(q)] = torch.tensor(q)
    return out.to(device)


def _compact(cache, owner, state, host, free, free_slots, G):
    """At the tail (nothing waiting), move live rows to the lowest row indices and their prompts' slots to the
    lowest slots when either is sparse, so the decode batch and the attended cache shrink as samples finish."""
    live = [b for b in range(len(owner)) if owner[b] is not None]
    if live and live[-1] + 1 > 2 * len(live):
        device = state["pos"].device
        src, dst = torch.tensor(live, device=device), torch.arange(len(live), device=device)
        for t in state.values():
            t[dst] = t[src]
        rest = len(owner) - len(live)
        owner[:] = [owner[b] for b in live] + [None] * rest
        for key, idle in (("pos", 0), ("plen", 0), ("slot", G)):
            host[key][:] = [host[key][b] for b in live] + [idle] * rest
        for key in ("tokens", "logps"):
            host[key][:] = [host[key][b] for b in live] + [[] for _ in range(rest)]
        for key, idle in (("slot", G), ("member", 0), ("plen", 0), ("pos", 0)):
            state[key][len(live):] = idle
        free[:] = list(range(len(live), len(owner)))
        live = list(range(len(live)))
    used = sorted({host["slot"][b] for b in live})
    if used and used[-1] + 1 > 2 * len(used):
        device = cache.k.device
        src, dst = torch.tensor(used, device=device), torch.arange(len(used), device=device)
        cache.k[:, dst] = cache.k[:, src]
        cache.v[:, dst] = cache.v[:, src]
        new = {g: n for n, g in enumerate(used)}
        for b in live:
            host["slot"][b] = new[host["slot"][b]]
        state["slot"][torch.tensor(live, device=device)] = torch.tensor([host["slot"][b] for b in live], device=device)
        free_slots[:] = list(range(len(used), G))


@torch.no_grad()
def next_token_logprobs(model, prefix, continuations, candidates, max_rows=64):
    """Log-probs of the `candidates` token ids right after prefix + each continuation -> (len(conts), len(cands)).

    The shared prefix is prefilled once and held once; the continuations run together as its members.
    Used for the `expected` score modes (the distribution of the digit after `Score: `).
    """
    device = model.tok_embeddings.weight.device
    out = []
    for c0 in range(0, len(continuations), max_rows):
        conts = continuations[c0:c0 + max_rows]
        n, L, T = len(conts), len(prefix), max(len(c) for c in conts)
        if L + T > model.args.max_seq_len:
            raise ValueError(f"prefix + continuation = {L + T} tokens exceeds the model's context ({model.args.max_seq_len})")
        cache = KVCache.for_model(model, rows=1, max_len=L + n * T)
        if L > 0:
            model(torch.tensor([prefix], device=device), cache=cache, rows=torch.tensor([0], device=device),
                  last=torch.tensor([L - 1], device=device))
        ext = torch.zeros(n, T, dtype=torch.long)
        for j, c in enumerate(conts):
            ext[j, :len(c)] = torch.tensor(c)
        zeros = torch.zeros(n, dtype=torch.long, device=device)
        grp = Groups(zeros, torch.arange(n, device=device), torch.full((n,), L, device=device), n, 1)
        logits = model(ext.to(device), cache=cache, start=zeros, kv_len=L + n * T, groups=grp)
        last = torch.tensor([len(c) - 1 for c in conts], device=device)
        logps = torch.log_softmax(logits[torch.arange(n, device=device), last], -1)
        out.append(logps[:, torch.tensor(candidates, device=device)].cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# The prompts -> responses stage


def stage_settings(args, model_path):
    """What decides this stage's output; a resumed run must have the same (see common.start_stage)."""
    keep = ("limit", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "dedup", "dtype", "chat_format")
    return {"model": model_fingerprint(model_path), "prompts": file_digest(args.prompts),
            **{k: getattr(args, k) for k in keep}}


def run_stage(args, model, tok, model_path, rank, world):
    prompts = read_jsonl(args.prompts, required=("id", "prompt"), what="prompt", check=check_prompt_fields)
    n_use = args.limit or len(prompts)
    order = [str(p["id"]) for p in prompts[:n_use]]
    done = start_stage(args.out, stage_settings(args, model_path), args.redo, rank, world)
    todo = [k for k in range(n_use) if order[k] not in done and k % world == rank]
    limit = model.args.max_seq_len - args.max_new_tokens
    requests = []
    for k in todo:
        p = prompts[k]
        ids = tok.encode_prompt(p["prompt"], p.get("system"))
        if len(ids) > limit:
            raise SystemExit(f"{prompts.where(k)}: prompt is {len(ids)} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} the model's context ({model.args.max_seq_len}) allows {limit}")
        requests.append(Request(ids, n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, stop_ids=tuple(tok.stop_ids),
                                seed=stable_seed(args.seed, p["id"])))
    print0(f"{n_use} prompts, {len(done)} already done, {len(todo)} on rank {rank}")
    writer = ShardWriter(args.out, rank)
    counts = {"samples": 0, "tokens": 0, "duplicates": 0, "length_stops": 0}

    def on_done(i, comps):
        p = prompts[todo[i]]
        texts, reasons, ntoks = [], [], []
        for c in comps:
            text = tok.decode(c.tokens)
            counts["tokens"] += len(c.tokens)
            counts["length_stops"] += c.finish_reason == "length"
            if args.dedup and text in texts:
                counts["duplicates"] += 1
                continue
            texts.append(text)
            reasons.append(c.finish_reason)
            ntoks.append(len(c.tokens))
        counts["samples"] += len(comps)
        rec = {"id": p["id"], "prompt": p["prompt"], **({"system": p["system"]} if p.get("system") else {}),
               "responses": texts, "finish_reasons": reasons, "num_tokens": ntoks, "model": model_path,
               "seed": args.seed, "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
        writer.write(rec)
        bar.set_postfix(tok_s=f"{counts['tokens'] / max(time.time() - t0, 1e-9):.0f}")

    from tqdm import tqdm
    t0 = time.time()
    bar = tqdm(total=len(requests) * args.n, desc=f"sample[{rank}]", unit="sample", disable=rank != 0 or not requests)
    generate(model, requests, max_rows=args.max_rows, max_cache_tokens=args.max_cache_tokens, compile=args.compile,
             on_done=on_done, progress=bar)
    bar.close()
    writer.close()
    dt = time.time() - t0
    finish_stage(args.out, order, rank, world)
    counts["seconds"] = round(dt, 2)
    counts["tokens_per_s"] = round(counts["tokens"] / max(dt, 1e-9), 1)
    print0(f"sample | prompts {len(requests)} (rank 0) | samples {counts['samples']} | tokens {counts['tokens']} | "
           f"duplicates dropped {counts['duplicates']} | stopped by length {counts['length_stops']} | "
           f"{counts['tokens_per_s']:.1f} tok/s | {dt:.1f}s")
    return counts


def build_parser():
    parser = argparse.ArgumentParser(description="Generate K responses per prompt (the actor stage).")
    # io
    parser.add_argument("--model", default=None, help="HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", required=True, help="JSONL with `id`, `prompt` (optional `system`)")
    parser.add_argument("--out", required=True, help="output JSONL of responses (resumed if it exists)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N prompts of the file (0 = all)")
    # sampling
    parser.add_argument("--n-responses", dest="n", type=int, default=4, help="responses per prompt (K)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generation length limit")
    parser.add_argument("--seed", type=int, default=0, help="run seed; each prompt's stream derives from it and its id")
    parser.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact duplicate responses")
    add_engine_args(parser)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(("--n-responses", args.n, args.n >= 1, "at least 1"), ("--limit", args.limit, args.limit >= 0, ">= 0"),
                ("--top-k", args.top_k, args.top_k >= 0, ">= 0"), *sampling_rules(args), *engine_rules(args))
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed()
    model, tok, path = load_model(args.model, device, args.dtype, args.chat_format)
    return run_stage(args, model, tok, path, rank, world)


if __name__ == "__main__":
    main()
