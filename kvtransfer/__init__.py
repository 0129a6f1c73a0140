"""KV transfer between prefill and decode workers, and the tiered HBM -> CPU -> NVMe store.

Entry points: `kvtransfer.cache_view.KVCacheView`, `kvtransfer.handle.KVHandle`,
`kvtransfer.interfaces.{KVSender, KVReceiver, KVPoll}`, transports under
`kvtransfer.transports` (fake, grpc_stream, torch_p2p), `kvtransfer.tiers.store.TieredStore`,
`kvtransfer.reshard` (heterogeneous TP).
"""
