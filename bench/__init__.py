"""`python -m bench`: inferq's benchmark suite (`make bench` → BENCHMARKS.md + BENCHMARKS.png).

Everything runs in one session on one machine, against one embedded Valkey, so the ratios (inferq
vs the in-process limit, vs the naive RQ baselines) are computed inside one run: single figures
drift between processes on a shared machine far more than their ratios do.

Layout: `common` (images, statistics, processes), `limit` (raw in-process pipeline),
`baselines` (stock RQ workers), `loadgen` (closed- and open-loop HTTP clients), `service`
(end to end over HTTP), `peer` + `litserve_peer` (LitServe beside inferq), `queue_layer` (no-op
model: Redis/RQ alone), `variants` (bench-only batching variants), `report` + `plot` (the
output), `__main__` (the orchestration).
"""
