"""Tiny real assets made in-process: byte-level BPE tokenizers, a perfect teacher over an
enumerated string distribution, and the enumerated truth of the induced student
distribution (scoring.md §4)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from pipeline.tokenization import GPT2_PATTERN, QWEN2_PATTERN, build_byte_level_bpe, truncate_merges

EOS = "<|endoftext|>"
ALPHABET = ("a", "b", " ", "1")
# Byte-level symbols of the alphabet ("Ġ" is the space byte).
BASE = ("a", "b", "Ġ", "1")
# Every operand is made earlier; whitespace runs, digits, a space+digit merge (GPT-2
# style " 1") and a space+letter merge exercise the look-ahead traps.
MERGES: tuple[tuple[str, str], ...] = (
    ("Ġ", "Ġ"),
    ("a", "b"),
    ("Ġ", "a"),
    ("1", "1"),
    ("ĠĠ", "Ġ"),
    ("ab", "a"),
    ("Ġa", "b"),
    ("b", "1"),
    ("Ġ", "1"),
    ("a", "a"),
    ("Ġab", "a"),
    ("ĠĠ", "a"),
)

PATTERNS = {"gpt2": None, "gpt2-split": GPT2_PATTERN, "qwen2": QWEN2_PATTERN}


def tiny_teacher_tokenizer(
    pattern: str = "qwen2", merges: Sequence[tuple[str, str]] = MERGES
) -> Tokenizer:
    vocab = {s: i for i, s in enumerate(BASE)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return build_byte_level_bpe(vocab, merges, pattern=PATTERNS[pattern], added_tokens=[EOS])


def tiny_pair(n: int, pattern: str = "qwen2") -> tuple[Tokenizer, Tokenizer]:
    teacher = tiny_teacher_tokenizer(pattern)
    return teacher, truncate_merges(teacher, n)


def all_strings(max_len: int, alphabet: Sequence[str] = ALPHABET) -> list[str]:
    out = []
    for n in range(max_len + 1):
        out.extend("".join(p) for p in itertools.product(alphabet, repeat=n))
    return out


def string_distribution(max_len: int, seed: int) -> dict[str, float]:
    """Random weights over all strings up to max_len (heavy-tailed, all positive)."""
    rng = np.random.default_rng(seed)
    strings = all_strings(max_len)
    w = np.exp(rng.normal(0.0, 1.5, size=len(strings)))
    w /= w.sum()
    return dict(zip(strings, w.tolist(), strict=True))


class PrefixTable:
    """Next-symbol masses after every prefix of a set of weighted id sequences."""

    def __init__(self, sequences: dict[tuple[int, ...], float], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.table: dict[tuple[int, ...], np.ndarray] = defaultdict(lambda: np.zeros(vocab_size))
        for seq, p in sequences.items():
            for k in range(len(seq)):
                self.table[seq[:k]][seq[k]] += p

    def dist(self, prefix: Sequence[int]) -> np.ndarray | None:
        row = self.table.get(tuple(prefix))
        if row is None or row.sum() <= 0:
            return None
        return row / row.sum()


def encode(tok: Tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tok.encode(text, add_special_tokens=False).ids)


class PerfectTeacher:
    """A teacher whose mass is exactly on canonical encodings of an enumerated
    distribution over strings, each followed by EOS. Float64 throughout."""

    def __init__(self, tokenizer: Tokenizer, dist: dict[str, float]) -> None:
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eos = tokenizer.token_to_id(EOS)
        seqs: dict[tuple[int, ...], float] = defaultdict(float)
        for s, p in dist.items():
            seqs[(*encode(tokenizer, s), eos)] += p
        self.table = PrefixTable(seqs, self.vocab_size)
        self.calls = 0
        self.contexts = 0

    def next_token_logprobs(self, contexts: Sequence[Sequence[int]]) -> np.ndarray:
        self.calls += 1
        self.contexts += len(contexts)
        out = np.empty((len(contexts), self.vocab_size))
        for i, c in enumerate(contexts):
            d = self.table.dist(c)
            if d is None:  # a context with no mass: any distribution (its weight is 0)
                d = np.full(self.vocab_size, 1.0 / self.vocab_size)
            with np.errstate(divide="ignore"):
                out[i] = np.log(d)
        return out


def student_truth(student: Tokenizer, dist: dict[str, float]) -> PrefixTable:
    """P_S(next | prefix) induced by the string distribution, by enumeration."""
    eos = student.token_to_id(EOS)
    seqs: dict[tuple[int, ...], float] = defaultdict(float)
    for s, p in dist.items():
        seqs[(*encode(student, s), eos)] += p
    return PrefixTable(seqs, student.get_vocab_size(with_added_tokens=True))


def hf_tokenizer(tok: Tokenizer, eos: str = EOS):
    """A transformers fast tokenizer around a `tokenizers.Tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


def tiny_causal_lm(vocab_size: int, arch: str = "qwen2", seed: int = 0, logits: int | None = None):
    """A small seeded random causal LM (2 layers, hidden 64). ``logits`` > vocab_size adds
    padding columns, as real checkpoints have."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    cfg = cfg_cls(
        vocab_size=logits or vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg)
    # Larger output weights than the default init make the distribution far from uniform.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.5)
    return model.eval()


CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
)


def trained_byte_bpe(vocab_size: int = 400, seed_text: str | None = None) -> Tokenizer:
    """A byte-level BPE (GPT-2 regex, all 256 bytes) trained on Python's bundled docs."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from pipeline.assets import generated_texts

    text = seed_text or "\n\n".join(generated_texts(300))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def save_tiny_hf_teacher(path, vocab_size: int = 400, seed: int = 0):
    """A tiny random Llama teacher + trained byte-level tokenizer saved as an HF dir."""
    tok = trained_byte_bpe(vocab_size)
    hf = hf_tokenizer(tok)
    hf.chat_template = CHAT_TEMPLATE
    model = tiny_causal_lm(len(hf), arch="llama", seed=seed)
    model.save_pretrained(path)
    hf.save_pretrained(path)
    return path


def tiny_job_args(teacher_dir, input_glob: str, output: str, *extra: str) -> list[str]:
    """`jobs.generate` arguments for a small plain-text job with the tiny teacher."""
    return [
        "--show",
        "0",
        f"teacher.model={teacher_dir}",
        "teacher.device=cpu",
        "teacher.max_batch_tokens=512",
        "student.merges=60",
        "scoring.top_k=8",
        "input.messages_field=null",
        "input.loss_on=all",
        f"input.paths=[{input_glob}]",
        f"output.path={output}",
        *extra,
    ]


def tiny_job_config(teacher_dir, input_glob: str, output: str, *extra: str):
    """The `JobConfig` of `tiny_job_args`, for `pipeline.run`."""
    from pipeline.config import load_config

    return load_config(None, tiny_job_args(teacher_dir, input_glob, output, *extra)[2:])


def stop_process_group(proc, timeout: float) -> None:
    """SIGTERM a subprocess started with start_new_session, SIGKILL if it lingers."""
    import os
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
