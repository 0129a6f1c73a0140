"""The message plan of one p2p transfer: which layers each message carries. Pure.

Both sides derive it from the same two numbers (the cache's layers, the transfer's bytes), so
nothing about it crosses the wire. A message is a layer range of the layer-major staging layout
[l, 2, n, bs, h, D]; the sender gathers message k+1 while message k is on the link, and the
receiver scatters message k while k+1 is on the link. So that this pipeline hides the copies:
  - messages of about CHUNK_BYTES: NVLink is near its peak from ~32 MiB (301 GB/s for one
    32 MiB message, 343 GB/s at 134 MiB on 2 x H200), and each message has a cost of its own:
    16k tokens of Llama-3-8B KV landed in 7.26 ms as 32 messages and in 6.92 ms as 16 (raw
    single send 5.82 ms; 2 x H200, 2026-11-21), so messages are large: 128 MiB;
  - at least MIN_CHUNKS messages as long as each keeps MIN_CHUNK_BYTES (a transfer under
    2 x MIN_CHUNK_BYTES is one message), so that even 1k tokens overlap their copies;
  - with MIN_CHUNKS messages or more, of 4 layers or more, two short ones (a quarter of the
    layers) at the ends: the gather before the first send and the scatter after the last
    receive are the copies that nothing overlaps.
Layers are indivisible: at 64 MiB per layer (16k tokens of Llama-3-8B) a message is one layer.
"""

from __future__ import annotations

CHUNK_BYTES = 128 << 20
MIN_CHUNK_BYTES = 4 << 20
MIN_CHUNKS = 4


def layer_chunks(num_layers: int, num_bytes: int) -> list[tuple[int, int]]:
    """Layer ranges [(l0, l1), ...] of one transfer's messages, in order, covering every layer."""
    assert num_layers >= 1 and num_bytes >= 0
    if num_layers == 1 or num_bytes < 2 * MIN_CHUNK_BYTES:
        return [(0, num_layers)]
    count = min(
        num_layers, num_bytes // MIN_CHUNK_BYTES, max(MIN_CHUNKS, round(num_bytes / CHUNK_BYTES))
    )
    edge = num_layers // count // 4 if count >= MIN_CHUNKS else 0  # layers of each short end
    if edge == 0:
        return _split(0, num_layers, count)
    return [(0, edge), *_split(edge, num_layers - edge, count), (num_layers - edge, num_layers)]


def _split(start: int, end: int, count: int) -> list[tuple[int, int]]:
    """[start, end) in `count` near-equal ranges."""
    bounds = [start + round(i * (end - start) / count) for i in range(count + 1)]
    return list(zip(bounds, bounds[1:]))
