"""Shared fixtures: offline HF, paths to the optional shared data, the demo teacher."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from pipeline.assets import gsm8k_path, shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data not present")
    return d


@pytest.fixture(scope="session")
def gsm8k_texts() -> list[str]:
    import json

    p = gsm8k_path()
    if p is None:
        pytest.skip("GSM8K not present in ../shared/data")
    out = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            out.append("\n\n".join(m["content"] for m in msgs))
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from pipeline.assets import smollm2_dir as get

    try:
        return get()
    except FileNotFoundError as err:
        pytest.skip(str(err))
