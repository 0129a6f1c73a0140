"""torch.distributed point-to-point transport (NCCL between GPUs, gloo on CPU for tests).

Data plane: layer-major messages per (transfer, head slice), planned by `layer_chunks`
(p2p_plan.py) from the layer count and byte count alone, so both sides know every message's
size from the handle. The sender gathers each message from the leased blocks into a staging
tensor [l, 2, n, bs, h, D] and posts its send at once, so the gather of message k+1 overlaps
the link carrying k; the receiver scatters each message into its destination blocks as it lands
(the scatter of k overlaps the receive of k+1). On CUDA both sides copy on their own stream
(copy_stream.py), after the engine work that wrote the KV (sender) or last used the destination
blocks (receiver), never behind the engine's later forward passes.

Control plane (the side channel), one round trip that the data does not wait for: the receiver
sends the gRPC unary `PrepareSend(transfer_id, receiver_rank, heads, epoch)` and posts all its
receives on `epoch` at once, before the answer. The sender checks the epoch and the lease,
takes a read of the lease, queues the transfer on its per-peer send thread and answers
accepted with the byte count; the send thread gathers and posts. The receiver waits for the
answer before it scatters. Acks use the gRPC `Ack` as in the gRPC transport. The link
(`P2PLink`, p2p_link.py) is a standalone process group of all KV-moving workers with
rebuild-after-failure and pairs set up eagerly (so posting never blocks on NCCL set-up);
ranks are group-local.

Rejections, with the receives already posted: every attempt ends with the pair in step or with
the generation broken. A transfer whose lease is gone (expired, failed, acked), registered by
this sender (one of its last 4096), is answered with filler: zero messages of the expected
sizes, queued like a send, and the answer carries their byte count; the receiver drains them
and fails the transfer. Any other rejection (`retry`: the epoch is gone or broke; an unknown id,
bad heads, a stopping sender) posts nothing, and the receiver breaks the generation, which a
`retry` finds broken already. Likewise an exception anywhere between posting and the end of an
attempt breaks it, on either side (a failed send is also logged).

Ordering: NCCL matches sends and receives per pair in issue order (tags are ignored), so each
side serializes per peer: the receiver holds a per-source lock from PrepareSend until its
receives completed, the sender sends in PrepareSend order.

Blocks: the sender's read of the lease lasts until its gathers ran on the device (a lease that
ends meanwhile is released after them); a receiver's write lasts until its scatter ran (a
cancel or failure frees the destination blocks after it). Neither waits on a peer.

Failure: a send or receive that fails or times out, or a PrepareSend whose outcome is unknown
(the sender may have queued a send nobody will receive), breaks the link's generation; both
sides rebuild it (epoch + 1). The transfer fails unless its receiver can still retry it in
time on the new epoch (a break caused elsewhere in the group). A cancelled transfer drains its
posted receives (keeping the pair in step) and writes nothing more. When the link failed for
good, receivers pull over gRPC (`GrpcReceiver`), which every p2p sender also serves.

Modules: p2p_sender.py and p2p_receiver.py (the two halves), p2p_plan.py (the messages),
p2p_link.py (the group and its epochs), p2p_pairs.py (eager pair set-up).
"""

from __future__ import annotations

from kvtransfer.transports.p2p_link import LinkBrokenError, P2PLink
from kvtransfer.transports.p2p_plan import layer_chunks
from kvtransfer.transports.p2p_receiver import TorchP2PReceiver
from kvtransfer.transports.p2p_sender import TorchP2PSender

__all__ = ["LinkBrokenError", "P2PLink", "TorchP2PReceiver", "TorchP2PSender", "layer_chunks"]
