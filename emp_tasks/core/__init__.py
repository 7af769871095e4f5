"""Core: pure rules and values, no I/O. Ids, times, errors, statuses and their
transition table, event names and the envelope, priority levels, signing, and the
parsed configuration. Imports nothing else of the project."""
