"""Store: where state lives. PostgreSQL (engine, sessions, models), Redis, the outbox
(recording an event and publishing it), the broker (the Celery app object and sending a
step's task), idempotency keys, rate limits and log set-up. Imports only the core."""
