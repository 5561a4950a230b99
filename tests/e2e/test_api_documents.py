"""The committed API documents are valid by their own standards' validators, run offline.

``openapi/openapi.json`` goes through openapi-spec-validator (OpenAPI 3.1's JSON Schema and rules);
``openapi/asyncapi.yaml`` through the AsyncAPI parser (``@asyncapi/parser``, pinned in
``tests/e2e/asyncapi/package-lock.json``), which is what the AsyncAPI CLI and generators run. Each
validator is also shown a broken copy, so neither check can pass by reading nothing.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from tests.support.live_server import REPO_ROOT
from tests.support.node import node_tools, npm_ci

OPENAPI = REPO_ROOT / "openapi" / "openapi.json"
ASYNCAPI = REPO_ROOT / "openapi" / "asyncapi.yaml"
PARSER_DIR = Path(__file__).parent / "asyncapi"


def test_the_openapi_document_is_valid_openapi_3_1() -> None:
    document = json.loads(OPENAPI.read_text())
    validate(document)
    broken = copy.deepcopy(document)
    next(iter(broken["paths"].values()))["get"]["responses"] = {"200": {"content": {}}}  # no description
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def _parse_asyncapi(path: Path) -> tuple[int, dict[str, Any]]:
    node, npm = node_tools("the AsyncAPI parser")
    npm_ci(PARSER_DIR, npm)
    result = subprocess.run(  # noqa: S603 - fixed command
        [node, "validate.mjs", str(path)], cwd=PARSER_DIR, capture_output=True, text=True, timeout=120, check=False
    )
    return result.returncode, json.loads(result.stdout)


def test_the_asyncapi_document_is_valid_asyncapi_3(tmp_path: Path) -> None:
    code, report = _parse_asyncapi(ASYNCAPI)
    assert (code, report) == (0, {"parsed": True, "errors": []})

    document = yaml.safe_load(ASYNCAPI.read_text())
    schemas = document["components"]["schemas"]
    schemas["AnyEvent"]["discriminator"] = {"propertyName": "type"}  # OpenAPI's form, which AsyncAPI refuses
    broken = tmp_path / "asyncapi.yaml"
    broken.write_text(yaml.safe_dump(document))
    code, report = _parse_asyncapi(broken)
    assert code == 1
    assert any("discriminator" in error["message"] for error in report["errors"]), report
