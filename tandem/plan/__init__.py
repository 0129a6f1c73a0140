"""`tandem plan`: a discrete-event simulator of a whole Tandem cluster that sizes its pools.

It runs the production decision code against simulated time: the router's placement and
admission (`router.policy`), its booking of load between heartbeats (`router.registry`), and the
engine's real `Scheduler` over a real `KVManager` per simulated worker. Only the step times are
modelled, from a calibrated cost profile (`profile.py`). Pure Python: no torch, no Ray (except
`calibrate.calibrate_engine`, which times the real engine and imports it when called).

Modules: `profile` (costs from JSON), `workload` (ShareGPT or a fixed mix, Poisson arrivals),
`worker` (one simulated engine), `simulator` (the cluster and its router), `search` (goodput and
the configuration search), `report` (table, plots, the cluster spec), `calibrate`, `cli`.
"""
