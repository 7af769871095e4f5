"""Steps, split by who asks: `client` (submit, cancel, retry), `attempts` (what a
worker reports: begin, progress, complete, fail, hand back, fenced by attempt),
`recovery` (lost attempts, requeue, expiry, re-sending after broker loss) and
`queries` (reads). `workflows` is the DAG; `transitions` applies a step's state changes
and writes their events (it knows nothing of workflows). Imports point down
(`.importlinter`): `client` and `recovery` above `attempts` and `queries`, then
`workflows`, then `transitions`."""
