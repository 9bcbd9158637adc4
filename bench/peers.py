"""Torch peers of the core's attention, built at the same shapes with the same input projections.

Used by ``reformer-core bench`` (the peer rows, :func:`peer_call`) and by
``bench/torch_attention.py`` (:func:`hf_lsh_layer`, :func:`bucket_list`). Every peer maps
``hidden`` of shape ``(batch, length, heads * head_dim)`` to an output of the same shape,
projecting its inputs with bias-free linear layers as HF's layers do:

* ``reformer-core``: one ``Linear`` to shared query/key and values, then the core's
  ``lsh_attention`` on torch tensors (its default path, the fused kernel); for ``local``,
  three projections (query, key, value) and ``local_attention``;
* ``hf-transformers``: ``transformers``' ``LSHSelfAttention`` (and ``LocalSelfAttention``),
  configured with the core's bucket count, chunk length, look-back/ahead and causality;
* ``reformer-pytorch``: its ``LSHAttention`` behind the same ``Linear``; it ties the bucket
  count to the chunk (``length / chunk_length`` buckets, chunks of ``chunk_length``, one chunk
  back), so only ``num_chunks_before=1, num_chunks_after=0`` and lengths divisible by
  ``2 * chunk_length`` run; the windows, and so the FLOPs, are the core's;
* ``torch-sdpa``: the same ``Linear``, then ``scaled_dot_product_attention`` (full attention).

Torch and the peer packages are imported only when a peer is built.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import numpy as np

__all__ = ["PEERS", "PEER_METHODS", "installed_peers", "bucket_list", "hf_lsh_layer", "hf_local_layer",
           "peer_supports", "peer_call", "peer_versions"]

PEERS = ("reformer-core", "hf-transformers", "reformer-pytorch", "torch-sdpa")
# attention kinds each peer has: "lsh" (every hash count), "local", "native" (fused full attention)
PEER_METHODS = {"reformer-core": ("lsh", "local"), "hf-transformers": ("lsh", "local"),
                "reformer-pytorch": ("lsh",), "torch-sdpa": ("native",)}
_PACKAGES = {"hf-transformers": "transformers", "reformer-pytorch": "reformer_pytorch"}
_DISTRIBUTIONS = {"reformer-core": "torch", "hf-transformers": "transformers", "reformer-pytorch": "reformer-pytorch",
                  "torch-sdpa": "torch"}


def installed_peers() -> tuple[str, ...]:
    """The peers whose packages are importable here (torch is assumed: peers run beside it)."""
    return tuple(peer for peer in PEERS if peer not in _PACKAGES or importlib.util.find_spec(_PACKAGES[peer]))


def peer_versions() -> dict:
    from importlib import metadata

    versions = {}
    for peer in installed_peers():
        try:
            versions[peer] = metadata.version(_DISTRIBUTIONS[peer])
        except metadata.PackageNotFoundError:
            versions[peer] = None
    return versions


def bucket_list(length: int, chunk: int):
    """The core's default bucket count as HF takes it (an int, or a list when factorised)."""
    import reformer_core as rc

    buckets = rc.default_num_buckets(length, chunk)
    return buckets if isinstance(buckets, int) else list(buckets)


def peer_supports(peer: str, kind: str, length: int, *, chunk_length: int, num_chunks_before: int,
                  num_chunks_after: int) -> str | None:
    """None when ``peer`` can run ``kind`` at this length, else the reason it cannot."""
    if kind not in PEER_METHODS[peer]:
        return f"{peer} has no {kind} attention"
    if peer == "reformer-pytorch":
        if (num_chunks_before, num_chunks_after) != (1, 0):
            return "reformer-pytorch looks back exactly one chunk"
        if length % (2 * chunk_length):
            return f"reformer-pytorch needs lengths divisible by 2 * chunk_length = {2 * chunk_length}"
    return None


def hf_lsh_layer(length, num_hashes, device, dtype, heads, head_dim, chunk, *, causal=True, num_chunks_before=1,
                 num_chunks_after=0):
    """HF's ``LSHSelfAttention`` with the core's buckets, chunks and hashes; None without transformers."""
    try:
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention
    except ImportError:
        return None
    config = ReformerConfig(hidden_size=heads * head_dim, num_attention_heads=heads, attention_head_size=head_dim,
                            num_hashes=num_hashes, lsh_attn_chunk_length=chunk, is_decoder=causal,
                            num_buckets=bucket_list(length, chunk), lsh_num_chunks_before=num_chunks_before,
                            lsh_num_chunks_after=num_chunks_after, lsh_attention_probs_dropout_prob=0.0)
    return LSHSelfAttention(config).to(device, dtype)


def hf_local_layer(device, dtype, heads, head_dim, chunk, *, causal=True, num_chunks_before=1, num_chunks_after=0):
    """HF's ``LocalSelfAttention`` at the same chunking; None without transformers."""
    try:
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LocalSelfAttention
    except ImportError:
        return None
    config = ReformerConfig(hidden_size=heads * head_dim, num_attention_heads=heads, attention_head_size=head_dim,
                            local_attn_chunk_length=chunk, is_decoder=causal,
                            local_num_chunks_before=num_chunks_before, local_num_chunks_after=num_chunks_after,
                            local_attention_probs_dropout_prob=0.0)
    return LocalSelfAttention(config).to(device, dtype)


def _module(peer: str, kind: str, num_hashes: int | None, *, length: int, heads: int, head_dim: int, chunk: int,
            before: int, after: int, causal: bool, device, dtype, seed: int):
    """A ``torch.nn.Module`` from ``hidden`` to the attention output, for one peer and kind."""
    import torch

    import reformer_core as rc

    width = heads * head_dim

    def split_heads(x, parts):  # (batch, L, parts * width) -> parts x (batch, heads, L, head_dim)
        batch = x.shape[0]
        return x.view(batch, length, parts, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def merge_heads(x):  # (batch, heads, L, head_dim) -> (batch, L, width)
        return x.transpose(1, 2).reshape(x.shape[0], length, width)

    class Projected(torch.nn.Module):
        def __init__(self, parts, attend):
            super().__init__()
            self.project = torch.nn.Linear(width, parts * width, bias=False)
            self.parts, self.attend = parts, attend

        def forward(self, hidden):
            return self.attend(*split_heads(self.project(hidden), self.parts))

    class FirstOutput(torch.nn.Module):  # HF's layers return an output tuple
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden):
            return self.layer(hidden)[0]

    chunks = {"chunk_length": chunk, "num_chunks_before": before, "num_chunks_after": after, "causal": causal}
    if peer == "reformer-core" and kind == "lsh":
        buckets = rc.default_num_buckets(length, chunk)
        probe = torch.zeros((), device=device, dtype=dtype)
        rotations = rc.random_rotations((seed, num_hashes), heads, head_dim, num_hashes, buckets, like=probe)
        return Projected(2, lambda qk, v: merge_heads(rc.lsh_attention(qk, v, rotations, num_buckets=buckets,
                                                                        **chunks)))
    if peer == "reformer-core" and kind == "local":
        return Projected(3, lambda q, k, v: merge_heads(rc.local_attention(q, k, v, **chunks)))
    if peer == "hf-transformers" and kind == "lsh":
        return FirstOutput(hf_lsh_layer(length, num_hashes, device, dtype, heads, head_dim, chunk, causal=causal,
                                        num_chunks_before=before, num_chunks_after=after))
    if peer == "hf-transformers" and kind == "local":
        return FirstOutput(hf_local_layer(device, dtype, heads, head_dim, chunk, causal=causal,
                                          num_chunks_before=before, num_chunks_after=after))
    if peer == "reformer-pytorch":
        from reformer_pytorch import LSHAttention

        attention = LSHAttention(bucket_size=chunk, n_hashes=num_hashes, causal=causal)

        def attend(qk, v):
            batch = qk.shape[0]
            out = attention(qk.reshape(batch * heads, length, head_dim), v.reshape(batch * heads, length, head_dim))[0]
            return merge_heads(out.view(batch, heads, length, head_dim))

        module = Projected(2, attend)
        module.attention = attention
        return module
    if peer == "torch-sdpa":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return Projected(2, lambda qk, v: merge_heads(sdpa(qk, qk, v, is_causal=causal)))
    raise ValueError(f"peer {peer!r} has no {kind} attention")


def peer_call(peer: str, kind: str, num_hashes: int | None, pass_name: str, *, batch: int, length: int, heads: int,
              head_dim: int, chunk_length: int, num_chunks_before: int, num_chunks_after: int, causal: bool,
              device: Any, dtype: str, seed: int = 0) -> Callable[[], Any]:
    """A zero-argument call of one peer row: the forward (under ``no_grad``), or forward and
    backward from a fixed output gradient (``out.backward(d_out)``, the gradients of the input
    and of the projections, cleared before each call)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)  # the peers' own initialisation and hash rotations
    module = _module(peer, kind, num_hashes, length=length, heads=heads, head_dim=head_dim, chunk=chunk_length,
                     before=num_chunks_before, after=num_chunks_after, causal=causal, device=device,
                     dtype=torch_dtype, seed=seed).to(device, torch_dtype).eval()
    rng = np.random.default_rng((seed, length))
    shape = (batch, length, heads * head_dim)
    hidden = torch.from_numpy(rng.standard_normal(shape)).to(device, torch_dtype)
    if pass_name == "forward":
        def forward():
            with torch.no_grad():
                return module(hidden)

        return forward
    d_out = torch.from_numpy(rng.standard_normal(shape)).to(device, torch_dtype)
    hidden.requires_grad_(True)
    leaves = [hidden, *module.parameters()]

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        module(hidden).backward(d_out)
        return hidden.grad

    return forward_backward
