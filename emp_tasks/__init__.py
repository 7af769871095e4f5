"""EMP Tasks: steps and workflows of AI generation work on fleets of GPU machines."""

__version__ = "0.1.0"
API_VERSION = "1"
