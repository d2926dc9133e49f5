"""The shard format and the audit import neither torch nor Ray (a fresh interpreter each,
so modules other tests imported do not count): `jobs.audit` and tools that only read
shards start in a fraction of a second and run where torch is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray")


def _loaded_after(code: str) -> dict[str, bool]:
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import pipeline.audit, pipeline.shards",
        "import pipeline.executors",
        "import schemas.run, schemas.targets",
        "import jobs.audit",
    ],
)
def test_the_format_and_the_audit_import_neither_torch_nor_ray(code):
    assert _loaded_after(code) == dict.fromkeys(HEAVY, False), code


def test_the_scorers_still_load_on_first_use():
    code = (
        "import sys\n"
        "import pipeline.scoring as s\n"
        "assert 'torch' not in sys.modules\n"
        "from pipeline.scoring import GeneralScorer, PreparedDocument, SubsetExactScorer\n"
        "assert s.SubsetExactScorer is SubsetExactScorer and 'torch' in sys.modules"
    )
    assert _loaded_after(code)["torch"] is True
