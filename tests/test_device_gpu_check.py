"""CPU rehearsal of tools/device_gpu_check.sh, the one command prepared for the project's GPU machine: the first
GPU run must not be able to fail on plumbing.

As there: Transformer Engine and DALI do not import, megatron-core comes from wheels downloaded for the pinned
versions (tools/device_wheels.sh, here for this Python) and installed with ``pip install --no-index --no-deps
--target`` into a fresh directory, and tools/gpu_check.py runs from the checkout (``--dry-run``: tiny shapes on
CPU). One check is made to raise and one to kill its process (SIGSEGV): the others still run, the killed one is
recorded as crashed with the log's tail, and the JSON + Markdown hold every check with its time."""
import json
import os
import re
import subprocess
import sys

from tests.conftest import REPO, subprocess_env

# Loaded at interpreter start-up (sitecustomize on PYTHONPATH): blocks the modules the GPU machine lacks and
# replaces two checks, by name, with a failing and a crashing one.
SITECUSTOMIZE = '''
import importlib.abc, importlib.machinery, os, signal, sys

BLOCKED = ("transformer_engine", "nvidia.dali")


def _inject(module):
    fail, crash = os.environ["REHEARSAL_FAIL"], os.environ["REHEARSAL_CRASH"]

    def failing(ctx):
        raise RuntimeError("injected failure")

    def crashing(ctx):
        os.kill(os.getpid(), signal.SIGSEGV)

    module.CHECKS[:] = [(n, failing if n == fail else crashing if n == crash else fn) for n, fn in module.CHECKS]


class _Rehearsal(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked, as on the GPU machine)", name=name)
        if name == "megatron_zero_dev.gpu_check":
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module
            spec.loader.exec_module = lambda module: (run(module), _inject(module))
            return spec
        return None


sys.meta_path.insert(0, _Rehearsal())
'''


def _setup_pin(name: str) -> str:
    text = open(os.path.join(REPO, "setup.py")).read()
    return re.search(rf'"{re.escape(name)}==([^"]+)"', text).group(1)


def test_carried_wheels_are_setup_py_pins():
    pins = [line.split("==") for line in open(os.path.join(REPO, "tools", "device_wheels.txt"))
            if line.strip() and not line.startswith("#")]
    assert pins and all(version.strip() == _setup_pin(name) for name, version in pins)


def test_device_gpu_check_rehearsal(tmp_path):
    from megatron_zero_dev.gpu_check import CHECKS, NOT_INSTALLED

    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    wheels, site, out, hooks = tmp_path / "wheels", tmp_path / "site", tmp_path / "out", tmp_path / "hooks"
    env = subprocess_env()
    env["PYTHON"] = sys.executable
    p = subprocess.run(["tools/device_wheels.sh", ver, str(wheels)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [w.name.split("-")[:2] for w in wheels.iterdir()] == [["megatron_core", _setup_pin("megatron-core")]]

    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env.update(GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(site), GPU_CHECK_LIMIT_S="400",
               REHEARSAL_FAIL="generation_kv_cache", REHEARSAL_CRASH="sdpa_kernel",
               PYTHONPATH=os.pathsep.join([str(hooks), env.get("PYTHONPATH", "")]))
    p = subprocess.run(["tools/device_gpu_check.sh", str(out), "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, (p.stdout + p.stderr)[-6000:]  # a check failed: the injected one
    result = json.loads((out / "gpu_check.json").read_text())
    records = {r["check"]: r for r in result["checks"]}
    assert list(records) == [name for name, _ in CHECKS]  # every check, in order, despite the crash
    assert result["dry_run"] is True and result["ok"] is False and result["complete"] is True
    assert result["resumed"] == 1

    # megatron-core came from the wheel installed into the fresh target directory
    env_metrics = records["environment"]["metrics"]
    assert env_metrics["megatron_core_from"] == str(site / "megatron" / "core")

    crashed = records.pop("sdpa_kernel")
    assert crashed["status"] == "crashed" and crashed["ok"] is False and "exit 139" in crashed["note"]
    assert "attempt 1" in crashed["traceback"]  # the log's tail up to the crash
    failed = records.pop("generation_kv_cache")
    assert failed["status"] == "error" and failed["note"] == "RuntimeError: injected failure"
    assert 'raise RuntimeError("injected failure")' in failed["traceback"]
    absent = {n: records.pop(n) for n in ("te_vs_local_bf16", "fp8_step", "throughput_fp8", "dali_vs_pillow")}
    for r in absent.values():
        assert r["status"] == NOT_INSTALLED and r["ok"] is None and "not installed here" in r["note"]
    for name, r in records.items():  # the others ran and passed, each timed
        assert r["status"] == "ok" and r["ok"] is True and r["metrics"], (name, r)
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0
    assert records["nccl_step"]["metrics"]["backend"] == "gloo"  # CPU: gloo stands in for NCCL
    assert records["cross_entropy_kernel"]["metrics"]["fused_value_abs"] < 1e-5
    assert 0 < records["packed_vlm_stage2"]["metrics"]["real_token_fraction"] <= 1
    assert records["vs_transformers"]["metrics"]["transformers_tokens_per_s"] > 0
    assert {g["goal"] for g in records["throughput_bf16"]["goals"]} == {">= 45% MFU (bf16, local spec)"}
    top = records["throughput_bf16"]["metrics"]["profile_top"]  # where a step's time goes, for a missed goal
    assert top and any(e["op"] in ("aten::mm", "aten::addmm") for e in top) and 0 < sum(e["share"] for e in top) <= 1

    md = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| precision |" in md and "| goal |" in md
    assert "### throughput_bf16: where one step's time goes" in md
    assert "| te_vs_local_bf16 | not installed here |" in md and "| sdpa_kernel | **CRASHED** |" in md
    assert "### generation_kv_cache: error" in md and "### sdpa_kernel: crashed" in md
    log = (out / "gpu_check.log").read_text()
    assert "exited with status 139: resuming in a fresh process" in log
