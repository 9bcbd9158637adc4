"""PyTorch-native pieces: the reversible stack as one ``torch.autograd.Function`` and
``ReformerLM``, an ``nn.Module`` over the core's functional model.

The forward of :class:`ReversibleStack` runs the core's ``reversible_forward`` without
recording a graph and saves only the stack's outputs, the parameters and the randomness
(rotations, the dropout seed). Its backward rebuilds each layer's input from its output and
pulls gradients through one layer at a time (``reformer_core.reversible_backward``)
with torch autograd as the VJP, so activation memory does not grow with depth. Gradients
reach the parameters through ordinary autograd accumulation, once per backward, which is
what torch.optim and DistributedDataParallel expect.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from reformer_core import ReformerConfig, init_params, reversible_backward, reversible_forward, sample_rotations
from reformer_core._arrays import namespace
from reformer_core._model.blocks import reversible_layers
from reformer_core._model.lm import check_tokens, embed, output_head, sample_dropout_masks
from reformer_core._registry import resolve_backend
from reformer_core._tree import tree_leaves, tree_map, tree_unflatten

__all__ = ["ReversibleStack", "reversible_stack", "ReformerLM", "step_seed"]

_PARAMETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for training step ``step`` of a run seeded ``seed`` (``stream`` 0 for
    rotations, 1 for dropout): distinct steps get independent rotations."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _device_type(device: torch.device) -> str:
    return device.type if device.type in ("cuda", "cpu", "mps", "xpu") else "cpu"


class _StackRun:
    """What one call of the stack needs besides tensors (not differentiated)."""

    __slots__ = ("config", "template", "rotations", "attention_mask", "dropout_seed", "batch", "length")

    def __init__(self, config, template, rotations, attention_mask, dropout_seed, batch, length):
        self.config, self.template, self.rotations = config, template, rotations
        self.attention_mask, self.dropout_seed = attention_mask, dropout_seed
        self.batch, self.length = batch, length

    def layers(self, x, leaves):
        xp = namespace(x)
        masks = None
        if self.dropout_seed is not None:
            # Drawn again from the seed in the backward: storing attention-probability masks
            # would cost what the reversible stack saves.
            masks = sample_dropout_masks(self.config, self.batch, self.length, self.dropout_seed,
                                         backend=resolve_backend(f"torch:{x.device}"))
        params = {"layers": tree_unflatten(self.template, leaves)}
        return reversible_layers(xp, params, self.config, rotations=self.rotations,
                                 attention_mask=self.attention_mask, dropout_masks=masks)


class ReversibleStack(torch.autograd.Function):
    """``(y1, y2) = stack(x1, x2)`` storing no activations; use :func:`reversible_stack`."""

    @staticmethod
    def forward(ctx, run: _StackRun, x1, x2, *leaves):
        ctx.run = run
        ctx.autocast = torch.is_autocast_enabled(_device_type(x1.device))
        ctx.autocast_dtype = torch.get_autocast_dtype(_device_type(x1.device)) if ctx.autocast else None
        with torch.no_grad():
            y1, y2 = reversible_forward(run.layers(x1, leaves), x1, x2)
        ctx.save_for_backward(y1, y2, *leaves)
        return y1, y2

    @staticmethod
    def backward(ctx, d_y1, d_y2):
        y1, y2, *leaves = ctx.saved_tensors
        device_type = _device_type(y1.device)
        backend = resolve_backend(f"torch:{y1.device}")
        # Replay the forward's autocast state so the recompute rounds as the forward did.
        with torch.autocast(device_type, dtype=ctx.autocast_dtype or torch.bfloat16, enabled=ctx.autocast):
            layers = ctx.run.layers(y1, [leaf.detach() for leaf in leaves])
            _, (d_x1, d_x2), grads = reversible_backward(layers, y1.detach(), y2.detach(), d_y1, d_y2,
                                                         vjp=backend.vjp)
        flat = tree_leaves([{"attention": d_f, "feed_forward": d_g} for d_f, d_g in grads])
        # autocast may hand back gradients in a lower precision than the parameters.
        flat = [g.to(leaf.dtype) for g, leaf in zip(flat, leaves)]
        return (None, d_x1.to(y1.dtype), d_x2.to(y2.dtype), *flat)


def reversible_stack(layer_params: list, x1, x2, config: ReformerConfig, *, rotations: list,
                     attention_mask=None, dropout_seed: int | None = None):
    """The model's reversible stack on torch tensors, differentiable by torch autograd.

    Args:
        layer_params: ``params["layers"]`` (tensors; those requiring grad get gradients).
        x1, x2: ``(batch, length, d_model)`` inputs (the model passes the embedding twice).
        config: the model's config; rotations: one entry per layer (None for non-LSH).
        attention_mask: optional ``(batch, length)`` padding mask; dropout_seed: None for no
            dropout, else the seed of the masks (redrawn identically in the backward).

    Returns:
        ``(y1, y2)``, each ``(batch, length, d_model)``.
    """
    batch, length = x1.shape[0], x1.shape[1]
    run = _StackRun(config, layer_params, rotations, attention_mask, dropout_seed, batch, length)
    return ReversibleStack.apply(run, x1, x2, *tree_leaves(layer_params))


class _ParamTree(nn.Module):
    """Parameters of a (nested dict/list) pytree as nested modules, so ``state_dict`` keys
    read like the pytree's paths (``params.layers.0.attention.qk``)."""

    def __init__(self, tree: dict) -> None:
        super().__init__()
        self._kind = "list" if isinstance(tree, list) else "dict"
        items = enumerate(tree) if isinstance(tree, list) else tree.items()
        for key, value in items:
            if isinstance(value, (dict, list)):
                self.add_module(str(key), _ParamTree(value))
            else:
                self.register_parameter(str(key), nn.Parameter(value))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(p.shape)}" for k, p in self.named_parameters(recurse=False))

    def tree(self):
        """The pytree of (live) parameters."""
        children = dict(self.named_children())
        params = dict(self.named_parameters(recurse=False))
        keys = list(children) + list(params)
        if self._kind == "list":
            return [children[k].tree() if k in children else params[k] for k in sorted(keys, key=int)]
        return {k: children[k].tree() if k in children else params[k] for k in keys}


class ReformerLM(nn.Module):
    """The Reformer language model as an ``nn.Module``.

    Parameters start as ``reformer_core.init_params(config, seed, backend="numpy")``, the
    numbers every backend starts from. ``forward(tokens, attention_mask=None)`` returns logits
    ``(batch, length, vocab_size)``.

    Randomness: in training mode each forward call draws new LSH rotations (and dropout
    masks) from ``step_seed(seed, step)``, where ``step`` is a buffer counting training
    forwards (an int saved in the state dict with the seeds, via ``get_extra_state``; it
    advances identically on every DDP replica); the backward replays them exactly. In eval mode the rotations come from ``rotations_seed`` (default ``seed``)
    and there is no dropout, so evaluation is deterministic. ``forward(..., rotations_seed=s)``
    overrides the seed for one call (and does not advance ``step``).

    Args:
        config: a :class:`reformer_core.ReformerConfig`.
        seed: parameter and randomness seed.
        dtype: parameter dtype, one of torch.float16, torch.bfloat16, torch.float32 (default) and
            torch.float64 (anything else raises TypeError); ``.to()``, ``.double()``, ``.bfloat16()``
            work too.
        device: where to create the parameters.
    """

    def __init__(self, config: ReformerConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: Any = None, rotations_seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
        if dtype not in _PARAMETER_DTYPES:  # float8 types are "floating" too, but not parameter dtypes
            raise TypeError(f"dtype must be one of the floating dtypes torch.float16, torch.bfloat16, torch.float32, "
                            f"torch.float64 (parameters in other dtypes are rounded or zeroed), got {dtype!r}")
        self.config = config
        self.seed = seed
        self.rotations_seed = seed if rotations_seed is None else rotations_seed
        host = init_params(config, seed, backend="numpy", dtype="float64")
        device = torch.device("cpu") if device is None else torch.device(device)
        tensors = tree_map(lambda a: torch.from_numpy(np.array(a)).to(device=device, dtype=dtype), host)
        self.params = _ParamTree(tensors)
        self.step = 0  # training forwards so far; a Python int, so reading it never syncs a device

    def get_extra_state(self) -> torch.Tensor:
        """The randomness state, saved in ``state_dict`` (as ``_extra_state``) with the weights.

        It is a uint8 tensor holding the JSON text ``{"seed", "rotations_seed", "step"}``, not
        a dict: every ``state_dict`` value is then a tensor, which ``safetensors.torch.save_model``
        needs (it reads ``.device`` and the storage of every value, so a dict made it fail with
        ``AttributeError: 'dict' object has no attribute 'device'``). JSON keeps seeds of any size
        exact (an int64 tensor would overflow above 2**63). Always on the CPU: it is metadata.
        """
        text = json.dumps({"seed": self.seed, "rotations_seed": self.rotations_seed, "step": self.step})
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Restore :meth:`get_extra_state`'s tensor (or the dict that older versions saved)."""
        if isinstance(state, torch.Tensor):
            if state.dtype != torch.uint8 or state.ndim != 1:
                raise ValueError(f"ReformerLM's _extra_state must be a 1-d uint8 tensor of JSON text, got "
                                 f"{state.dtype} of shape {tuple(state.shape)}")
            try:
                state = json.loads(bytes(state.cpu().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                raise ValueError(f"ReformerLM's _extra_state is not JSON text: {error}") from None
        if not isinstance(state, dict) or not {"seed", "rotations_seed", "step"} <= set(state):
            raise ValueError(f"ReformerLM's _extra_state must hold seed, rotations_seed and step, got {state!r}")
        self.seed, self.rotations_seed, self.step = int(state["seed"]), int(state["rotations_seed"]), int(state["step"])

    @classmethod
    def from_pretrained(cls, path, *, dtype: Any = None, device: Any = None, config_overrides: dict | None = None,
                        seed: int = 0, rotations_seed: int | None = None) -> "ReformerLM":
        """The model of a local HF Reformer folder (``reformer_core.from_pretrained``), in eval mode.

        ``dtype``: a torch dtype or name (default: the stored one); ``device``: where the
        parameters go (default CPU). With ``hash_seed`` in the HF config the LSH rotations are
        HF's (``docs/hf.md``); otherwise they come from ``rotations_seed`` as usual.
        """
        from reformer_core import from_pretrained

        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).rsplit(".", 1)[-1]
        spec = "torch" if device is None else f"torch:{torch.device(device)}"
        params, config = from_pretrained(path, backend=spec, dtype=dtype, config_overrides=config_overrides)
        first = tree_leaves(params)[0]
        model = cls(config, seed=seed, dtype=first.dtype, device=first.device, rotations_seed=rotations_seed)
        with torch.no_grad():
            tree_map(lambda live, loaded: live.copy_(loaded), model.parameter_tree(), params)
        return model.eval()

    def parameter_tree(self) -> dict:
        """The parameters as the core's pytree (``init_params``'s structure), live ``nn.Parameter`` s."""
        return self.params.tree()

    def _check_inputs(self, tokens, attention_mask) -> None:
        reference = self.params.get_parameter("embedding.tokens")
        for name, value in (("tokens", tokens), ("attention_mask", attention_mask)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__module__}."
                                f"{type(value).__qualname__}; convert it with torch.as_tensor(...)")
            if value.device != reference.device:
                raise ValueError(f"{name} is on {value.device} but the model is on {reference.device}; "
                                 f"move one of them with .to(device) (ReformerLM never moves data for you)")

    def forward(self, tokens, attention_mask=None, *, rotations_seed: int | None = None,
                check_values: bool = True):
        """Logits ``(batch, length, vocab_size)`` for int tokens ``(batch, length)``."""
        self._check_inputs(tokens, attention_mask)
        config = self.config
        params = self.params.tree()
        xp = namespace(tokens)
        check_tokens(xp, tokens, config, check_values)
        batch, length = tokens.shape
        dropout_seed = None
        if rotations_seed is None:
            if self.training:
                rotations_seed = step_seed(self.rotations_seed, self.step)
                dropout_seed = step_seed(self.seed, self.step, stream=1) if _has_dropout(config) else None
                self.step += 1
            else:
                rotations_seed = self.rotations_seed
        elif self.training and _has_dropout(config):
            dropout_seed = step_seed(self.seed, rotations_seed, stream=1)
        masks = None
        if dropout_seed is not None:
            masks = sample_dropout_masks(config, batch, length, dropout_seed,
                                         backend=resolve_backend(f"torch:{tokens.device}"))
        x = embed(xp, params["embedding"], tokens, config, masks["embedding"] if masks else None)
        # Under autocast the attention inputs are projections, computed in the autocast dtype:
        # the rotations take that dtype so hashing sees one dtype (the core does not promote).
        device_type = _device_type(x.device)
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        rotations = sample_rotations(config, length, rotations_seed,
                                     like=torch.empty((0,), dtype=dtype, device=x.device))
        y1, y2 = reversible_stack(params["layers"], x, x, config, rotations=rotations,
                                  attention_mask=attention_mask, dropout_seed=dropout_seed)
        return output_head(xp, params, y1, y2, config, masks["output"] if masks else None)

    def generate(self, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None, seed: int = 0,
                 rotations_seed: int | None = None, on_token=None):
        """Cached autoregressive generation: ``reformer_core.generate`` with this module's
        parameters, without autograd; ``rotations_seed`` defaults to the eval-mode one, so greedy
        tokens match ``forward`` in eval mode on the padded prefix. See ``docs/generate.md``."""
        from reformer_core import generate

        self._check_inputs(prompt, None)
        with torch.no_grad():
            return generate(self.parameter_tree(), self.config, prompt, max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, seed=seed,
                            rotations_seed=self.rotations_seed if rotations_seed is None else rotations_seed,
                            on_token=on_token)

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={list(c.attention_layers)}, d_model={c.d_model}, heads={c.num_heads}, "
                f"vocab_size={c.vocab_size}, seed={self.seed}")


def _has_dropout(config: ReformerConfig) -> bool:
    return bool(config.hidden_dropout or config.attention_dropout)
