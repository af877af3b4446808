"""
The KV cache of the generation engine (sample.py): one preallocated tensor per layer with a slot per prompt in
flight, and the views a forward gets of it. A view knows where the new tokens sit (their rotary positions),
stores their keys and values and says what each query attends to, so the model never sees the layout.
"""
import torch
import torch.nn.functional as F

from model import attention


class KVCache:
    """Preallocated keys and values, one (slots, Hkv, S, D) tensor per layer: one slot per prompt in flight.

    A slot holds a prompt at positions [0, plen). In the grouped layout the new tokens of the prompt's samples
    follow it interleaved: token s of member j (its j-th sample) at index plen + s * stride + j. The model never
    sees this layout: each forward gets a view (`fresh`, `extend`, `grouped`) that knows where the new keys go
    and which cached keys each query may read. Anything written beyond what a view reads is harmless: it is
    masked out until overwritten.
    """

    def __init__(self, n_layers, slots, n_kv_heads, max_len, head_dim, qpk=1, device=None, dtype=torch.float32):
        # one tensor per layer, written in place: a compiled decode step then updates each layer's cache where it
        # lies instead of copying a slice of one big tensor out and the whole of it back every step
        shape = (slots, n_kv_heads, max_len, head_dim)  # (G, Hkv, S, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.device = torch.device(device) if device is not None else self.k[0].device
        self.slots, self.max_len, self.qpk = slots, max_len, qpk  # qpk: query heads per key/value head

    @classmethod
    def for_model(cls, model, slots, max_len):
        a, w = model.args, model.tok_embeddings.weight
        return cls(a.n_layers, slots, a.n_kv_heads, max_len, a.head_dim, a.n_heads // a.n_kv_heads, w.device, w.dtype)

    def copy_slots(self, src, dst, length):
        """Copy the first `length` positions of slots `src` into slots `dst` (a prefix shared by prompts)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def move_slots(self, src, dst):
        """Whole slots `src` to slots `dst` (the engine packing live slots low)."""
        for k, v in zip(self.k, self.v):
            k[dst], v[dst] = k[src], v[src]

    def store(self, layer, slots, index, k, v):
        """k, v (B, T, Hkv, D) of this step into slot slots[b] at positions index[b, t]."""
        # advanced indexing on (slot, position) with the heads sliced: one scatter per layer and tensor
        self.k[layer][slots[:, None], :, index] = k  # k[l, slots[b], :, index[b, t]] = k[b, t]
        self.v[layer][slots[:, None], :, index] = v

    def fresh(self, slots, T):
        return FreshView(self, slots, T)

    def extend(self, slots, start, T, kv_len):
        return ExtendView(self, slots, start, T, kv_len)

    def grouped(self, slots, members, plen, start, T, stride, n_slots, kv_len, in_order=False):
        return GroupedView(self, slots, members, plen, start, T, stride, n_slots, kv_len, in_order)


class FreshView:
    """A prefill from position 0: sequence b (right-padded to T) goes into slot slots[b] at positions 0..T-1,
    and attends causally to its own new tokens only (the slot's old contents are never read), so flash
    attention can serve it."""

    def __init__(self, cache, slots, T):
        self.cache, self.slots = cache, slots
        self.positions = torch.arange(T, device=slots.device).expand(len(slots), T)  # (B, T)

    def attend(self, layer, q, k, v, backend):
        self.cache.store(layer, self.slots, self.positions, k, v)
        # the new tokens are all there is to see: plain causal attention over them, the cache only stores
        return attention(q, k, v, backend=backend)


class ExtendView:
    """Each sequence continues the prefix cached in its slot: token t of sequence b sits at position
    start[b] + t and sees the slot's positions up to its own. kv_len, a host-side bound on max(start) + T,
    limits attention to the live part of the slots without a device sync."""

    def __init__(self, cache, slots, start, T, kv_len):
        self.cache, self.slots, self.kv_len = cache, slots, kv_len
        self.positions = start[:, None] + torch.arange(T, device=start.device)  # (B, T)
        # a ragged batch is right-padded; a short row's padding after a long prefix can run past the slot.
        # Padding keys are never read (the mask hides them, decoding overwrites them), so they all go to
        # the slot's last position, which no prompt token occupies (a slot has room for new tokens).
        self.index = self.positions.clamp(max=cache.max_len - 1)
        # key position j is visible to the query at position p iff j <= p: (B, 1, T, S)
        self.mask = (torch.arange(kv_len, device=start.device) <= self.positions[:, :, None])[:, None]

    def attend(self, layer, q, k, v, backend):
        self.cache.store(layer, self.slots, self.index, k, v)
        # gathers each row's slot (a copy): fine for prefills after a shared prefix; decoding uses `grouped`
        kc = self.cache.k[layer][self.slots, :, :self.kv_len]  # (B, Hkv, S, D)
        vc = self.cache.v[layer][self.slots, :, :self.kv_len]
        return attention(q, kc.transpose(1, 2), vc.transpose(1, 2), mask=self.mask, backend="sdpa")


class GroupedView:
    """Sequences continuing prompts held once per slot, their tokens interleaved after it (see KVCache).

    Sequence b is member members[b] of slot slots[b], whose prompt has plen[b] tokens; it has generated
    start[b] tokens before this step's T. The queries of all members of a slot, and of all query heads that
    share a key/value head, are stacked into one query block, so each cached prompt key is read once per slot.
    Only slots [0, n_slots) are attended: a sequence whose slot lies beyond is idle (it writes into that
    scratch slot and its output is meaningless), which lets a compiled decode step keep static shapes.
    in_order: the caller knows that sequence b is member b % stride of slot b // stride, for all n_slots * stride
    places (a full batch, the usual case): the queries and outputs then need no gathering.
    """

    def __init__(self, cache, slots, members, plen, start, T, stride, n_slots, kv_len, in_order=False):
        device = slots.device
        self.cache, self.stride, self.n_slots, self.kv_len, self.T = cache, stride, n_slots, kv_len, T
        steps = start[:, None] + torch.arange(T, device=device)  # (B, T): the step of each new token
        self.positions = plen[:, None] + steps  # rotary positions: the prompt, then the sample's own tokens
        self.slots, self.index = slots, plen[:, None] + steps * stride + members[:, None]
        self.inv = self.flat = None  # in order: sequence b fills place b, nothing to gather
        if not in_order:
            # the member grid: place slot * stride + member of each sequence; `inv` says which sequence fills
            # each place of the attended slots (empty places borrow sequence 0: their queries are discarded)
            place, n_places = slots * stride + members, n_slots * stride  # (B,)
            inv = torch.zeros(cache.slots * stride, dtype=torch.long, device=device)
            inv[place] = torch.arange(len(slots), device=device)
            self.inv = inv[:n_places]
            self.flat = place.clamp(max=n_places - 1)  # idle sequences read some place; ignored
            plen, start = plen[self.inv], start[self.inv]
        self.mask = self._mask(plen, start, cache.qpk)

    def _mask(self, plen, start, qpk):
        """(n_slots, 1, stride * T * qpk, kv_len) bool: the query of member j at step s sees its slot's prompt
        and its own tokens up to step s, i.e. index plen + s' * stride + j for s' <= s."""
        G, M, T, device = self.n_slots, self.stride, self.T, plen.device
        rel = torch.arange(self.kv_len, device=device) - plen.view(G, M, 1, 1)  # (G, M, 1, S)
        j = torch.arange(M, device=device).view(1, M, 1, 1)
        s = start.view(G, M, 1, 1) + torch.arange(T, device=device).view(1, 1, T, 1)  # (G, M, T, 1)
        vis = (rel < 0) | ((rel % M == j) & (rel.div(M, rounding_mode="floor") <= s))  # (G, M, T, S)
        vis = vis[:, :, :, None].expand(G, M, T, qpk, self.kv_len).reshape(G, 1, M * T * qpk, self.kv_len)
        # additive, in the cache's dtype: SDPA would otherwise turn a boolean mask into this in each of the layers
        return torch.zeros(vis.shape, dtype=self.cache.k[0].dtype, device=device).masked_fill_(~vis, float("-inf"))

    def attend(self, layer, q, k, v, backend):
        # keys first: a member's query at step s must see its own key of step s
        self.cache.store(layer, self.slots, self.index, k, v)
        B, T, H, D = q.shape
        G, M, Hkv = self.n_slots, self.stride, k.size(2)
        # (B, T, H, D) -> per place of the member grid -> (G, M, T, Hkv, qpk, D) -> (G, Hkv, M * T * qpk, D):
        # for each slot and key/value head, one block of every query that reads its keys
        qg = q if self.inv is None else q[self.inv]
        qg = qg.view(G, M, T, Hkv, H // Hkv, D).permute(0, 3, 1, 2, 4, 5).reshape(G, Hkv, -1, D)
        kc, vc = self.cache.k[layer][:G, :, :self.kv_len], self.cache.v[layer][:G, :, :self.kv_len]  # (G, Hkv, S, D)
        y = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=self.mask)  # (G, Hkv, M * T * qpk, D)
        # and back: (G, Hkv, M, T, qpk, D) -> (G, M, T, Hkv, qpk, D) -> one row per place, then per sequence
        y = y.view(G, Hkv, M, T, H // Hkv, D).permute(0, 2, 3, 1, 4, 5).reshape(G * M, T, H, D)
        return y if self.flat is None else y[self.flat]
