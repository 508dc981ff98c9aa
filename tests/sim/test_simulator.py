"""Tests of the MSL simulator itself (mps_ops/sim) with purpose-written tiny kernels."""

import ctypes
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import msl_sim

KERNELS = Path(__file__).resolve().parent / "kernels"
KERNEL_INCLUDES = [Path(__file__).resolve().parents[2] / "mps_ops" / "kernels"]


@pytest.fixture(scope="module")
def correct():
    return msl_sim.compile_library([KERNELS / "correct.metal"], include_dirs=KERNEL_INCLUDES)


@pytest.fixture(scope="module")
def bugs():
    return msl_sim.compile_library([KERNELS / "bugs.metal"], include_dirs=KERNEL_INCLUDES)


def nan_tensor(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


# ---- 1. a correct kernel gives exactly the reference ----------------------------------------------
@pytest.mark.parametrize("dtype", ["float", "half"])
@pytest.mark.parametrize("threads", [256, 96])
def test_tg_reduce_matches_reference(correct, threads, dtype):
    torch.manual_seed(threads)
    groups = 3
    n = groups * threads
    # Launch 1 (sums): small random integers make every summation order exact, so the
    # comparison is bitwise. Launch 2 (conversions): real-valued random inputs, compared bit for
    # bit with torch's float16/bfloat16 rounding.
    xin = torch.randint(-50, 50, (n, 4)).float()
    x = torch.randn(n, 4) * torch.tensor([1.0, 1e3, 1.0, 1.0])
    sums = nan_tensor(groups)
    as_half = torch.empty(n, dtype=torch.float16)
    as_bf16 = torch.empty(n, dtype=torch.bfloat16)
    params = struct.pack("If", n, 0.5)
    stats = correct.launch(f"tg_reduce_{dtype}", grid=groups, threadgroup=threads,
                           buffers={0: xin, 1: sums, 2: as_half, 3: as_bf16, 4: params})
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    per_simdgroup = ((xin * w).sum(1) * 0.5).view(groups, threads // 32, 32).sum(2)
    if dtype == "half":  # the threadgroup array holds half partial sums
        per_simdgroup = per_simdgroup.half().float()
    ref = per_simdgroup.sum(1)
    assert torch.equal(sums, ref)
    # Exact device traffic: every thread reads its float4 and the scale; thread 0 of each
    # threadgroup writes one sum; every thread writes one half and one bfloat.
    assert stats.bytes_read == {0: 16 * n, 1: 0, 2: 0, 3: 0, 4: 4 * n}
    assert stats.bytes_written == {0: 0, 1: 4 * groups, 2: 2 * n, 3: 2 * n, 4: 0}

    correct.launch(f"tg_reduce_{dtype}", grid=groups, threadgroup=threads,
                   buffers={0: x, 1: sums, 2: as_half, 3: as_bf16, 4: params})
    assert torch.equal(as_half.view(torch.int16), x[:, 0].half().view(torch.int16))
    assert torch.equal(as_bf16.view(torch.int16), x[:, 1].bfloat16().view(torch.int16))


def test_partial_simdgroup_shuffle_from_missing_lane(correct):
    # 40 threads: the second simdgroup has 8 lanes, so the xor butterfly reads lanes that do not exist.
    x = torch.randint(-50, 50, (40, 4)).float()
    bufs = {0: x, 1: nan_tensor(1), 2: torch.empty(40, dtype=torch.float16),
            3: torch.empty(40, dtype=torch.bfloat16), 4: struct.pack("If", 40, 1.0)}
    with pytest.raises(msl_sim.SimError, match=r"simdgroup 1, lane 0\]: simd_shuffle_xor reads lane 16, which does "
                       r"not exist in this simdgroup of 8 lanes"):
        correct.launch("tg_reduce_float", grid=1, threadgroup=40, buffers=bufs)


def test_builtins_3d(correct):
    grid, tg = (2, 3, 2), (5, 4, 3)
    gx, gy, gz = (g * t for g, t in zip(grid, tg))
    out = torch.full((gz, gy, gx, 12), -1, dtype=torch.int32)
    correct.launch("builtins", grid=grid, threadgroup=tg, buffers={0: out})
    z, y, x = np.meshgrid(np.arange(gz), np.arange(gy), np.arange(gx), indexing="ij")
    tidx = ((z % tg[2]) * tg[1] + (y % tg[1])) * tg[0] + (x % tg[0])
    ref = np.stack([x // tg[0], y // tg[1], z // tg[2], x % tg[0], y % tg[1], tidx, tidx % 32, tidx // 32,
                    np.full_like(x, 60), np.full_like(x, 12), np.full_like(x, 32), np.full_like(x, 2)], axis=-1)
    assert np.array_equal(out.numpy(), ref)


def test_simd_collectives(correct):
    torch.manual_seed(1)
    n = 64
    x = torch.randint(-100, 100, (n,), dtype=torch.int32)
    out = torch.full((n, 10), -7, dtype=torch.int32)
    correct.launch("simd_ops", grid=1, threadgroup=n, buffers={0: x, 1: out})
    v = x.view(2, 32).numpy().astype(np.int64)
    lane = np.arange(32)
    ref = np.zeros((2, 32, 10), dtype=np.int64)
    for s in range(2):
        ref[s, :, 0] = np.concatenate([[0], np.cumsum(v[s])[:-1]])
        ref[s, :, 1] = np.where(lane + 3 < 32, v[s][np.minimum(lane + 3, 31)], v[s])
        ref[s, :, 2] = np.where(lane >= 5, v[s][np.maximum(lane - 5, 0)], v[s])
        ref[s, :, 3] = v[s][7]
        ref[s, :, 4] = v[s].max()
        ref[s, :, 5] = v[s].min()
        ref[s, :, 6] = v[s][(lane * 7) % 32]
        ref[s, :, 7] = 1
        ref[s, :, 8] = 1
        ref[s, :, 9] = int(sum(1 << i for i in range(32) if v[s][i] > 0)) & 0xFFFFFFFF
    ref[..., 9] = ref[..., 9].astype(np.uint32).view(np.int32)
    assert np.array_equal(out.view(2, 32, 10).numpy(), ref)


def test_atomics(correct):
    torch.manual_seed(2)
    x = torch.randn(4 * 64)
    count = torch.zeros(1, dtype=torch.int32)
    per_group = torch.full((4,), -1, dtype=torch.int32)
    stats = correct.launch("count_positive", grid=4, threadgroup=64, buffers={0: x, 1: count, 2: per_group})
    assert count.item() == int((x > 0).sum())
    assert per_group.tolist() == (x.view(4, 64) > 0).sum(1).tolist()
    assert stats.bytes_read[0] == 4 * x.numel()
    # Each atomic_fetch_add reads and writes its 4 bytes.
    assert stats.bytes_read[1] == stats.bytes_written[1] == 4 * int((x > 0).sum())
    assert stats.bytes_written[2] == 4 * 4


def test_barrier_handoff_and_simdgroup_barrier(correct):
    out = np.zeros(128, dtype=np.int32)[::2]  # numpy, non-contiguous: written back through a copy
    correct.launch("barrier_handoff", grid=1, threadgroup=64, buffers={0: out})
    assert out.tolist() == [12] * 64
    out = nan_tensor(32)
    correct.launch("simd_handoff", grid=1, threadgroup=32, buffers={0: out})
    assert out.tolist() == [float((i + 1) % 32) for i in range(32)]


def test_reload_counting(correct):
    torch.manual_seed(6)
    x = torch.randint(-9, 9, (32, 4)).float()
    out = nan_tensor(32)
    stats = correct.launch("reload", grid=1, threadgroup=32, buffers={0: x, 1: out})
    assert torch.equal(out, (x[:, 0] + x[:, 2]).sum() + x[:, 1])
    assert stats.bytes_read[0] == 32 * (16 + 4)
    assert stats.bytes_written[1] == 32 * 4


def test_overlapping_views_share_memory(correct):
    torch.manual_seed(7)
    t = torch.randn(96)
    out = nan_tensor(32)
    expected = t.clone()
    expected[32:64] = torch.arange(32).float()
    correct.launch("alias_rw", grid=1, threadgroup=32, buffers={0: t[:64], 1: t[32:], 2: out})
    assert torch.equal(out, torch.arange(32).float())
    assert torch.equal(t, expected)


def test_simdgroup_matrix(correct):
    torch.manual_seed(3)
    a = torch.randint(-8, 8, (8, 8)).float()
    b = torch.randint(-8, 8, (8, 8)).float()
    c = torch.randint(-8, 8, (8, 8)).float()
    ref = a @ b + c
    stats = correct.launch("matmul8", grid=1, threadgroup=32, buffers={0: a, 1: b, 2: c})
    assert torch.equal(c, ref)
    assert stats.bytes_read == {0: 256, 1: 256, 2: 256}
    assert stats.bytes_written == {0: 0, 1: 0, 2: 256}


# ---- 2-5. bugs are reported --------------------------------------------------------------------------
def test_out_of_bounds_write(bugs):
    out = torch.zeros(64)
    with pytest.raises(msl_sim.SimError, match=r"out-of-bounds device write of 4 bytes at byte offset 256 of buffer\(0\)"):
        bugs.launch("oob_write", grid=2, threadgroup=32, buffers={0: out})
    assert torch.equal(out, torch.zeros(64)), "buffers must be left untouched after an error"


def test_out_of_bounds_read(bugs):
    x, out = torch.randn(64), torch.zeros(64)
    with pytest.raises(msl_sim.SimError, match=r"kernel 'oob_read', threadgroup \(1,0,0\), thread \(29,0,0\).*"
                       r"out-of-bounds device read .* buffer\(0\)"):
        bugs.launch("oob_read", grid=2, threadgroup=32, buffers={0: x, 1: out})


def test_wild_pointer_is_reported_not_crashing(bugs):
    with pytest.raises(msl_sim.SimError, match="out-of-bounds device write"):
        bugs.launch("wild_write", grid=1, threadgroup=32, buffers={0: torch.zeros(32)})


def test_divergent_simd_sum(bugs):
    x, out = torch.randn(32), torch.zeros(32)
    with pytest.raises(msl_sim.SimError, match=r"lanes 16,17,.* exited while lanes 0,1,.* wait in simd_sum"):
        bugs.launch("divergent_sum", grid=1, threadgroup=32, buffers={0: x, 1: out})
    with pytest.raises(msl_sim.SimError, match="divergent collective: lane 0 is at simd_sum .* lane 16 is at simd_max"):
        bugs.launch("divergent_kinds", grid=1, threadgroup=32, buffers={0: x, 1: out})
    # The same collective reached through a (non-inlined) helper from two different call sites.
    with pytest.raises(msl_sim.SimError, match="divergent collective: lane 0 is at simd_sum .* lane 1 is at simd_sum"):
        bugs.launch("divergent_helper", grid=1, threadgroup=32, buffers={0: x, 1: out})


def test_missing_barrier_is_a_race(bugs):
    x, out = torch.randn(64), torch.zeros(64)
    # Thread 0 reads buf[32] before thread 32 (next simdgroup) writes it.
    with pytest.raises(msl_sim.SimError, match=r"thread \(32,0,0\).*data race on threadgroup memory: write of 4 "
                       r"bytes at missing_barrier::buf \+ 128 bytes, which thread index 0 read earlier"):
        bugs.launch("missing_barrier", grid=1, threadgroup=64, buffers={0: x, 1: out})
    with pytest.raises(msl_sim.SimError, match="data race on threadgroup memory: write .* read by"):
        bugs.launch("write_after_read", grid=1, threadgroup=64, buffers={0: x, 1: out})
    with pytest.raises(msl_sim.SimError, match="data race"):
        bugs.launch("barrier_none", grid=1, threadgroup=64, buffers={0: out})
    with pytest.raises(msl_sim.SimError, match=r"thread \(1,0,0\).*data race on threadgroup memory: read of 4 bytes "
                       r"at scalar_race::s \+ 0 bytes written by thread index 0"):
        bugs.launch("scalar_race", grid=1, threadgroup=64, buffers={0: x, 1: out})
    with pytest.raises(msl_sim.SimError, match=r"thread \(1,0,0\).*data race on threadgroup memory: write .* which "
                       r"thread index 0 read earlier"):
        bugs.launch("simd_no_barrier", grid=1, threadgroup=32, buffers={0: out})


def test_uninitialised_threadgroup_read(bugs):
    with pytest.raises(msl_sim.SimError, match=r"thread \(0,0,0\).*read of uninitialised threadgroup memory "
                       r"\(4 bytes at uninitialised::buf \+ 252 bytes\)"):
        bugs.launch("uninitialised", grid=1, threadgroup=64, buffers={0: torch.zeros(64)})


def test_atomic_on_uninitialised_threadgroup_memory(bugs):
    with pytest.raises(msl_sim.SimError, match=r"atomic operation reads uninitialised threadgroup memory "
                       r"\(atomic_uninit::counter \+ 0 bytes\)"):
        bugs.launch("atomic_uninit", grid=1, threadgroup=32, buffers={0: torch.zeros(32, dtype=torch.int32)})


def test_barrier_not_reached_by_all_threads(bugs):
    t0 = time.perf_counter()
    with pytest.raises(msl_sim.SimError, match=r"threadgroup_barrier not reached by every thread: 63 of 64 .*thread index 5"):
        bugs.launch("barrier_exit", grid=1, threadgroup=64, buffers={0: torch.zeros(64)})
    with pytest.raises(msl_sim.SimError, match="different threadgroup_barrier calls"):
        bugs.launch("barrier_split", grid=1, threadgroup=64, buffers={0: torch.zeros(64)})
    assert time.perf_counter() - t0 < 5


def test_crash_is_reported(bugs):
    x = torch.ones(32, dtype=torch.int32)
    x[7] = 0
    with pytest.raises(msl_sim.SimError, match="crashed with signal"):
        bugs.launch("int_div_zero", grid=1, threadgroup=32, buffers={0: x, 1: torch.zeros(32, dtype=torch.int32)})
    # The library is still usable afterwards.
    out = torch.zeros(32, dtype=torch.int32)
    bugs.launch("int_div_zero", grid=1, threadgroup=32, buffers={0: torch.ones(32, dtype=torch.int32), 1: out})
    assert out.tolist() == [7] * 32


def test_stack_overflow_is_reported(bugs):
    with pytest.raises(msl_sim.SimError, match="stack overflow"):
        bugs.launch("stack_hog", grid=1, threadgroup=2, buffers={0: torch.randn(2), 1: torch.zeros(2)})


def test_infinite_loop_hits_the_watchdog(bugs, monkeypatch):
    monkeypatch.setenv("TQ_SIM_TIMEOUT", "0.5")
    with pytest.raises(msl_sim.SimError, match="exceeded TQ_SIM_TIMEOUT"):
        bugs.launch("spin_forever", grid=1, threadgroup=1, buffers={0: torch.ones(1, dtype=torch.int32)})


def test_forbidden_threadgroup_pointer_parameter():
    with pytest.raises(msl_sim.CompileError, match="threadgroup"):
        msl_sim.compile_library([KERNELS / "bad" / "tg_pointer.metal"], include_dirs=KERNEL_INCLUDES)


def test_launch_errors(correct):
    with pytest.raises(msl_sim.SimError, match="no kernel with host name 'nope'"):
        correct.launch("nope", grid=1, threadgroup=32, buffers={})
    with pytest.raises(msl_sim.SimError, match=r"buffer\(0\) is not bound"):
        correct.launch("simd_handoff", grid=1, threadgroup=32, buffers={})  # buffer(0) missing
    with pytest.raises(msl_sim.SimError, match="between 1 and 1024 threads"):
        correct.launch("simd_handoff", grid=1, threadgroup=(32, 64), buffers={0: torch.zeros(32)})


# ---- 6. strict half rounding ---------------------------------------------------------------------------
def test_half_rounding_is_strict(correct):
    torch.manual_seed(4)
    n = 4096
    a, b, c = (torch.randn(n).half() for _ in range(3))
    out = torch.empty(n, dtype=torch.float16)
    correct.launch("half_ops", grid=n // 256, threadgroup=256, buffers={0: a, 1: b, 2: c, 3: out})
    ref = a * b + c  # torch rounds after every float16 op
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    once = (a.float() * b.float() + c.float()).half()  # what excess precision would give
    assert not torch.equal(ref.view(torch.int16), once.view(torch.int16)), "inputs do not tell the two apart"


# ---- 7. compile cache ----------------------------------------------------------------------------------
def test_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_SIM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / "k.metal"
    src.write_text((KERNELS / "correct.metal").read_text().replace('"../../../mps_ops/kernels/utils.h"', '"utils.h"'))
    msl_sim.compile_library([src], include_dirs=KERNEL_INCLUDES)
    assert msl_sim.last_compile_was_cache_hit is False
    msl_sim._libs.clear()  # forget the in-process copy: the next compile must come from disk
    t0 = time.perf_counter()
    lib = msl_sim.compile_library([src], include_dirs=KERNEL_INCLUDES)
    assert msl_sim.last_compile_was_cache_hit is True
    assert time.perf_counter() - t0 < 1.0
    assert "half_ops" in lib.kernels
    src.write_text(src.read_text() + "\n// changed\n")
    msl_sim.compile_library([src], include_dirs=KERNEL_INCLUDES)
    assert msl_sim.last_compile_was_cache_hit is False


def test_compile_cpp_module(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_SIM_CACHE", str(tmp_path))
    src = tmp_path / "plan.cpp"
    src.write_text('extern "C" int tq_add(int a, int b) { return a + b; }\n')
    mod = msl_sim.compile_cpp_module([src])
    mod.tq_add.restype = ctypes.c_int
    assert mod.tq_add(2, 40) == 42


def test_shim_features():
    lib = msl_sim.compile_library([KERNELS / "features.metal"], include_dirs=KERNEL_INCLUDES)
    torch.manual_seed(5)
    n = 50
    x = torch.randn(n) * 3
    xb = torch.randn(n).bfloat16()
    out = nan_tensor(n, 16)
    lib.launch("features_half", grid=(1, 1), threadgroup=(64, 1), buffers={0: x, 1: out, 2: xb,
                                                                              3: struct.pack("Iff", n, -1.0, 1.5)})
    v = x.double()
    ref = torch.empty(n, 16, dtype=torch.float64)
    ref[:, 0] = torch.exp(x.half().float()).half().double()
    ref[:, 1] = torch.exp2(v)
    ref[:, 2] = torch.tanh(v)
    ref[:, 3] = v.clamp(-1.0, 1.5)
    ref[:, 4] = 1 / torch.sqrt(v.abs() + 1)
    ref[:, 5] = -v
    ref[:, 6] = torch.where(v > 0, 2.0, 1.0)
    ref[:, 7] = torch.tensor([0.5, -1.25, 2.0, 3.5]).double()[torch.arange(n) % 4] * v
    ref[:, 8] = (x.half().double() + 2 + 0.5 + 1) * 2
    ref[:, 9] = ((xb * torch.tensor(2.0).bfloat16()) + torch.tensor(1.0).bfloat16()).double()
    ref[:, 10] = v * 3 + 1
    ref[:, 11] = torch.maximum((x * 10).int(), torch.tensor(-3)).double()
    ref[:, 12] = torch.tensor([bin(i).count("1") + 31 + 3 for i in range(n)]).double()
    ref[:, 13] = 65504.0
    ref[:, 14] = 2.5 + 1
    ref[:, 15] = torch.sqrt(v * v + 1) + torch.floor(v) + 1
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6)


def test_portable_ucontext_runtime(tmp_path, monkeypatch):
    # The fallback context switch (used on architectures without the hand-written one).
    monkeypatch.setenv("TQ_SIM_CACHE", str(tmp_path))
    monkeypatch.setenv("TQ_SIM_RUNTIME_FLAGS", "-DTQSIM_FORCE_UCONTEXT")
    lib = msl_sim.compile_library([KERNELS / "bugs.metal"], include_dirs=KERNEL_INCLUDES)
    x, out = torch.randn(32), nan_tensor(32)
    with pytest.raises(msl_sim.SimError, match="divergent collective"):
        lib.launch("divergent_kinds", grid=1, threadgroup=32, buffers={0: x, 1: out})
    with pytest.raises(msl_sim.SimError, match="crashed with signal"):
        lib.launch("int_div_zero", grid=1, threadgroup=32,
                   buffers={0: torch.zeros(32, dtype=torch.int32), 1: torch.zeros(32, dtype=torch.int32)})
    good = torch.ones(32, dtype=torch.int32)
    res = torch.zeros(32, dtype=torch.int32)
    lib.launch("int_div_zero", grid=1, threadgroup=32, buffers={0: good, 1: res})
    assert res.tolist() == [7] * 32
