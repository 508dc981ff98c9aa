"""The shipped Metal kernels pass the strict MSL check (mps_ops/sim/msl_check.py, rules proven in
tests/sim/test_msl_check.py), every instantiation included, and each kernel's static threadgroup
memory is exactly what its launch plan declares (Launch::threadgroup_memory). Every kernel a plan
launches is found in its family's Metal library (build_config.family_of, as torch_tq_mps.mm)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

import _plans
from _bad_inputs import attention_args, copy_args, dequantize_args, quantize_args
from _gated_delta_bad_inputs import cumsum_args, h_args, kkt_args, o_args, rule_args, solve_args, wu_args

sys.path.insert(0, str(_plans.MPS_OPS))
import build_config  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHECK = _plans.MPS_OPS / "sim" / "msl_check.py"


def _cast(args: dict, dtype: torch.dtype, *names: str) -> dict:
    return {k: v.to(dtype) if k in names else v for k, v in args.items()}


def every_plan_call():
    """(op, kwargs) over every dtype, head dim, bit width and flag that selects a kernel."""
    for src, cache in itertools.product(DTYPES, DTYPES):
        yield "kv_cache_copy", _cast(_cast(copy_args(), src, "src"), cache, "cache")
    for D, bits in itertools.product((64, 128, 256, 512), (2, 3, 4, 5, 6, 8)):
        yield "dequantize_kv", dequantize_args(D=D, bits=bits)
        for dtype in DTYPES:
            yield "hadamard_quantize_kv", quantize_args(D=D, bits=bits, src_dtype=dtype)
            yield "flash_attn_vec_tq", _cast(attention_args(D=D, bits=bits), dtype, "q")
    for K, dtype in itertools.product((64, 128, 256), DTYPES):
        for op, l2norm in itertools.product(("fused_recurrent_gated_delta_rule", "chunk_gated_delta_rule"), (False, True)):
            yield op, dict(rule_args(K=K, dtype=dtype), use_qk_l2norm_in_kernel=l2norm)
        yield "chunk_fwd_h", _cast(h_args(K=K), dtype, "k")
    for dtype in DTYPES:
        yield "chunk_local_cumsum", _cast(cumsum_args(), dtype, "g")
        yield "chunk_scaled_dot_kkt", _cast(kkt_args(), dtype, "k")
        yield "chunk_fwd_o", _cast(o_args(), dtype, "q", "k")
        for v_dtype in DTYPES:
            yield "recompute_w_u", _cast(_cast(wu_args(), dtype, "k"), v_dtype, "v")
    yield "solve_tril", solve_args()


@pytest.fixture(scope="module")
def declared() -> dict[str, int]:
    """Kernel host name -> the threadgroup bytes its launch plan declares (one value per kernel)."""
    out: dict[str, set[int]] = {}
    for op, kwargs in every_plan_call():
        p = _plans.plan(op, **kwargs)
        assert p["error"] == "", (op, p["error"])
        for launch in p["launches"]:
            out.setdefault(launch["kernel"], set()).add(launch["threadgroup_memory"])
    assert all(len(v) == 1 for v in out.values()), {k: v for k, v in out.items() if len(v) > 1}
    return {k: v.pop() for k, v in out.items()}


@pytest.fixture(scope="module")
def checked(declared, tmp_path_factory):
    """The command line, as CI would run it, over every shipped .metal file and the plans' memory."""
    plan_memory = tmp_path_factory.mktemp("msl_check") / "threadgroup_memory.json"
    plan_memory.write_text(json.dumps(declared))
    sources = sorted(str(p) for p in _plans.KERNELS.glob("*.metal"))
    done = subprocess.run([sys.executable, str(CHECK), "--json", "--threadgroup-memory", str(plan_memory), *sources],
                          capture_output=True, text=True)
    return done.returncode, json.loads(done.stdout) if done.stdout.startswith("{") else None, done.stderr


def test_shipped_kernels_pass_the_strict_check(checked):
    returncode, report, stderr = checked
    assert report is not None, stderr
    assert report["violations"] == [] and returncode == 0, "\n".join(
        f"{v['file']}:{v['line']}: [{v['rule']}] {v['message']}" for v in report["violations"])


def test_every_planned_kernel_is_checked_with_the_memory_its_plan_declares(checked, declared):
    _returncode, report, stderr = checked
    assert report is not None, stderr
    kernels = report["kernels"]
    assert sorted(set(declared) - set(kernels)) == []  # every kernel a plan launches was compiled and checked
    assert {k: declared[k] for k in declared} == {k: kernels[k]["threadgroup_bytes"] for k in declared}
    # Apple's limit is 32 KiB; 4 KiB are left to the compiler.
    assert max(k["threadgroup_bytes"] for k in kernels.values()) <= 28 * 1024
    assert sorted(set(kernels) - set(declared)) == []  # no instantiation that no plan launches


def test_every_planned_kernel_is_in_the_family_the_simulator_compiles_it_from(declared):
    families = build_config.metal_families()
    for kernel in declared:
        assert build_config.family_of(kernel, families) == _plans.kernel_source(kernel).stem, kernel
