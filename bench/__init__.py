"""Benchmark v0: EMP Tasks against bare Celery on the same Redis, run with `python -m bench`.

This package owns the benchmark, and `scratch` (a throwaway database and Redis
index for one run), which the test suite uses too. Its modules: `__main__`
(command line and the order of the run), `ours` (the Procfile system driven over HTTP), `baseline`
(bare Celery worker subprocesses driven from this process), `bare_celery` (the
Celery app those workers load), `workflows` (the workflow shapes, as an EMP Tasks
request body and as a Celery canvas), `webhook_rows` (the webhook latency
configurations and their local receiver, EMP Tasks only), `live_rows` (the
WebSocket event latency configurations and their clients, EMP Tasks only), `stats` (percentiles,
deadlines, one system's result) and `report` (the printed table).
"""
