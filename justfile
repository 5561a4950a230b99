# The entry point for everything: `just --list` shows the recipes.
set shell := ["bash", "-euo", "pipefail", "-c"]

# Start the service on its embedded defaults (demo model, SQLite file, in-memory runs)
serve: sync
    uv run python -m service

# Run the whole test suite (pass pytest arguments after it, e.g. `just test tests/unit -x`)
test *args: sync browser
    uv run pytest {{args}}

# The tests that assert latency figures (marked `latency`, left out of `just test`): run them on a quiet machine
test-latency *args: sync
    uv run pytest -m latency {{args}}

# Ruff (format and lint) and pyright in strict mode on service/
lint: sync
    uv run ruff format --check .
    uv run ruff check .
    uv run pyright

# Regenerate the committed API documents (openapi/openapi.json, openapi/asyncapi.yaml)
openapi: sync
    uv run python -m service.openapi write

# Fail when the committed API documents differ from what the app produces
openapi-check: sync
    uv run python -m service.openapi check

# The API fuzz run of ACCEPTANCE F1: schemathesis with 200 examples per operation and mode
fuzz: sync
    SERVICE_TEST_FUZZ_EXAMPLES=200 uv run pytest tests/integration/test_schemathesis.py -n 0 -q -s

# Apply the database migrations to SERVICE_DATABASE_URL (the service also does it at start-up)
migrate: sync
    uv run python -m service migrate

# Benchmark the service against a bare ASGI floor and a FastAPI relay (`just bench --quick` for a smoke run)
bench *args: sync
    uv run python -m tests.bench {{args}}

# CPU per run as one chat grows to 1,400 messages (the history a run's start reads)
bench-history *args: sync
    uv run python -m tests.bench.history {{args}}

# Replay speed of a late reader and memory per finished run, for each run backend
bench-resume *args: sync
    uv run python -m tests.bench.resume {{args}}

# Create or update the virtual environment from the lock file
sync:
    uv sync --locked --quiet

# Install Debian's chromium for the browser tests when it is missing and we may install it
browser:
    #!/usr/bin/env bash
    if command -v chromium >/dev/null 2>&1; then exit 0; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium: browser tests will skip"
    else
        echo "chromium is not installed: browser tests will skip (apt-get install chromium)"
    fi
