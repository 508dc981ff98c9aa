"""Hugging Face transformers integration: a compressed ``Cache`` and the ``"tq"`` attention implementation.

Usage (five lines)::

    import torch_tq.integrations.transformers as tqhf          # registers attn_implementation="tq"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tq")
    cache = tqhf.TurboQuantCache(model.config)   # 4-bit keys and values
    out = model.generate(**inputs, **tqhf.cache_kwargs(cache), max_new_tokens=64)

``attn_implementation="tq"`` exists for transformers once torch_tq is imported, in any order: this
module registers it on import, and ``import torch_tq`` registers it as soon as transformers' model
code is imported (without importing transformers itself). A process that never imports torch_tq
gets transformers' generic "not supported" list for ``"tq"``. :func:`cache_kwargs` passes the cache
as ``cache=`` (transformers 5.x) or ``past_key_values=`` (older), whichever the installed version
takes, so no deprecation warning is printed.

How it fits together:

* :class:`TurboQuantCache` is a ``transformers.Cache`` whose per-layer objects
  (:class:`TurboQuantLayer`, :class:`TurboQuantSlidingLayer`) keep K and V only as TurboQuant codes
  and norms (a :class:`torch_tq.nn.TurboQuantKVCache` each). ``update`` quantizes the new tokens
  (``tq.hadamard_quantize_kv``) and, on a model loaded with ``attn_implementation="tq"``, returns the
  *new* full-precision K/V tagged with the layer instead of a dequantized cache.
* :func:`turboquant_attention_forward`, registered under ``"tq"`` with transformers'
  ``AttentionInterface`` (and ``sdpa``'s mask builder under ``"tq"`` in ``AttentionMaskInterface``):
  on a prefill (the layer was empty) it runs SDPA over the fresh full-precision K/V; otherwise it calls
  ``tq.flash_attn_vec_tq`` over the compressed cache — no dequantized copy of the cache is made.
  Left padding is read from the attention mask (``kv_start``). Called with K/V that did not come
  from a :class:`TurboQuantCache` (no cache, or a ``DynamicCache``) it is plain SDPA.
* A ``TurboQuantCache`` used with another attention implementation (``sdpa``, ``eager``) still works:
  ``update`` then returns dequantized K/V like transformers' ``QuantizedCache`` (a full-size copy per
  step; a warning says so).

Accuracy: each layer stores keys minus their mean over the prefill (exact for attention: softmax
ignores a per-query constant; disabled for soft-capped models) and each block's norm corrected so
its decoded vector has the true norm — both inside the quantize op. Every layer also keeps its first
``sink_tokens`` (4) and newest ``recent_tokens`` (112) tokens in full precision (bfloat16 for a float32
model: ``window_dtype``); the fused op reads them in the same softmax as the codes. Keys and values may
use different widths (``v_bits``; e.g. 5-bit keys with 3-bit values: the same bytes, closer to the full
cache, slower on the CPU and CUDA kernels today); the default is 4 bits for both (``DEFAULT_BITS``).

A decode step of one layer is three launches: one ``tq.hadamard_quantize_kv`` per tensor (which also
writes the full-precision windows) and one ``tq.flash_attn_vec_tq``; nothing is allocated,
concatenated or synchronised (DESIGN §8).

Capacity: a global layer allocates ``max_cache_len`` slots when given, else 256, and grows
geometrically (reallocating packed bytes only) when full. A sliding layer is a ring buffer of
``sliding_window + decode_chunk - 1`` slots: after it wraps, one forward call may add at most
``decode_chunk`` tokens.

Supported: greedy and sampled ``generate``, batched left-padded inputs, beam search
(``reorder_cache`` permutes packed rows exactly), ``num_return_sequences``, ``crop`` of global layers,
``early_initialization``, ``torch.compile(fullgraph=True)`` of the attention modules for decode steps
(the prefill allocates the cache and runs eagerly; each layer's token count lives on its cache layer,
a plain object, so it becomes a ``SymInt`` and the step compiles once: ``tests/test_compile.py``).
Not supported (clear errors): transformers' own compiled/CUDA-graph generation (``is_compileable =
False``: lengths are host integers, not device tensors, yet), chunked-attention and linear-attention
layer types, ``crop`` of a sliding layer after it has wrapped, head dims other than (64, 128, 256,
512), training (dropout).
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Optional

import torch

try:
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.generation import GenerationMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "torch_tq.integrations.transformers needs transformers>=4.56: pip install 'torch_tq[hf]' "
        f"(or pip install 'transformers>=4.56'); import failed with: {exc}"
    ) from exc

from ..layout import SUPPORTED_BITS, SUPPORTED_HEAD_DIMS
from ..nn import TurboQuantKVCache, check_window_dtype
from .gated_delta import use_tq_gated_delta

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DeviceLengths",
    "TurboQuantCache",
    "cache_kwargs",
    "TurboQuantLayer",
    "use_tq_gated_delta",
    "TurboQuantSlidingLayer",
    "turboquant_attention_forward",
]

ATTN_IMPLEMENTATION = "tq"
# The defaults of TurboQuantCache, picked by the issue-14 multi-text table (README, "Multi-text quality,
# one token per step"; SmolLM2-135M, six texts, 256 and 512 tokens, one token per step). The windows: the
# first 4 and newest 112 tokens of each global layer also kept in 16 bits (a float32 model's in bfloat16:
# same quality as float32 copies at half the bytes), as wide as quanto int4's bytes at 512 tokens allow;
# with 4-bit keys and values they meet the 4-bit goal on 5/6 texts at 256 tokens and 2/6 at 512 (the
# former 32 float32 recent tokens: 0/6 and 0/6). 5-bit keys + 3-bit values with the same windows (the same
# bytes) meet it on 6/6 and 4/6 but decode slower where the kernels unpack 3/5-bit codes on a generic path:
# native CPU ~3x per attention call at 8k positions, CUDA 1.7x at 128k (README) -- so 4-bit stays the
# default and K5/V3 is one argument away (bits=5, v_bits=3). Sliding-window layers quantize every token.
DEFAULT_BITS = 4
DEFAULT_V_BITS = 4  # with DEFAULT_BITS only: TurboQuantCache(config, bits=b) gives b-bit keys and values
DEFAULT_SINK_TOKENS = 4
DEFAULT_RECENT_TOKENS = 112
DEFAULT_WINDOW_DTYPE = "auto"
# transformers 5.x renamed generate's and the models' `past_key_values` argument to `cache` (the old
# name still works there but warns); generate hands its cache to prepare_inputs_for_generation, so
# that method's signature says which name the installed version expects.
_CACHE_ARGUMENT = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
                   else "past_key_values")
# Initial slots of a global layer without max_cache_len; growth rounds up to a multiple of this.
_GROWTH_STEP = 256


class DeviceLengths:
    """Each sequence's token count on the device, shared by the layers of one :class:`TurboQuantCache`.

    ``written`` is the count before the current forward call's tokens (where they are written),
    ``total`` the count after them (what the attention reads). The first layer of every forward call
    advances both: two tiny launches per call, which a CUDA graph captures with the rest of the step,
    so a replayed step writes and reads at the right positions although no host code runs.
    """

    def __init__(self) -> None:
        self.written: Optional[torch.Tensor] = None
        self.total: Optional[torch.Tensor] = None

    def advance(self, batch_size: int, num_tokens: int, device: torch.device) -> None:
        if self.total is None:
            self.total = torch.zeros(batch_size, dtype=torch.int32, device=device)
            self.written = torch.zeros_like(self.total)
        self.written.copy_(self.total)
        self.total.add_(num_tokens)

    def reset(self) -> None:
        if self.total is not None:
            self.total.zero_()
            self.written.zero_()


def cache_kwargs(cache) -> dict:
    r"""The keyword argument that passes ``cache`` to ``model.generate(...)`` or to a model's forward.

    ``{"cache": cache}`` with a transformers that has renamed ``past_key_values`` to ``cache``
    (5.x, where the old name gives a deprecation warning), ``{"past_key_values": cache}`` before.

    Examples::

        >>> out = model.generate(**inputs, **tqhf.cache_kwargs(tqhf.TurboQuantCache(model.config)), max_new_tokens=32)
    """
    return {_CACHE_ARGUMENT: cache}


class TurboQuantLayer(CacheLayerMixin):
    r"""One full-attention layer's KV cache, stored TurboQuant-compressed.

    Stored state (a :class:`torch_tq.nn.TurboQuantKVCache` in ``self.kv``):
    ``codes [B, Hkv, C, D·b/8] uint8`` and ``norms [B, Hkv, C, D/R] float32`` for K and for V, plus
    the ``[D]`` rotation signs. Batch size, Hkv, D, device and dtype come lazily from the first
    ``update``. ``keys``/``values`` stay ``None``: there is no full-precision copy.

    Args:
        bits (int): code width b. Default: ``4``.
        max_cache_len (Optional[int]): initial capacity in tokens. Default: ``None`` (256, growing).
        signs (Optional[torch.Tensor]): float32 ``[D]`` rotation signs. Default: :func:`torch_tq.hadamard_signs`.
        fused (bool): return the new full-precision K/V tagged for the ``"tq"`` attention (True) or
            the dequantized cache (False, for other attention implementations). Default: ``True``.
        sink_tokens, recent_tokens (int): first and newest positions also kept in full precision
            (see :class:`torch_tq.nn.TurboQuantKVCache`). Default: ``0``.
        v_bits (Optional[int]): code width of the values. Default: ``None`` (= ``bits``).
        window_dtype (torch.dtype | str): storage dtype of the windows (see
            :class:`torch_tq.nn.TurboQuantKVCache`). Default: ``"model"``.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, bits: int = 4, max_cache_len: Optional[int] = None, signs: Optional[torch.Tensor] = None,
                 fused: bool = True, center_keys: bool = True, sink_tokens: int = 0, recent_tokens: int = 0,
                 v_bits: Optional[int] = None, window_dtype: torch.dtype | str = "model", **kwargs):
        super().__init__()
        check_window_dtype("TurboQuantCache", window_dtype)
        self.window_dtype = window_dtype
        self.center_keys = center_keys
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        for name, value in (("bits", bits), ("v_bits", bits if v_bits is None else v_bits)):
            if value not in SUPPORTED_BITS:
                raise ValueError(f"TurboQuantCache: {name} must be one of {SUPPORTED_BITS}, got {value}")
        self.bits = bits
        self.v_bits = v_bits
        self.max_cache_len = max_cache_len
        self.signs = signs
        self.fused = fused
        self.kv: Optional[TurboQuantKVCache] = None
        # Tokens written, held here rather than on the nn.Module (whose integer attributes torch.compile
        # treats as constants): the count reaches the ops as a SymInt and a compiled step compiles once.
        self.seq_len = 0
        # Tokens held before the latest update, and the mask offset transformers used for that call.
        self.past_len = 0
        self.mask_kv_offset = 0
        # Set by TurboQuantCache(device_lengths=True): the counts the kernels read (CUDA graphs).
        self.lengths: Optional[DeviceLengths] = None
        self.advances_lengths = False

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.kv.extra_repr() if self.kv is not None else 'uninitialized'})"

    def _initial_capacity(self, num_tokens: int) -> int:
        if self.lengths is not None:  # fixed: _reserve refuses more
            return self.max_cache_len
        return max(self.max_cache_len or _GROWTH_STEP, num_tokens, 1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hkv, T, D = key_states.shape
        if D not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"TurboQuantCache: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {D}")
        self.dtype, self.device = key_states.dtype, key_states.device
        capacity = self._initial_capacity(T)
        # The windows never hold more positions than the codes (a small max_cache_len or ring).
        self.kv = TurboQuantKVCache(Hkv, D, capacity, self.bits, B,
                                    sliding_window=getattr(self, "sliding_window", 0) if self.is_sliding else 0,
                                    signs=self.signs, device=self.device, center_keys=self.center_keys,
                                    sink_tokens=min(self.sink_tokens, capacity),
                                    recent_tokens=min(self.recent_tokens, capacity),
                                    v_bits=self.v_bits, window_dtype=self.window_dtype)
        self.is_initialized = True

    def _reserve(self, num_tokens: int) -> None:
        needed = self.seq_len + num_tokens
        if needed > self.kv.capacity and self.lengths is not None:
            raise ValueError(f"TurboQuantCache(device_lengths=True): {needed} tokens exceed max_cache_len="
                             f"{self.kv.capacity} (the buffers of a capturable cache never move)")
        if needed > self.kv.capacity:
            grown = max(needed, 2 * self.kv.capacity)
            self.kv.grow(-(-grown // _GROWTH_STEP) * _GROWTH_STEP)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``key_states``/``value_states`` ``[B, Hkv, T, D]`` into the cache.

        Returns the new K/V tagged for :func:`turboquant_attention_forward` (fused mode), or the
        dequantized K/V of the positions the attention mask covers (``fused=False``).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.kv.batch_size:
            raise ValueError(f"TurboQuantCache: batch size changed from {self.kv.batch_size} to {key_states.shape[0]}")
        T = key_states.shape[-2]
        self.past_len = self.seq_len
        self.mask_kv_offset = self.get_mask_sizes(T)[1]
        if not self.is_sliding:
            self._reserve(T)
        written = None
        if self.lengths is not None:
            if self.advances_lengths:
                self.lengths.advance(key_states.shape[0], T, key_states.device)
            written = self.lengths.written
        self.kv.append(key_states.transpose(1, 2), value_states.transpose(1, 2), position=self.seq_len,
                       cache_seqlens=written)
        self.seq_len += T
        if self.fused or self.past_len == 0:
            key_states._tq_layer = self
            return key_states, value_states
        # Other attention implementations need the K/V tensors: a dequantized, full-size copy.
        k, v = self.kv.dequantize_range(self.mask_kv_offset, self.seq_len - self.mask_kv_offset)
        return k.to(self.dtype), v.to(self.dtype)

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size if self.kv is not None else -1

    @property
    def nbytes(self) -> int:
        """Bytes allocated for this layer's compressed K and V."""
        return self.kv.nbytes if self.kv is not None else 0

    @property
    def nbytes_used(self) -> int:
        """Bytes of compressed K and V for the positions held."""
        return self.kv.nbytes_used if self.kv is not None else 0

    def reset(self) -> None:
        if self.kv is not None:
            self.kv.reset()
        if self.lengths is not None and self.advances_lengths:
            self.lengths.reset()
        self.seq_len = 0
        self.past_len = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.kv is not None:
            self.kv.index_batch(beam_idx)

    def _refuse_with_device_lengths(self, what: str) -> None:
        if self.lengths is not None:
            raise ValueError(f"TurboQuantCache(device_lengths=True) does not support {what}")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse_with_device_lengths("batch_select_indices (the batch size is fixed)")
        if self.kv is not None:
            self.kv.index_batch(torch.as_tensor(indices).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse_with_device_lengths("batch_repeat_interleave (the batch size is fixed)")
        if self.kv is not None:
            self.kv.repeat_batch(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (a negative count, as transformers' ``DynamicLayer``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"TurboQuantCache.crop: pass a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self.kv is None:
            return
        self._refuse_with_device_lengths("crop")
        self.kv.truncate(self.seq_len + tokens_to_remove)
        self.seq_len = self.kv.seq_len

    def offload(self) -> None:
        raise NotImplementedError("TurboQuantCache does not support offloading (the compressed cache is already small)")

    def prefetch(self) -> None:
        raise NotImplementedError("TurboQuantCache does not support offloading (the compressed cache is already small)")


class TurboQuantSlidingLayer(TurboQuantLayer):
    r"""One sliding-window layer's KV cache, TurboQuant-compressed, as a ring buffer.

    Same storage as :class:`TurboQuantLayer` with ``C = sliding_window + decode_chunk - 1`` slots;
    token ``p`` lives in slot ``p mod C``.

    Args:
        sliding_window (int): the layer's window W (query ``p`` sees positions ``> p - W``).
        decode_chunk (int): the most tokens one forward call may add once the ring has wrapped. Default: ``64``.
    """

    is_sliding = True
    is_croppable = False

    def __init__(self, sliding_window: int, bits: int = 4, decode_chunk: int = 64, signs: Optional[torch.Tensor] = None,
                 fused: bool = True, center_keys: bool = True, sink_tokens: int = 0, recent_tokens: int = 0,
                 v_bits: Optional[int] = None, window_dtype: torch.dtype | str = "model", **kwargs):
        super().__init__(bits=bits, signs=signs, fused=fused, center_keys=center_keys, sink_tokens=sink_tokens,
                         recent_tokens=recent_tokens, v_bits=v_bits, window_dtype=window_dtype)
        if sliding_window < 1:
            raise ValueError(f"TurboQuantCache: sliding_window must be >= 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.decode_chunk = decode_chunk

    def _initial_capacity(self, num_tokens: int) -> int:
        return self.sliding_window + self.decode_chunk - 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        T = key_states.shape[-2]
        seq = self.get_seq_length()
        if seq > 0 and seq + T > (self.kv.capacity if self.kv is not None else 0) and T > self.decode_chunk:
            raise ValueError(
                f"TurboQuantCache: a sliding layer (window {self.sliding_window}) that holds {seq} tokens can take at most "
                f"decode_chunk={self.decode_chunk} new tokens per forward call, got {T}; pass a larger decode_chunk"
            )
        return super().update(key_states, value_states, *args, **kwargs)

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        seq = self.get_seq_length()
        kv_offset = max(seq - self.sliding_window + 1, 0)
        return min(seq, self.sliding_window - 1) + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        if self.kv is not None and self.seq_len > self.kv.capacity and tokens_to_remove != 0:
            raise RuntimeError(
                "TurboQuantCache.crop: a sliding layer that has wrapped its ring buffer cannot be cropped "
                "(the overwritten tokens are gone)"
            )
        super().crop(tokens_to_remove)


def _layer_types(config) -> list[str]:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            kind = "sliding_attention"
        elif getattr(config, "attention_chunk_size", None) is not None:
            kind = "chunked_attention"
        else:
            kind = "full_attention"
        layer_types = [kind] * config.num_hidden_layers
    return list(layer_types)


class TurboQuantCache(Cache):
    r"""A transformers ``Cache`` that keeps every layer's K and V TurboQuant-compressed.

    Full-attention and sliding-window layers follow ``config.layer_types`` (or ``config.sliding_window``).
    Each layer stores ``codes [B, Hkv, C, D·b/8] uint8`` and ``norms [B, Hkv, C, D/R] float32`` for K and V.

    Args:
        config (PretrainedConfig): the model config (its text/decoder config is used).
        bits (Optional[int]): code width b of the keys (and of the values unless ``v_bits`` is given),
            in (2, 3, 4, 5, 6, 8). Default: ``None``, meaning ``DEFAULT_BITS`` (4) for the keys and
            ``DEFAULT_V_BITS`` (4) for the values unless ``v_bits`` is given.
        max_cache_len (Optional[int]): initial capacity of global layers, in tokens; they grow when
            full. Default: ``None`` (256).
        decode_chunk (int): the most tokens one forward call may add to a sliding layer after its ring
            has wrapped. Default: ``64``.
        signs (Optional[torch.Tensor]): float32 ``[D]`` rotation signs. Default: :func:`torch_tq.hadamard_signs`.
        attn_implementation (Optional[str]): overrides ``config._attn_implementation`` to pick the fused
            (``"tq"``) or the dequantizing path. Default: ``None``.
        sink_tokens (int): the first positions of each layer, kept in full precision as well
            (attention sinks). Default: ``4``.
        recent_tokens (int): the newest positions of each layer, kept in full precision as well (a
            ring). Default: ``112``.
        v_bits (Optional[int]): code width of the values. Default: ``None`` (= ``bits`` when ``bits`` is
            given, else 3).
        window_dtype (torch.dtype | str): storage dtype of the sink and recent windows: ``torch.float32``,
            ``torch.float16``, ``torch.bfloat16``, ``"model"`` (the model's K/V dtype) or ``"auto"`` (the
            model's dtype if it is 16-bit, else ``torch.bfloat16``). The windows are counted in
            ``nbytes``/``nbytes_used`` at their real size. Default: ``"auto"``.
        device_lengths (bool): keep each sequence's token count in a device tensor that the kernels
            read (:class:`DeviceLengths`), so a decode step can be captured once in a CUDA graph and
            replayed (``benchmarks/cuda_generate.py``); needs ``max_cache_len`` (buffers never move),
            global layers only, a backend that implements ``cache_seqlens`` (CPU, CUDA), no crop or
            batch resizing. A captured step must get ``position_ids`` (and ``cache_position``) as static
            tensors updated before each replay: transformers otherwise derives them from the host-side
            length, which a replay freezes. Default: ``False``.

    Examples::

        >>> import torch_tq.integrations.transformers as tqhf
        >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tq")
        >>> out = model.generate(**inputs, **tqhf.cache_kwargs(tqhf.TurboQuantCache(model.config)), max_new_tokens=32)
    """

    def __init__(
        self,
        config,
        bits: Optional[int] = None,
        max_cache_len: Optional[int] = None,
        decode_chunk: int = 64,
        signs: Optional[torch.Tensor] = None,
        attn_implementation: Optional[str] = None,
        sink_tokens: int = DEFAULT_SINK_TOKENS,
        recent_tokens: int = DEFAULT_RECENT_TOKENS,
        v_bits: Optional[int] = None,
        device_lengths: bool = False,
        window_dtype: torch.dtype | str = DEFAULT_WINDOW_DTYPE,
    ):
        if bits is None:
            bits, v_bits = DEFAULT_BITS, DEFAULT_V_BITS if v_bits is None else v_bits
        for name, value in (("bits", bits), ("v_bits", bits if v_bits is None else v_bits)):
            if value not in SUPPORTED_BITS:
                raise ValueError(f"TurboQuantCache: {name} must be one of {SUPPORTED_BITS}, got {value}")
        for name, value in (("sink_tokens", sink_tokens), ("recent_tokens", recent_tokens)):
            if value < 0:
                raise ValueError(f"TurboQuantCache: {name} must be >= 0, got {value}")
        check_window_dtype("TurboQuantCache", window_dtype)
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"TurboQuantCache: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
        layer_types = _layer_types(text_config)
        unsupported = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unsupported:
            raise ValueError(
                f"TurboQuantCache supports full_attention and sliding_attention layers only, the config has {unsupported}"
            )
        if device_lengths and max_cache_len is None:
            raise ValueError("TurboQuantCache(device_lengths=True) needs max_cache_len: a capturable cache never reallocates")
        if device_lengths and "sliding_attention" in layer_types:
            raise ValueError("TurboQuantCache(device_lengths=True) supports full_attention layers only, the config has "
                             "sliding_attention layers")
        impl = attn_implementation or getattr(text_config, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
        fused = impl == ATTN_IMPLEMENTATION
        if not fused:
            warnings.warn(
                f"TurboQuantCache used with attn_implementation={impl!r}: every decode step dequantizes a full-size copy "
                f"of the cache. Load the model with attn_implementation='{ATTN_IMPLEMENTATION}' (after importing "
                "torch_tq.integrations.transformers) for the fused path.",
                stacklevel=2,
            )
        self.bits = bits
        self.v_bits = bits if v_bits is None else v_bits
        self.fused = fused
        # Key centering is exact only without logit soft-capping (see TurboQuantKVCache).
        center = not getattr(text_config, "attn_logit_softcapping", None)
        layers = []
        for kind in layer_types:
            if kind == "sliding_attention":
                layers.append(TurboQuantSlidingLayer(text_config.sliding_window, bits=bits, decode_chunk=decode_chunk,
                                                     signs=signs, fused=fused, center_keys=center, v_bits=v_bits,
                                                     sink_tokens=sink_tokens, recent_tokens=recent_tokens,
                                                     window_dtype=window_dtype))
            else:
                layers.append(TurboQuantLayer(bits=bits, max_cache_len=max_cache_len, signs=signs, fused=fused,
                                              center_keys=center, sink_tokens=sink_tokens, recent_tokens=recent_tokens,
                                              v_bits=v_bits, window_dtype=window_dtype))
        if device_lengths:
            lengths = DeviceLengths()
            for layer in layers:
                layer.lengths = lengths
            layers[0].advances_lengths = True  # the first layer of every forward call
        self.device_lengths = device_lengths
        super().__init__(layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the compressed K and V of every layer."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def nbytes_used(self) -> int:
        """Bytes of compressed K and V for the positions every layer holds."""
        return sum(layer.nbytes_used for layer in self.layers)

    @property
    def batch_size(self) -> int:
        sizes = {layer.batch_size for layer in self.layers if layer.kv is not None}
        return sizes.pop() if len(sizes) == 1 else -1

    def offload(self, *args, **kwargs):
        raise NotImplementedError("TurboQuantCache does not support offloading")

    def prefetch(self, *args, **kwargs):
        raise NotImplementedError("TurboQuantCache does not support offloading")


def _kv_start_from_mask(attention_mask: Optional[torch.Tensor], kv_offset: int, batch_size: int) -> Optional[torch.Tensor]:
    """First attended absolute position of the first query row, per sequence (int64 ``[B]``), or None.

    With left padding the padded positions are masked for every query; the window start of the first
    query (if any) is a valid lower bound too, as the op applies the window itself.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    row = attention_mask[:, 0, 0, :] if attention_mask.dim() == 4 else attention_mask
    if row.shape[0] != batch_size:
        row = row.expand(batch_size, -1)
    first = row.to(torch.int8).argmax(dim=-1).to(torch.int64)
    return first + kv_offset


def _masked_attention(module, query, key, value, attention_mask, scaling, softcap) -> torch.Tensor:
    """Eager full-precision attention with soft-capping (SDPA has no softcap); returns ``[B, T, Hq, D]``."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1).float()
    v = value.repeat_interleave(group, dim=1).float()
    scores = scaling * query.float() @ k.transpose(-1, -2)
    scores = softcap * torch.tanh(scores / softcap)
    T, S = scores.shape[-2:]
    if attention_mask is None:
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, -math.inf)
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous()


def turboquant_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    r"""The ``"tq"`` attention implementation for transformers models.

    Args:
        module: the attention module (``num_key_value_groups`` etc. are read by SDPA).
        query (torch.Tensor): ``[B, Hq, Lq, D]``.
        key, value (torch.Tensor): ``[B, Hkv, T, D]`` as returned by the cache's ``update``.
        attention_mask (Optional[torch.Tensor]): transformers' SDPA-style boolean ``[B, 1, Lq, kv_length]`` mask or None.
        scaling (Optional[float]): score scale. Default: ``D ** -0.5``.
        sliding_window (Optional[int]): the layer's window, if the model passes one.
        softcap (Optional[float]): logit soft-capping.

    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``.
    """
    layer = getattr(key, "_tq_layer", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    fused = layer is not None and layer.kv is not None and layer.past_len > 0
    if not fused:
        # Prefill of an empty TurboQuant layer (the fresh K/V are the whole context), or no TurboQuant cache.
        if softcap:
            return _masked_attention(module, query, key, value, attention_mask, scaling, softcap), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout > 0.0 and module.training:
        raise ValueError("tq attention: the compressed-cache decode path is inference-only (dropout > 0 in training mode)")
    kv = layer.kv
    window = kv.sliding_window if kv.is_sliding else (sliding_window or 0)
    kv_start = _kv_start_from_mask(attention_mask, layer.mask_kv_offset, query.shape[0])
    if layer.lengths is not None:  # read by the kernel; the capacity bounds the launch
        out = kv.attend(query, scale=scaling, softcap=float(softcap or 0.0), sliding_window=window, kv_start=kv_start,
                        kv_len=kv.capacity, cache_seqlens=layer.lengths.total)
    else:
        out = kv.attend(query, scale=scaling, softcap=float(softcap or 0.0), sliding_window=window,
                        kv_start=kv_start, kv_len=layer.seq_len)
    return out.transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, turboquant_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
