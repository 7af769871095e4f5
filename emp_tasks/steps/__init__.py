"""Steps: `transitions` applies a step's state changes and writes their events (it
knows nothing of workflows); `commands` is what clients, workers and recovery ask of a
step (submit, begin, complete, fail, cancel, retry, requeue) and the queries."""
