"""The overlap settings in the job config: ``teacher.overlap``, ``teacher.prepare_workers``
and ``ray.num_cpus_per_actor`` parse and refuse bad values clearly, stay out of the
config hash, resolve in `GenerateStep` (constructor arguments over the config, auto by
the teacher's device and the step's CPUs) and in the Ray executor's actor resources
(`actor_resources`, from the nodes' resource dicts), and a local run with the overlap
and a prepare worker process writes the same shard bytes as one without, leaving no
worker process behind."""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ConfigError, config_reference, load_config


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


# ------------------------------------------------------------------- config
def test_defaults_are_auto_and_listed_in_help_config():
    cfg = _cfg()
    assert cfg.teacher.overlap == "auto"
    assert cfg.teacher.prepare_workers == "auto"
    assert cfg.ray.num_cpus_per_actor == "auto"
    ref = "\n".join(config_reference())
    for key in ("teacher.overlap:", "teacher.prepare_workers:", "ray.num_cpus_per_actor:"):
        assert key in ref


def test_values_parse_from_overrides_and_yaml(tmp_path):
    cfg = _cfg("teacher.overlap=on", "teacher.prepare_workers=3", "ray.num_cpus_per_actor=2.5")
    assert (cfg.teacher.overlap, cfg.teacher.prepare_workers) == ("on", 3)
    assert cfg.ray.num_cpus_per_actor == 2.5
    # YAML reads a bare on/off as a boolean
    p = tmp_path / "job.yaml"
    p.write_text("teacher:\n  overlap: off\n  prepare_workers: 0\nray:\n  num_cpus_per_actor: 1\n")
    cfg = load_config(p)
    assert (cfg.teacher.overlap, cfg.teacher.prepare_workers) == ("off", 0)
    assert cfg.ray.num_cpus_per_actor == 1.0
    assert _cfg("teacher.overlap=auto", "ray.num_cpus_per_actor=auto").ray.num_cpus_per_actor == (
        "auto"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.overlap=maybe", "teacher.overlap: Input should be 'auto', 'on' or 'off'"),
        ("teacher.prepare_workers=-1", "must be an integer >= 0 or auto, not -1"),
        ("teacher.prepare_workers=many", "must be an integer >= 0 or auto, not 'many'"),
        ("teacher.prepare_workers=1.5", "must be an integer >= 0 or auto, not 1.5"),
        ("teacher.prepare_workers=true", "must be an integer >= 0 or auto, not True"),
        ("ray.num_cpus_per_actor=-1", "must be a number >= 0 or auto, not -1"),
        ("ray.num_cpus_per_actor=lots", "must be a number >= 0 or auto, not 'lots'"),
        ("ray.num_cpus_per_actor=.nan", "must be a number >= 0 or auto, not nan"),
    ],
)
def test_bad_values_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match="invalid job config") as info:
        _cfg(override)
    key = override.split("=")[0]
    assert f"{key}: " in str(info.value) and message in str(info.value)
    assert str(info.value).count("\n") == 1  # one line, not one per union member


def test_prepare_workers_without_overlap_is_refused():
    with pytest.raises(ConfigError, match=r"teacher.prepare_workers=2 needs teacher.overlap on"):
        _cfg("teacher.overlap=off", "teacher.prepare_workers=2")
    assert _cfg("teacher.overlap=off", "teacher.prepare_workers=0").teacher.prepare_workers == 0


def test_overlap_settings_do_not_change_the_config_hash():
    """Execution only (the same shard bytes): a resumed run may change them."""
    base = _cfg()
    other = _cfg("teacher.overlap=on", "teacher.prepare_workers=2", "ray.num_cpus_per_actor=4")
    assert other.target_hash() == base.target_hash()
    assert not {"teacher.overlap", "teacher.prepare_workers"} & set(base.target_settings())


# ------------------------------------------------------- GenerateStep resolution
def _step(*overrides: str, **kwargs):
    from pipeline.generate import GenerateStep

    return GenerateStep(_cfg(*overrides), **kwargs)


def _on(step, device: str):
    """The step as after `setup` with a teacher on ``device`` (the resolution reads
    only its device)."""
    step.teacher = SimpleNamespace(device=torch.device(device))
    return step


def test_auto_is_off_on_a_cpu_teacher_and_on_elsewhere():
    cpu = _on(_step(cpus=16), "cpu")
    assert (cpu.overlap_active, cpu.prepare_workers) == (False, 0)
    gpu = _on(_step(cpus=16), "cuda:0")
    assert (gpu.overlap_active, gpu.prepare_workers) == (True, 4)  # min(4, 16 - 2)
    assert _on(_step(cpus=8), "cuda").prepare_workers == 4
    assert _on(_step(cpus=5), "cuda").prepare_workers == 3
    assert _on(_step(cpus=2.5), "cuda").prepare_workers == 0
    assert _on(_step(cpus=1), "cuda").prepare_workers == 0
    # before setup (no teacher yet) the device counts as the CPU
    assert not _step().overlap_active


def test_forced_overlap_and_workers_from_the_config():
    on = _on(_step("teacher.overlap=on", cpus=16), "cpu")
    assert (on.overlap_active, on.prepare_workers) == (True, 0)  # auto: 0 on the CPU
    off = _on(_step("teacher.overlap=off", cpus=16), "cuda")
    assert (off.overlap_active, off.prepare_workers) == (False, 0)
    two = _on(_step("teacher.overlap=on", "teacher.prepare_workers=2", cpus=1), "cpu")
    assert (two.overlap_active, two.prepare_workers) == (True, 2)
    zero = _on(_step("teacher.prepare_workers=0", cpus=16), "cuda")
    assert (zero.overlap_active, zero.prepare_workers) == (True, 0)


def test_constructor_arguments_override_the_config():
    s = _on(_step("teacher.overlap=off", overlap=True, prepare_workers=1), "cpu")
    assert (s.overlap_active, s.prepare_workers) == (True, 1)
    s = _on(_step("teacher.overlap=on", "teacher.prepare_workers=3", overlap=False), "cuda")
    assert (s.overlap_active, s.prepare_workers) == (False, 0)  # no workers without overlap
    s = _on(_step("teacher.prepare_workers=3", prepare_workers=0, cpus=16), "cuda")
    assert s.prepare_workers == 0
    # attributes set later (as jobs.bench.overlap does); None: from the config again
    s.overlap, s.prepare_workers = None, None
    assert (s.overlap_active, s.prepare_workers) == (True, 3)


def test_auto_workers_without_cpus_use_this_process_cpus():
    from pipeline.executors import available_cpus

    n = available_cpus()
    assert n >= 1
    assert _on(_step(), "cuda").prepare_workers == max(0, min(4, n - 2))


# ------------------------------------------------------------ actor resources
def _resources(nodes, *overrides: str):
    from pipeline.ray_executor import actor_resources

    return actor_resources(nodes, _cfg(*overrides))


def test_auto_cpus_on_cpu_nodes_is_one_per_actor():
    assert _resources([{"CPU": 16.0}]) == ({"num_cpus": 1.0}, 16)
    assert _resources([{"CPU": 3.0}, {"CPU": 2.0, "memory": 1e9}]) == ({"num_cpus": 1.0}, 5)
    # GPU nodes but no GPU actors asked for: CPU actors
    assert _resources([{"CPU": 16.0, "GPU": 2.0}], "ray.num_gpus_per_actor=0") == (
        {"num_cpus": 1.0},
        16,
    )


def test_auto_cpus_on_gpu_nodes_follow_the_cpus_per_gpu():
    # the shipped manifests: a CPU-less head and 8-CPU, 1-GPU workers
    head, worker = {"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}
    assert _resources([head, worker, worker]) == ({"num_gpus": 1.0, "num_cpus": 8.0}, 2)
    # at most 8, fewer where a node has fewer CPUs per GPU (the fewest of the GPU nodes,
    # so that every node fills its GPUs), rounded down
    assert _resources([{"CPU": 96.0, "GPU": 8.0}]) == ({"num_gpus": 1.0, "num_cpus": 8.0}, 8)
    big, small = {"CPU": 96.0, "GPU": 8.0}, {"CPU": 26.0, "GPU": 4.0}
    assert _resources([{"CPU": 4.0}, big, small]) == ({"num_gpus": 1.0, "num_cpus": 6.0}, 12)
    # half a GPU per actor: half the CPUs per GPU
    assert _resources([{"CPU": 8.0, "GPU": 1.0}], "ray.num_gpus_per_actor=0.5") == (
        {"num_gpus": 0.5, "num_cpus": 4.0},
        2,
    )
    # fewer CPUs than GPUs: 1 CPU each, and the CPUs bound how many actors fit
    assert _resources([{"CPU": 1.0, "GPU": 2.0}]) == ({"num_gpus": 1.0, "num_cpus": 1.0}, 1)
    # nodes with fewer GPUs than an actor needs do not count for the CPUs per GPU
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 32.0, "GPU": 4.0}]
    assert _resources(nodes, "ray.num_gpus_per_actor=2") == (
        {"num_gpus": 2.0, "num_cpus": 8.0},
        2,
    )


def test_explicit_cpus_are_kept():
    gpu_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert _resources(gpu_nodes, "ray.num_cpus_per_actor=0.5") == (
        {"num_gpus": 1.0, "num_cpus": 0.5},
        2,
    )
    assert _resources([{"CPU": 16.0, "GPU": 2.0}], "ray.num_cpus_per_actor=10") == (
        {"num_gpus": 1.0, "num_cpus": 10.0},
        1,
    )
    assert _resources([{"CPU": 5.0}], "ray.num_cpus_per_actor=2") == ({"num_cpus": 2.0}, 2)
    typed = [{"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 1.0}]
    assert _resources(typed, "ray.accelerator_type=A100") == (
        {"num_gpus": 1.0, "num_cpus": 8.0, "accelerator_type": "A100"},
        1,
    )


# ------------------------------------------------------------------ end to end
def _prepare_workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("generate-prep")]


def test_local_run_with_overlap_and_a_worker_writes_the_same_bytes(
    tiny_teacher_dir, tmp_path, caplog
):
    """The local executor with ``teacher.overlap=on`` and ``teacher.prepare_workers=1``
    (a spawned worker process) writes the bytes of ``teacher.overlap=off``, says which
    it ran once, and stops its worker process at the end."""
    from pipeline.job import run
    from tests.tiny_assets import tiny_job_config

    inp = tmp_path / "in"
    inp.mkdir()
    long = " ".join(f"Sentence {i} of a long document, with words." for i in range(30))
    texts = [f"Document {i}: ab {i * 7} and a little text, {i}." for i in range(16)]
    texts.insert(7, long)
    (inp / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    small = ("teacher.max_batch_tokens=128", "teacher.max_context=64", "scoring.chunk_overlap=16")
    data, said = {}, {}
    for mode, extra in {
        "off": ("teacher.overlap=off",),
        "process": ("teacher.overlap=on", "teacher.prepare_workers=1"),
    }.items():
        out = tmp_path / f"out-{mode}"
        cfg = tiny_job_config(tiny_teacher_dir, str(inp / "*.jsonl"), str(out), *small, *extra)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.generate"):
            result = run(cfg, executor="local")
        said[mode] = [r.getMessage() for r in caplog.records if "tokenizer phase" in r.getMessage()]
        data[mode] = Path(out / "a.parquet").read_bytes()
        assert result.stats["shards"] == 1 and result.stats["sequences"] > len(texts)  # chunked
        assert not _prepare_workers()  # closed by the executor
    assert data["process"] == data["off"]
    assert len(said["off"]) == 1 and "overlap off (teacher.overlap=off" in said["off"][0]
    assert len(said["process"]) == 1
    assert (
        "overlap on (teacher.overlap=on, teacher on cpu), prepare workers 1" in said["process"][0]
    )
