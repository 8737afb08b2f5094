"""The serving engine's key/value memory: one cache of slots, allocated once, and the two views the
model writes through (GPT.hidden_states calls `update(layer, k, v)` on whatever cache it is given): a
decode step of rows 0..B-1, each at its own position, and a chunk of one row's prompt."""

from __future__ import annotations

import math
import mmap

import torch

from .config import GptnError


class SlotCache:
    """Keys and values of up to `slots` rows, n_ctx positions each; row position p sits at index p.
    Allocated once, at full size (as vLLM allocates its cache at start): no copy while serving, and a
    request can never make it larger. On a CPU its memory is committed page by page as rows write it
    (anonymous memory, zero until written), so an idle server holds little and a burst of rows takes
    what its tokens fill, not a doubling of the cache."""

    def __init__(self, config, slots: int, device, dtype):
        self.config, self.slots, self.dtype = config, slots, dtype
        c = config
        shape = (c.n_layer, slots, c.n_head, c.n_ctx, c.d_head)
        self.k, self.v = (_zeros_on_demand(shape, torch.device(device), dtype) for _ in "kv")

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` positions into row dst."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


def _zeros_on_demand(shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape), whose memory on a CPU is an anonymous mapping: the kernel commits and zeroes
    each page when it is first written, so unwritten slots cost no RAM."""
    if device.type != "cpu":
        try:
            return torch.zeros(shape, device=device, dtype=dtype)
        except torch.OutOfMemoryError:
            size = math.prod(shape) * dtype.itemsize * 2 / 2**30
            raise GptnError(f"the key/value cache for {shape[1]} rows of {shape[3]} positions ({size:.1f} GiB) does not "
                            f"fit on {device}; lower --max-batch") from None
    count = math.prod(shape)
    return torch.frombuffer(mmap.mmap(-1, count * dtype.itemsize), dtype=dtype, count=count).view(shape)


class DecodeView:
    """The cache as GPT.hidden_states sees it for one decode step of rows 0..B-1, row i writing its
    new key at its own position pos[i]."""

    def __init__(self, cache: SlotCache, pos: torch.Tensor, span: int):
        self.cache, self.pos, self.span, self.length = cache, pos, span, 0
        self.rows = torch.arange(len(pos), device=pos.device)

    def update(self, layer, k, v):
        B = len(self.pos)
        self.cache.k[layer][self.rows, :, self.pos] = k[:, :, 0]
        self.cache.v[layer][self.rows, :, self.pos] = v[:, :, 0]
        return self.cache.k[layer, :B, :, :self.span], self.cache.v[layer, :B, :, :self.span]


class PrefillView:
    """The cache for prefilling T tokens of the row in `slot` from position `start`."""

    def __init__(self, cache: SlotCache, slot: int, start: int):
        self.cache, self.slot, self.start, self.length = cache, slot, start, 0

    def update(self, layer, k, v):
        end = self.start + k.size(2)
        s = slice(self.slot, self.slot + 1)
        self.cache.k[layer, s, :, self.start:end] = k
        self.cache.v[layer, s, :, self.start:end] = v
        if self.start == 0:  # as KVCache.update: nothing before
            return k, v
        return self.cache.k[layer, s, :, :end], self.cache.v[layer, s, :, :end]
