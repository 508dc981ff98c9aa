"""Independent float64 oracles for the TurboQuant ops, written from DESIGN §5 without the package's code.

Explicit Hadamard matrices, brute-force nearest centroid, bit-by-bit packing, and plain softmax
over an explicit list of visible positions. Only the centroid values (checked against independent
numbers in test_codebooks.py) and the canonical sign vector (a storage-format constant: what
``signs=None`` means) come from the package.
"""

from __future__ import annotations

import math

import torch

from torch_tq.codebooks import lloyd_max_codebook
from torch_tq.layout import hadamard_signs


def hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester-order Walsh–Hadamard matrix with ±1 entries, float64 ``[n, n]``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def block_of(head_dim: int) -> int:
    return min(head_dim, 256)


def _signs64(signs, head_dim: int) -> torch.Tensor:
    """The ops' sign semantics: ``None`` is the canonical ``hadamard_signs(D)``."""
    return (hadamard_signs(head_dim) if signs is None else signs).to(torch.float64)


def rotate64(x: torch.Tensor, signs) -> torch.Tensor:
    """y = H_R (s ⊙ x) / sqrt(R) per block, float64."""
    D = x.shape[-1]
    R = block_of(D)
    x = x.to(torch.float64) * _signs64(signs, D)
    blocks = x.reshape(*x.shape[:-1], D // R, R)
    return (blocks @ hadamard_matrix(R).T / math.sqrt(R)).reshape(x.shape)


def unrotate64(y: torch.Tensor, signs) -> torch.Tensor:
    D = y.shape[-1]
    R = block_of(D)
    blocks = y.to(torch.float64).reshape(*y.shape[:-1], D // R, R)
    x = (blocks @ hadamard_matrix(R).T / math.sqrt(R)).reshape(y.shape)
    return x * _signs64(signs, D)


def encode64(x: torch.Tensor, bits: int, signs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int64 ``[..., D]``, norms float64 ``[..., D/R]``, normalised coordinates u ``[..., D]``)."""
    D = x.shape[-1]
    R = block_of(D)
    y = rotate64(x, signs).reshape(*x.shape[:-1], D // R, R)
    norms = y.norm(dim=-1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    u = torch.where(norms[..., None] > 0, y * math.sqrt(R) / safe[..., None], torch.zeros_like(y)).reshape(x.shape)
    centroids = lloyd_max_codebook(bits, torch.float64)
    # argmin returns the first minimum: ties go to the lower index.
    codes = (u[..., None] - centroids).abs().argmin(dim=-1)
    return codes, norms, u


def decode_rotated64(codes: torch.Tensor, norms: torch.Tensor, bits: int) -> torch.Tensor:
    D = codes.shape[-1]
    R = block_of(D)
    values = lloyd_max_codebook(bits, torch.float64)[codes]
    return values * norms.to(torch.float64).repeat_interleave(R, dim=-1) / math.sqrt(R)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit little-endian packing of integer codes ``[..., D]`` → uint8 ``[..., D*bits/8]``."""
    rows = []
    for row in codes.reshape(-1, codes.shape[-1]).tolist():
        out = [0] * (len(row) * bits // 8)
        for i, code in enumerate(row):
            for k in range(bits):
                if (code >> k) & 1:
                    bit = i * bits + k
                    out[bit // 8] |= 1 << (bit % 8)
        rows.append(out)
    return torch.tensor(rows, dtype=torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    flat = packed.reshape(-1, packed.shape[-1]).tolist()
    D = packed.shape[-1] * 8 // bits
    rows = []
    for row in flat:
        codes = []
        for i in range(D):
            code = 0
            for k in range(bits):
                bit = i * bits + k
                code |= ((row[bit // 8] >> (bit % 8)) & 1) << k
            codes.append(code)
        rows.append(codes)
    return torch.tensor(rows, dtype=torch.int64).reshape(*packed.shape[:-1], D)


def attention64(q, k, v, kv_len: int, capacity: int, scale: float, sliding_window=0, softcap=0.0, kv_start=None,
                return_lse=False):
    """Plain float64 attention of queries ``[B, Hq, Lq, D]`` over K/V ``[B, Hkv, N, D]`` holding positions
    ``lo … kv_len-1`` (``lo = max(0, kv_len - capacity)``), visibility decided position by position.
    With ``return_lse``, also each query's ``logsumexp`` of its visible scores ``[B, Hq, Lq]`` (-inf if none)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    lo = max(0, kv_len - capacity)
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Lq):
                pos = kv_len - Lq + i
                visible = [
                    j for j in range(lo, kv_len)
                    if j <= pos
                    and (sliding_window == 0 or j > pos - sliding_window)
                    and (kv_start is None or j >= int(kv_start[b]))
                ]
                if not visible:
                    continue
                idx = torch.tensor([j - lo for j in visible])
                s = scale * (k[b, kh, idx].double() @ q[b, h, i].double())
                if softcap > 0:
                    s = softcap * torch.tanh(s / softcap)
                p = torch.softmax(s, dim=0)
                out[b, h, i] = p @ v[b, kh, idx].double()
                lse[b, h, i] = torch.logsumexp(s, dim=0)
    return (out, lse) if return_lse else out


def union_kv64(k_codes, k_norms, v_codes, v_norms, kv_len: int, bits: int, v_bits: int, signs,
               k_sink=None, v_sink=None, k_recent=None, v_recent=None):
    """The K/V ``flash_attn_vec_tq`` attends to, float64, original domain, ``[B, Hkv, N, D]`` for the valid
    positions ``lo … kv_len-1``: position by position from the sinks (``j < S``), else the recent ring
    (``j >= kv_len - W``, slot ``j mod W``), else the oracle-decoded codes (slot ``j mod C``)."""
    C = k_codes.shape[2]
    S = 0 if k_sink is None else k_sink.shape[2]
    W = 0 if k_recent is None else k_recent.shape[2]
    ks, vs = [], []
    for j in range(max(0, kv_len - C), kv_len):
        if j < S:
            k_rot, v_rot = k_sink[:, :, j].double(), v_sink[:, :, j].double()
        elif W and j >= kv_len - W:
            k_rot, v_rot = k_recent[:, :, j % W].double(), v_recent[:, :, j % W].double()
        else:
            s = j % C
            k_rot = decode_rotated64(unpack_bits(k_codes[:, :, s], bits), k_norms[:, :, s], bits)
            v_rot = decode_rotated64(unpack_bits(v_codes[:, :, s], v_bits), v_norms[:, :, s], v_bits)
        ks.append(unrotate64(k_rot, signs))
        vs.append(unrotate64(v_rot, signs))
    return torch.stack(ks, dim=2), torch.stack(vs, dim=2)
