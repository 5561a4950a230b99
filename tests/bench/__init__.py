"""The streaming benchmark: ``uv run python -m tests.bench [--quick]`` (``just bench``).

Modules: ``upstream`` (fake OpenAI-compatible server), ``floor`` (bare ASGI target),
``relay`` (FastAPI + openai target), ``wire`` and ``client`` (load client), ``procs``
(processes and /proc), ``runner`` (one measured run), ``metrics``, ``report``, ``scenarios``.
"""
