"""Routes: which queue a step's task goes to (a queue per service, requirements and
customer), the worker capabilities that decide who may serve it, and queue reads
(depth, consumers, warnings for steps nobody can serve)."""
