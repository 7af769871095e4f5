"""The worker process: the Celery task body and signals (`tasks`), running one attempt
(`execution`), presence and queue consumption, attempt leases, the per-GPU launcher."""
