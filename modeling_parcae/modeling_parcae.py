"""Parcae: a stable looped language model (Prairie et al., 2026) in the shape of transformers' Llama.

Data flow: tokens -> prelude blocks -> ``e = prelude_norm(x)`` -> state ``h`` (zero / random / given) -> ``num_loops`` x
[``u = injection(h, e)``; core blocks] -> ``state_readout`` -> coda blocks -> norm -> tied head.
Numerics follow the official implementation exactly (interleaved-pair RoPE, weightless qk-norm with float32 epsilon
after RoPE, value embeddings gated by the first 32 normed channels, 0.5 * relu^2, RMSNorm in float32).

Deliberate deviations from the official code (documented in the README): ``attention_mask`` is honoured (the
official code ignores it), and the initial state at inference is zero unless ``config.inference_state_init="config"``.

This file is part of the remote code copied next to saved checkpoints: it imports only torch/transformers.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .adaptive_parcae import ExitPolicy
from .cache_parcae import BlockCache, ParcaeSlotMap, prepare_cache
from .chunked_loss import chunked_linear_cross_entropy
from .configuration_parcae import BlockSpec, ParcaeConfig, validate_num_loops
from .transformers_compat import accepts_either_cache_name, cache_field, cache_of, causal_mask


logger = logging.get_logger(__name__)

LoopCount = int | tuple[int, int] | list[int] | torch.Tensor


class ParcaeRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, computed in float32 exactly like the official ``freqs_cis`` buffer.

    Other ``rope_type``s (``linear``, ``dynamic``, ``yarn``, ...) come from transformers' ``ROPE_INIT_FUNCTIONS`` and
    ``dynamic_rope_update``, as for Llama: frequencies are per rotated pair, so they apply to interleaved pairs too.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: ParcaeConfig, device: torch.device | None = None):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type != "default" and self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_parameters['rope_type']={self.rope_type!r} is not a RoPE type transformers knows: "
                             f"use 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}")
        self.rope_init_fn = (self.compute_default_rope_parameters if self.rope_type == "default"
                             else ROPE_INIT_FUNCTIONS[self.rope_type])
        inv_freq, self.attention_scaling = self.rope_init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: ParcaeConfig, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
        dim, theta = config.head_dim, config.rope_parameters["rope_theta"]
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` of shape (batch, seq_len, head_dim / 2); ``x`` only gives the device (Llama's API)."""
        # elementwise product == torch.outer in the official table, so the angles are bit-identical
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        if self.attention_scaling == 1.0:
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the last dim (the GPT-J / "complex" layout of the official code).

    ``x`` is (B, T, heads, D), ``cos``/``sin`` (B, T, D/2); computed in float32, cast back. One complex multiply per
    pair: the official ``apply_rotary_emb_complex_like``'s products and sums (bit-identical) without its four
    temporaries, about 20x cheaper on CPU at the 140M prefill shape (5-10% of a block).
    """
    if torch.compiler.is_compiling():  # inductor has no complex kernels: the same products in real arithmetic
        pairs = x.float().unflatten(-1, (-1, 2))
        real, imag, cos, sin = pairs[..., 0], pairs[..., 1], cos[:, :, None], sin[:, :, None]
        return torch.stack((real * cos - imag * sin, imag * cos + real * sin), dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * torch.complex(cos, sin)[:, :, None])
    return rotated.flatten(-2).to(x.dtype)


def with_init(module: nn.Module, method: str) -> nn.Module:
    """Tag a stock ``nn.Linear``/``nn.Embedding`` with the official init it gets where that is not the orthogonal
    default (``zero``, ``normal``, ``torch-default``, ``trunc-normal``; see ``_init_weights``): transformers initialises
    leaf by leaf, so the leaf carries its rule."""
    module.parcae_init = method
    return module


class ParcaeRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as the official ``RMSNorm`` does."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel, one pass instead of five elementwise ones (a decode step's norms are launch-bound);
        # in float32 it applies the weight too, the same product
        if hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        normalized = F.rms_norm(hidden_states.float(), self.weight.shape, eps=self.variance_epsilon)
        return self.weight * normalized.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class HalfReLUSquared(torch.autograd.Function):
    """The official ReLU2 ``0.5 * relu(x)^2`` (same ops, same order) with a one-pass backward ``grad * relu(x)``, equal
    to autograd's bit for bit (powers of two; subnormals aside). Autograd's own chain sweeps four intermediate-width
    buffers in the backward, and no torch or transformers op fuses this activation in eager mode."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        relu = F.relu(x)
        ctx.save_for_backward(relu)
        return relu.square().mul_(0.5)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (relu,) = ctx.saved_tensors
        return grad_output * relu


class ParcaeMLP(nn.Module):
    """``down_proj(0.5 * relu(up_proj(x))^2)`` — the official ReLU2 carries the 0.5 factor."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = with_init(nn.Linear(intermediate_size, hidden_size, bias=bias), "zero")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.up_proj(x)
        if torch.is_grad_enabled() and hidden.requires_grad:
            return self.down_proj(HalfReLUSquared.apply(hidden))
        # no graph to record: the same ops in place on up_proj's fresh output, without an autograd Function's call
        return self.down_proj(F.relu_(hidden).square_().mul_(0.5))


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in plain torch (``attn_implementation="eager"``, the one that returns the weights), as Llama's: keys
    and values repeated over query groups, softmax in float32. Output ``(B, T, heads, D)``, weights ``(B, heads, T, S)``."""
    groups = module.num_key_value_groups
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ParcaeAttention(nn.Module):
    """Causal self-attention with value embeddings, interleaved RoPE and a weightless qk-norm after RoPE."""

    def __init__(self, config: ParcaeConfig, hidden_size: int, num_heads: int, num_kv_heads: int, has_ve_gate: bool):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_heads = num_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.qk_norm = config.qk_norm
        self.value_embedding_gate_channels = config.value_embedding_gate_channels
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=config.bias)
        self.o_proj = with_init(nn.Linear(num_heads * self.head_dim, hidden_size, bias=config.bias), "zero")
        self.ve_gate = None
        if has_ve_gate:
            gate = nn.Linear(config.value_embedding_gate_channels, num_kv_heads, bias=False)
            self.ve_gate = with_init(gate, "torch-default")

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: BlockCache | None = None,
        cache_slot: int | None = None,
        value_embedding: torch.Tensor | None = None,
        positions_to_keep: int = 0,
        slot_attention: "ParcaeSlotAttention | None" = None,
        unpack_attention_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``positions_to_keep`` > 0: queries (and the output) for the last that many positions only; keys and values
        of every position are still computed and cached. The model then passes an explicit mask (``None`` would let
        a lone query attend every key, unwritten static-cache slots included), of which the kept rows are used.
        ``cache``: a transformers ``Cache``, or on a side route one of the views ``BlockCache`` names; written at
        ``cache_slot``. ``slot_attention``: under vLLM, the attention of this execution of the block (its own KV cache
        there). ``unpack_attention_rows``: under adaptive exit, maps the packed rows of the attention weights back to
        ``(batch, heads, seq_len, keys)``."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        cos, sin = position_embeddings
        query_states, query_cos, query_sin = hidden_states, cos, sin
        if positions_to_keep:
            query_states = hidden_states[:, -positions_to_keep:]
            query_cos, query_sin = cos[:, -positions_to_keep:], sin[:, -positions_to_keep:]
            attention_mask = attention_mask[..., -positions_to_keep:, :]
        input_shape = query_states.shape[:-1]
        query = self.q_proj(query_states).view(*input_shape, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape)
        if value_embedding is not None and self.ve_gate is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(hidden_states[..., : self.value_embedding_gate_channels]))
            value = value + gate.unsqueeze(-1) * value_embedding.view(hidden_shape)

        # q and k together, as the official code (one float32 round trip, not two), token-major: the heads keep the
        # projections' (B, T, heads, D) layout, which the attention kernels then write their output in (no copy back)
        if query.shape[1] == key.shape[1]:
            both = self._rotate_and_norm(torch.cat([query, key], dim=2), cos, sin)
            query, key = both.split([query.shape[2], key.shape[2]], dim=2)
        else:  # queries trimmed to the kept positions
            query, key = self._rotate_and_norm(query, query_cos, query_sin), self._rotate_and_norm(key, cos, sin)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        if cache is not None:
            key, value = cache.update(key, value, cache_slot)

        if slot_attention is not None:
            attn_output, attn_weights = slot_attention(query, key, value, attention_mask, **kwargs)
        else:
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
            )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        if unpack_attention_rows is not None and attn_weights is not None:
            attn_weights = unpack_attention_rows(attn_weights)
        return self.o_proj(attn_output), attn_weights

    def _rotate_and_norm(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE (in float32, as officially), then the weightless qk-norm (eps=None: PyTorch's float32 machine epsilon,
        as the official code). The norm of bfloat16/float16 states runs on their float32 copy: the same values (torch
        computes in float32 either way) at a twentieth of the time of its half-precision CPU kernel."""
        states = apply_interleaved_rotary(states, cos, sin)
        if not self.qk_norm:
            return states
        return F.rms_norm(states.float(), (self.head_dim,)).to(states.dtype)


class ParcaeSlotAttention(nn.Module):
    """The attention call of one *executed* block, without parameters: built under vLLM alone.

    vLLM's Transformers backend gives its own KV cache to every module that calls the attention interface and has an
    integer ``layer_idx``, one for each index below ``config.num_hidden_layers``. A core block runs once per loop, so
    its projections stay in :class:`ParcaeAttention` and each of its executions calls the slot module of its cache
    slot (``ParcaeSlotMap`` numbering): every loop attends over its own keys and values, exactly as transformers' cache.
    """

    def __init__(self, config: ParcaeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.scaling = config.head_dim**-0.5
        self.is_causal = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                                   **kwargs)


class ParcaeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block ``x + attn(norm(x))``, ``x + mlp(norm(x))`` of every stage. Its identity is fixed at construction
    (``spec``); its KV slot is the slot map's, per forward, since a core block runs once per loop."""

    def __init__(self, config: ParcaeConfig, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        core = spec.stage == "core"
        hidden_size = config.state_size if core else config.hidden_size
        num_heads = config.core_num_attention_heads if core else config.num_attention_heads
        num_kv_heads = config.core_num_attention_heads if core else config.num_key_value_heads
        intermediate_size = config.core_intermediate_size if core else config.intermediate_size
        self.input_layernorm = ParcaeRMSNorm(hidden_size, eps=config.rms_norm_eps)
        self.self_attn = ParcaeAttention(config, hidden_size, num_heads, num_kv_heads, spec.has_value_embedding_gate)
        self.post_attention_layernorm = ParcaeRMSNorm(hidden_size, eps=config.rms_norm_eps)
        self.mlp = ParcaeMLP(hidden_size, intermediate_size, config.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        value_embedding: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: BlockCache | None = None,
        cache_slot: int | None = None,
        positions_to_keep: int = 0,
        slot_attention: "ParcaeSlotAttention | None" = None,
        unpack_attention_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``value_embedding`` comes second and is passed positionally: gradient checkpointing hands only positional
        tensors to ``torch.utils.checkpoint``, and the value-embedding tables need their gradient (it also drops
        ``cache``, so that the backward replay does not write it a second time).
        ``positions_to_keep`` > 0: the output of the last that many positions only (see ``ParcaeModel.forward``).
        ``cache``, ``slot_attention``, ``unpack_attention_rows``: see ``ParcaeAttention.forward``; ``kwargs`` are
        transformers' attention keyword arguments, handed to the attention function."""
        attn_output, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            cache_slot=cache_slot,
            value_embedding=value_embedding,
            positions_to_keep=positions_to_keep,
            slot_attention=slot_attention,
            unpack_attention_rows=unpack_attention_rows,
            **kwargs,
        )
        if positions_to_keep:
            hidden_states = hidden_states[:, -positions_to_keep:]
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class ParcaeDiagonalInjection(nn.Module):
    """Parcae's stable injection ``u = h * exp(-dt * A) + dt * (e B^T)``, ``dt = softplus(dt_bias)``, ``A = exp(A_log)``;
    ``dt, A > 0`` keep every decay in (0, 1): the spectral radius of the state transition stays below 1."""

    def __init__(self, config: ParcaeConfig):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(config.state_size))
        self.dt_bias = nn.Parameter(torch.zeros(config.state_size))
        self.B = nn.Parameter(torch.empty(config.state_size, config.hidden_size))

    def decay(self, dt: torch.Tensor | None = None) -> torch.Tensor:
        """Per-channel state decay ``exp(-dt * A)``, in (0, 1) (``dt``: ``softplus(dt_bias)`` when already at hand)."""
        dt = F.softplus(self.dt_bias) if dt is None else dt
        return torch.exp(-dt * torch.exp(self.A_log))

    def precompute(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop-invariant part ``(decay, dt * (e B^T))``, computed once per forward pass and handed to every loop
        (the official code recomputes it each loop: same values, one d x d matmul per loop saved)."""
        dt = F.softplus(self.dt_bias)
        return self.decay(dt), dt * F.linear(embeds, self.B)

    def forward(self, state: torch.Tensor, embeds: torch.Tensor,
                precomputed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        decay, drive = self.precompute(embeds) if precomputed is None else precomputed
        return state * decay + drive


class ParcaeLinearInjection(nn.Module):
    """Prior looped models' injection ``u = W [h; e]`` (state first), unconstrained."""

    def __init__(self, config: ParcaeConfig):
        super().__init__()
        self.proj = with_init(nn.Linear(config.state_size + config.hidden_size, config.state_size, bias=config.bias),
                              "trunc-normal")

    def precompute(self, embeds: torch.Tensor) -> None:
        """Nothing here is loop-invariant."""

    def forward(self, state: torch.Tensor, embeds: torch.Tensor, precomputed: None = None) -> torch.Tensor:
        return self.proj(torch.cat([state, embeds], dim=-1))


class ParcaeAdditiveInjection(nn.Module):
    """``u = h + e``: no parameters."""

    def __init__(self, config: ParcaeConfig):
        super().__init__()

    def precompute(self, embeds: torch.Tensor) -> None:
        """Nothing here is loop-invariant."""

    def forward(self, state: torch.Tensor, embeds: torch.Tensor, precomputed: None = None) -> torch.Tensor:
        return state + embeds


INJECTION_CLASSES = {
    "diagonal": ParcaeDiagonalInjection,
    "linear": ParcaeLinearInjection,
    "add": ParcaeAdditiveInjection,
}


class CoreStep(NamedTuple):
    """What one loop of the core runs on: the state and prelude output of the tokens it computes, the injection's
    loop-invariant part, their value embeddings and the block arguments (mask, rotary tables, cache)."""

    state: torch.Tensor
    embeds: torch.Tensor
    precomputed: tuple[torch.Tensor, torch.Tensor] | None
    value_embeddings: dict[str, torch.Tensor]
    block_kwargs: dict


@dataclass
class LoopSchedule:
    """A depth policy of the loop (the other is ``adaptive_parcae.ExitPolicy``): the core iterations each sample (or
    token) runs without, then with, gradient. Every sample runs the most loops of each phase and is frozen
    (``torch.where``) once its own count is exhausted, as the official per-sequence sampler does."""

    no_grad_depth: torch.Tensor
    grad_depth: torch.Tensor
    # per loop: (with gradient, the samples that compute it or None for all), decided once in Python, so that a fixed
    # depth reads no tensor: a compiled decode step then traces the loop without a graph break
    steps: list[tuple[bool, torch.Tensor | None]] | None = None

    def __post_init__(self):
        if self.steps is None:
            self.steps = [(with_grad, None if bool(active.all()) else active)
                          for depth, with_grad in ((self.no_grad_depth, False), (self.grad_depth, True))
                          for active in (depth > step for step in range(int(depth.max())))]
        self.num_loops = len(self.steps)
        self.loops_run = self.no_grad_depth + self.grad_depth
        self.is_uniform = all(active is None for _, active in self.steps)

    @classmethod
    def fixed(cls, no_grad: int, with_grad: int) -> "LoopSchedule":
        steps = [(False, None)] * no_grad + [(True, None)] * with_grad
        return cls(torch.tensor([no_grad]), torch.tensor([with_grad]), steps)

    def with_grad(self, loop: int) -> bool:
        return self.steps[loop][0]

    def begin(self, loop: int, step: CoreStep, slots: list[int]) -> CoreStep:
        """Every sample computes every loop (frozen ones are reset in :meth:`end`)."""
        return step

    def end(self, loop: int, state: torch.Tensor, new_state: torch.Tensor) -> torch.Tensor:
        active = self.steps[loop][1]
        if active is None:
            return new_state
        # frozen samples keep their state; per-sequence masks broadcast over (T, S), per-token over S
        mask = active.to(state.device).view(*active.shape, *([1] * (state.dim() - active.dim())))
        return torch.where(mask, new_state, state)


def sample_loop_schedule(config: ParcaeConfig, batch_size: int, seq_len: int, step: int) -> LoopSchedule:
    """Sample a training depth per ``config.sampling_scheme`` / ``recurrent_iteration_method`` (official
    ``_sample_loop_depth``), seeded from ``depth_sampling_seed + step``: a run is reproducible from its step."""
    generator = torch.Generator().manual_seed((config.depth_sampling_seed + step) % (2**31 - 1))
    shape = {"per-batch": (1,), "per-sequence": (batch_size,), "per-token": (batch_size, seq_len)}[
        config.recurrent_iteration_method
    ]
    backprop = config.mean_backprop_depth
    forward_only = max(config.mean_recurrence - backprop, 0)
    if config.sampling_scheme == "fixed":
        return LoopSchedule(torch.full(shape, forward_only), torch.full(shape, backprop))
    rate = torch.full(shape, float(forward_only + backprop if config.sampling_scheme == "poisson-full"
                                   else config.mean_recurrence))
    total = torch.poisson(rate, generator=generator).long().clamp(min=1)
    if config.sampling_scheme == "poisson-full":
        return LoopSchedule(torch.zeros_like(total), total)
    with_grad = total.clamp(max=backprop)  # poisson-truncated-full: only the last <= backprop loops get gradients
    return LoopSchedule(total - with_grad, with_grad)


def initialize_state(
    method: str, embeds: torch.Tensor, state_size: int, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Initial recurrent state with the official semantics of each ``state_init`` (official ``model.py``, ``initialize_state``)."""
    shape = (*embeds.shape[:-1], state_size)
    if method == "zero":
        return embeds.new_zeros(shape)
    return _random_state(method, embeds, shape, std, generator)


@torch.compiler.disable  # drawn eagerly under torch.compile too: the random stream of an eager run, no .item() break
def _random_state(method: str, embeds: torch.Tensor, shape: tuple[int, ...], std: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, device=embeds.device, dtype=embeds.dtype)
    if method == "normal":
        return noise
    if method == "embed":
        return noise / math.sqrt(embeds.shape[-1])
    if method == "unit":
        return (noise - noise.mean(-1, keepdim=True)) / (noise.std(-1, keepdim=True) + 1e-8)
    # like-init: the official code draws randn and then overwrites it with a truncated normal (two RNG draws)
    return nn.init.trunc_normal_(noise, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)


def check_forward_inputs(config: ParcaeConfig, input_ids, inputs_embeds, attention_mask, initial_state,
                         past_length: int) -> None:
    """A ``ValueError`` naming the argument instead of a torch error deep inside (or, for a mask of the wrong length,
    silently different logits). Types and shapes only: reads no tensor value, so it costs no host sync."""
    named = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
             "initial_state": initial_state}
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input_ids is not None:
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    elif inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(f"inputs_embeds must have shape (batch, seq_len, {config.hidden_size}), got "
                         f"{tuple(inputs_embeds.shape)}")
    batch_size, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    if seq_len == 0 or batch_size == 0:
        raise ValueError(f"the input is empty: batch {batch_size}, seq_len {seq_len}")
    if attention_mask is not None:
        if attention_mask.shape[0] != batch_size:
            raise ValueError(f"attention_mask has batch size {attention_mask.shape[0]}, input has {batch_size}")
        if attention_mask.ndim == 2 and attention_mask.shape[1] not in (seq_len, past_length + seq_len):
            raise ValueError(
                f"attention_mask has length {attention_mask.shape[1]}; expected the input length {seq_len} or "
                f"cached + input length {past_length + seq_len}")
        if attention_mask.ndim not in (2, 4):
            raise ValueError(f"attention_mask must be 2-D (batch, length) or 4-D, got {attention_mask.ndim}-D")
    if initial_state is not None and tuple(initial_state.shape) != (batch_size, seq_len, config.state_size):
        raise ValueError(f"initial_state must have shape (batch, seq_len, state_size) = "
                         f"{(batch_size, seq_len, config.state_size)}, got {tuple(initial_state.shape)}")


def check_servable_by_vllm(config: ParcaeConfig) -> None:
    """What vLLM's Transformers backend cannot serve of this config, refused at load rather than served wrong: it sizes
    every KV layer with the config's heads (the core blocks must have the same), applies no ``logit_softcap`` (it
    builds its own head), and takes the loop count as given (``hf_overrides`` skips the config's validation)."""
    validate_num_loops(config.num_loops)
    heads = {config.num_attention_heads, config.num_key_value_heads, config.core_num_attention_heads}
    if len(heads) > 1:
        raise ValueError(f"vLLM sizes every KV layer alike: this config has {config.num_attention_heads} attention "
                         f"heads, {config.num_key_value_heads} key/value heads and {config.core_num_attention_heads} "
                         "core heads; it serves only where the three are equal")
    if config.logit_softcap is not None:
        raise ValueError("vLLM's Transformers backend computes the logits with its own head and would leave "
                         f"logit_softcap={config.logit_softcap} out; this checkpoint cannot be served exactly by it")


def check_cache_type(cache) -> None:
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"the KV cache must be a transformers Cache (DynamicCache, StaticCache, ...), got "
                        f"{type(cache).__name__}")


def token_ids_out_of_range(config: ParcaeConfig, token_ids: torch.Tensor, name: str = "input_ids") -> ValueError:
    return ValueError(f"{name} must lie in [0, vocab_size={config.vocab_size}), got values from "
                      f"{int(token_ids.min())} to {int(token_ids.max())}")


def check_input_values(config: ParcaeConfig, input_ids, attention_mask, initial_state) -> None:
    """The checks that read tensor values (one host sync each), run once per sequence: on its first forward (no
    cached tokens yet), not on the decode steps that follow, whose tokens the model produced itself."""
    if input_ids is not None and bool(((input_ids < 0) | (input_ids >= config.vocab_size)).any()):
        raise token_ids_out_of_range(config, input_ids)
    if attention_mask is not None and attention_mask.ndim == 2:
        if attention_mask.dtype.is_floating_point and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("a 2-D attention_mask holds 1 (attend) and 0 (padding); got other values")
        empty = (attention_mask == 0).all(-1)
        if bool(empty.any()):
            raise ValueError(f"row {int(empty.nonzero()[0, 0])} of the batch has no token (its attention_mask is all "
                             "zeros, e.g. an empty prompt padded to the others): remove it from the batch")
    if initial_state is not None and not bool(torch.isfinite(initial_state).all()):
        raise ValueError("initial_state holds NaN or infinite values; every position would inherit them")


@contextmanager
def naming_damaged_weights(model_path: str | Path | None) -> Iterator[None]:
    """Turn safetensors' "incomplete metadata, file not fully covered" (which names no file) into an error naming
    the damaged weights file of ``model_path`` (a local directory; for a Hub id the cached file is named)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        folder = Path(model_path) if model_path is not None else None
        damaged = [str(path) for path in sorted(folder.glob("*.safetensors")) if not _opens(path)] if folder else []
        where = ", ".join(damaged) if damaged else f"the weights of {model_path}"
        raise ValueError(f"{where} is truncated or corrupt ({error})") from None


def _opens(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            return True
    except SafetensorError:
        return False


class ParcaePreTrainedModel(PreTrainedModel):
    config: ParcaeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ParcaeDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # output_attentions: one map per *executed* block, recorded by hooks in execution order (prelude, each loop's
    # core blocks, coda); hidden states are Parcae's own (see ParcaeModel.forward)
    _can_record_outputs = {"attentions": OutputRecorder(ParcaeAttention, index=1)}
    # a decode step with a static cache traces as one graph (the loop count is a Python int, unrolled)
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, naming the damaged weights file where safetensors cannot read one (its
        own error names none)."""
        with naming_damaged_weights(pretrained_model_name_or_path):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Validate the config first (transformers copies the remote-code files before it: an invalid edited config
        would leave only those). Remote code names the base model for ``AutoModel`` too (transformers: only the saved
        class)."""
        self.config.validate()
        if self._auto_class is not None:
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModel": f"{__name__.split('.')[-1]}.ParcaeModel"}
        super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The official "scaled-zero" init (paper §3, official ``init_weights``): orthogonal matrices with std
        sqrt(2/(5d)) but where :func:`with_init` tags another rule; the diagonal injection at decay sqrt(1/5), B = I.
        Nothing to do on the meta device, where vLLM builds the model before it loads the weights."""
        if any(parameter.is_meta for parameter in module.parameters(recurse=False)):
            return
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight
            method = getattr(module, "parcae_init", "orthogonal")
            if method == "zero":
                init.zeros_(weight)
            elif method == "normal":
                init.normal_(weight, mean=0.0, std=1.0)
            elif method == "torch-default":
                init.kaiming_uniform_(weight, a=math.sqrt(5))
            elif method == "trunc-normal":
                init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)
            else:
                init.orthogonal_(weight, gain=std * math.sqrt(max(weight.shape)))
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ParcaeDiagonalInjection):
            init.zeros_(module.A_log)
            initial_dt = -math.log(math.sqrt(1 / 5))
            init.constant_(module.dt_bias, math.log(math.expm1(initial_dt)))  # softplus^-1
            init.eye_(module.B)  # square: the config keeps state_size == hidden_size
        else:  # norms at one, RoPE tables recomputed: transformers' own rules
            super()._init_weights(module)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the token embedding (and the tied head) as transformers does, and every value-embedding table with
        it: the tables are indexed by token id too, so a new token must get a row in each. Old rows are kept; new
        rows are the old rows' mean (``mean_resizing``, transformers' default for the token embedding) or drawn by the
        table's own rule, N(0, 1)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        tables = self.base_model.value_embeddings
        for key, table in tables.items():
            tables[key] = self._resized_table(table, embeddings.weight.shape[0], mean_resizing)
        return embeddings

    def _resized_table(self, table: nn.Embedding, rows: int, mean_resizing: bool) -> nn.Embedding:
        old = table.weight.detach()
        resized = with_init(nn.Embedding(rows, old.shape[1], device=old.device, dtype=old.dtype), table.parcae_init)
        kept = min(rows, old.shape[0])
        with torch.no_grad():
            if rows > kept and mean_resizing:
                resized.weight[kept:] = old.float().mean(0).to(old.dtype)
            elif rows > kept:
                self._init_weights(resized)
            resized.weight[:kept] = old[:kept]
        return resized.requires_grad_(table.weight.requires_grad)


class ParcaeModel(ParcaePreTrainedModel):
    """Prelude -> looped core -> coda, returning the final normed hidden states."""

    def __init__(self, config: ParcaeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.prelude = self._build_stage("prelude", config.num_prelude_layers)
        self.looped = config.looped
        if config.looped:
            self.prelude_norm = ParcaeRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.prelude_norm else None
            self.injection = INJECTION_CLASSES[config.injection_type](config)
            self.core = self._build_stage("core", config.num_core_layers)
            self.state_readout = nn.Linear(config.state_size, config.hidden_size, bias=False)
        else:
            self.prelude_norm = self.injection = self.state_readout = None
            self.core = nn.ModuleList()
        self.coda = self._build_stage("coda", config.num_coda_layers)
        self.norm = ParcaeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        kv_dim = config.num_key_value_heads * config.head_dim
        self.value_embeddings = nn.ModuleDict({str(index): with_init(nn.Embedding(config.vocab_size, kv_dim), "normal")
                                               for index in config.value_embedding_table_indices()})
        self.rotary_emb = ParcaeRotaryEmbedding(config)
        self.slot_attention = None
        if config._attn_implementation == "vllm":
            check_servable_by_vllm(config)
            self.slot_attention = nn.ModuleList(ParcaeSlotAttention(config, index)
                                                for index in range(config.num_hidden_layers))
        # the sampled forwards counted by the model itself, for training loops that pass no ``depth_sampling_step``
        # (Trainer); ``parcae train`` owns its count and passes it
        self.depth_sampling_step = 0
        self.gradient_checkpointing = False
        self.post_init()

    def _build_stage(self, stage: str, count: int) -> nn.ModuleList:
        return nn.ModuleList(ParcaeDecoderLayer(self.config, spec) for spec in self.config.block_specs(stage, count))

    @accepts_either_cache_name
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        num_loops: LoopCount | None = None,
        initial_state: torch.Tensor | None = None,
        state_generator: torch.Generator | None = None,
        output_hidden_states: bool | None = None,
        output_depths: Sequence[int] | None = None,
        exit_threshold: float | None = None,
        positions_to_keep: int = 0,
        depth_sampling_step: int | None = None,
        **kwargs,
    ) -> "ParcaeModelOutputWithPast":
        r"""
        num_loops (`int` or `(no_grad, with_grad)` pair, *optional*):
            Core iterations. Default: ``config.num_loops`` in eval mode; in training ``config.train_num_loops`` if
            set, else a depth sampled per ``config.sampling_scheme``. An int in training back-propagates through its
            last ``min(num_loops, mean_backprop_depth)`` iterations only.
        initial_state (`torch.Tensor` of shape `(batch, seq_len, state_size)`, *optional*):
            Explicit initial recurrent state; overrides every initialisation policy.
        state_generator (`torch.Generator`, *optional*):
            Generator for random initial states (``like-init`` etc.), for reproducible official-style sampling.
        output_hidden_states (`bool`, *optional*):
            ``(embeddings, prelude_1..P, loop_1..loop_T, coda_1..coda_C)``: the recurrent state after each loop (before
            ``state_readout``) and each coda block's output (before the final norm). Under ``exit_threshold`` a token
            that has exited repeats its last state, so there are always ``num_loops`` loop states.
        output_attentions (`bool`, *optional*):
            The attention weights of every *executed* block in execution order (prelude, each loop's core blocks,
            coda; eager attention). Under ``exit_threshold`` the rows of exited tokens are zero, and loops after every
            token has exited execute no block.
        inputs_embeds (`torch.FloatTensor` of shape `(batch, seq_len, hidden_size)`, *optional*):
            Instead of ``input_ids``. Value embeddings are looked up from token ids, so positions given as embeddings
            carry none; this is what prompt tuning (virtual tokens) needs.
        cache (`Cache`, *optional*):
            Any transformers KV cache (dynamic, static, offloaded, quantized, or ``ParcaeSharedLoopCache`` for bounded
            memory), grown to one layer per executed block and bound to this forward's ``num_loops`` (and
            ``output_depths``): a later forward at another depth is refused. ``past_key_values`` is its deprecated name.
        output_depths (sequence of distinct positive `int`, *optional*):
            Loop counts to read out from one pass (evaluation only): the core runs ``max(output_depths)`` loops and
            each requested depth's state goes through readout, coda and norm into ``depth_hidden_states`` (given
            order; ``last_hidden_state`` the deepest), each equal to a separate forward at that ``num_loops``, cached
            continuations too (a coda slot set per depth; not with the bounded cache). ``generate`` decodes the deepest.
        exit_threshold (`float`, *optional*):
            Per-token adaptive depth (evaluation only): a token stops looping once ``||h_t - h_{t-1}|| / ||h_t||``
            falls below it (0 never exits), and is no longer computed; ``num_loops`` then returns the loops of each
            token, ``(batch, seq_len)``. Not with a static cache. See docs/generation.md.
        positions_to_keep (`int`, *optional*, defaults to 0):
            When > 0, the last coda block computes queries, MLP and output for the last that many positions only
            (keys and values of every position are still cached; ignored with ``output_hidden_states`` or no coda). [`ParcaeForCausalLM`] passes an integer
            ``logits_to_keep`` here, so that positions whose logits are dropped skip the last block too.
        depth_sampling_step (`int`, *optional*):
            In training with a sampled depth: draw this forward's depth from ``depth_sampling_seed + depth_sampling_step``
            (a training loop that owns its step passes it, as ``parcae train`` does). Without it the model counts its
            sampled forwards itself (``depth_sampling_step`` attribute), which is what ``Trainer`` relies on.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        check_cache_type(cache)
        past_length = cache.get_seq_length() if cache is not None else 0
        if not torch.compiler.is_compiling():
            check_forward_inputs(self.config, input_ids, inputs_embeds, attention_mask, initial_state, past_length)
            if past_length == 0:
                check_input_values(self.config, input_ids, attention_mask, initial_state)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        keep = self._positions_to_keep(positions_to_keep, seq_len, output_hidden_states, kwargs)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        schedule, output_depths = self._depth_policy(num_loops, output_depths, exit_threshold, batch_size, seq_len,
                                                     cache, attention_mask, past_length, depth_sampling_step)
        slot_map = ParcaeSlotMap.for_config(self.config, schedule.num_loops if self.looped else 0, output_depths)
        if self.slot_attention is not None and (cache is not None or output_depths is not None or exit_threshold
                                                is not None or schedule.num_loops != self.config.num_loops):
            raise ValueError("under vLLM the loop count is the engine's (hf_overrides={'num_loops': N}), for every "
                             "request; per-call num_loops, output_depths, exit_threshold and a transformers cache are "
                             "not available there")
        if cache is not None:
            prepare_cache(cache, slot_map)

        position_ids = self._position_ids(position_ids, attention_mask, past_length, batch_size, seq_len,
                                          inputs_embeds.device)
        mask_arguments = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              cache=cache, position_ids=position_ids)
        attention_bias = causal_mask(**mask_arguments)
        block_kwargs = dict(attention_mask=attention_bias, position_embeddings=self.rotary_emb(inputs_embeds, position_ids),
                            cache=cache, **kwargs)
        # trimmed queries read rows of an explicit mask: sdpa's implicit one cannot align them to the right keys
        last_block_mask = (causal_mask(**mask_arguments, allow_is_causal_skip=False)
                           if keep and attention_bias is None else attention_bias)
        value_embeddings = self._lookup_value_embeddings(input_ids)
        all_hidden_states = [inputs_embeds] if output_hidden_states else None

        hidden_states = self._run_stage(self.prelude, inputs_embeds, value_embeddings, block_kwargs,
                                        [slot_map.prelude(i) for i in range(len(self.prelude))], all_hidden_states)
        if self.looped:
            embeds = self.prelude_norm(hidden_states) if self.prelude_norm is not None else hidden_states
            state = self._initial_state(embeds, initial_state, state_generator)
            states = [] if output_hidden_states or output_depths is not None else None  # the state after each loop
            iterate = self._iterate_regionally if self.training else self._iterate
            state = iterate(state, embeds, schedule, slot_map, value_embeddings, block_kwargs, states)
            if all_hidden_states is not None:
                all_hidden_states.extend(states)
        else:
            state = hidden_states

        def tail(state, depth_rank, record):  # unannotated: dynamo cannot evaluate ``list | None`` while tracing
            """Read-out, coda and final norm of one depth's state (the coda's last block trimmed to ``keep``)."""
            hidden = self.state_readout(state) if self.looped else state
            slots = [slot_map.coda(i, depth_rank) for i in range(len(self.coda))]
            return self.norm(self._run_stage(self.coda, hidden, value_embeddings, block_kwargs, slots, record,
                                             keep=keep, last_block_mask=last_block_mask))

        hidden_states = tail(state, 0, all_hidden_states)
        depth_hidden_states = None
        if output_depths is not None:  # the deepest is ``hidden_states``; the others get their own coda pass
            depth_hidden_states = tuple(
                hidden_states if depth == slot_map.num_loops else tail(states[depth - 1], slot_map.depth_rank(depth), None)
                for depth in output_depths)

        return ParcaeModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            **cache_field(cache if use_cache else None),
            num_loops=schedule.loops_run,
            depth_hidden_states=depth_hidden_states,
        )

    # -- pieces of the forward pass ----------------------------------------------------------------------------

    def _iterate(self, state: torch.Tensor, embeds: torch.Tensor, schedule: "LoopSchedule | ExitPolicy",
                 slot_map: ParcaeSlotMap, value_embeddings: dict[str, torch.Tensor], block_kwargs: dict,
                 states: list | None = None) -> torch.Tensor:
        """The one loop of the core, ``state <- core(injection(state, e))``, under a depth policy (``schedule``) that
        decides each loop's gradient, which tokens compute it (``begin``) and how their new states merge (``end``).
        ``states``, when given, receives the state after each loop."""
        precomputed = self.injection.precompute(embeds)  # loop-invariant: once, under the caller's grad mode
        for loop in range(schedule.num_loops):
            slots = [slot_map.core(loop, j) for j in range(len(self.core))]
            with torch.set_grad_enabled(schedule.with_grad(loop) and torch.is_grad_enabled()):
                step = schedule.begin(loop, CoreStep(state, embeds, precomputed, value_embeddings, block_kwargs), slots)
                if step is not None:  # None: every token has exited, the state stays
                    hidden = self.injection(step.state, step.embeds, step.precomputed)
                    hidden = self._run_stage(self.core, hidden, step.value_embeddings, step.block_kwargs, slots)
                    state = schedule.end(loop, state, hidden)
            if states is not None:
                states.append(state)
        return state

    # Training under a whole-model torch.compile (``TrainingArguments(torch_compile=True)``): dynamo skips this frame
    # but compiles the stages and injections it calls, so every sampled depth reuses their graphs (regional
    # compilation) instead of unrolling a new graph per depth. Inference keeps the unrolled loop (fullgraph decode).
    _iterate_regionally = torch.compiler.disable(_iterate, recursive=False)

    def _run_stage(self, blocks: nn.ModuleList, hidden_states: torch.Tensor, value_embeddings: dict,
                   block_kwargs: dict, slots: list[int], record: list | None = None, keep: int = 0,
                   last_block_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``blocks`` in order into their cache ``slots``, appending each output to ``record`` when given;
        ``keep`` > 0 trims the last block to that many positions (reading its rows of ``last_block_mask``)."""
        for index, (block, slot) in enumerate(zip(blocks, slots)):
            trim = {}
            if keep and index == len(blocks) - 1:
                trim = {"positions_to_keep": keep, "attention_mask": last_block_mask}
            if self.slot_attention is not None:
                trim["slot_attention"] = self.slot_attention[self.config.vllm_kv_layer(slot)]
            hidden_states = block(hidden_states, value_embeddings.get(block.spec.value_embedding_key),
                                  cache_slot=slot, **{**block_kwargs, **trim})
            if record is not None:
                record.append(hidden_states)
        return hidden_states

    def _depth_policy(self, num_loops: LoopCount | None, output_depths: Sequence[int] | None,
                      exit_threshold: float | None, batch_size: int, seq_len: int, cache: Cache | None,
                      attention_mask: torch.Tensor | None, past_length: int,
                      depth_sampling_step: int | None) -> tuple["LoopSchedule | ExitPolicy", tuple[int, ...] | None]:
        """Validate the depth arguments once and turn them into the loop's policy (and the read-out depths)."""
        if not self.looped:
            if output_depths is not None or exit_threshold is not None:
                raise ValueError("output_depths and exit_threshold need a looped model; this one has a fixed depth")
            return LoopSchedule.fixed(0, 1), None
        if self.training and (output_depths is not None or exit_threshold is not None):
            raise ValueError("output_depths and exit_threshold are for evaluation (training samples its depths); call "
                             "model.eval() first")
        if output_depths is not None:
            depths = tuple(output_depths) if isinstance(output_depths, (tuple, list)) else ()
            if not depths or len(set(depths)) != len(depths) or any(
                    isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
                raise ValueError(f"output_depths must be a non-empty sequence of distinct positive ints, got "
                                 f"{output_depths!r}")
            if num_loops is not None and num_loops != max(depths):
                raise ValueError(f"num_loops={num_loops!r} contradicts output_depths={depths}: the pass runs "
                                 f"max(output_depths)={max(depths)} loops; leave num_loops out")
            if exit_threshold is not None:
                raise ValueError("exit_threshold and output_depths cannot be combined: a depth sweep runs every token "
                                 "to each depth")
            output_depths, num_loops = depths, max(depths)
        schedule = self._loop_schedule(num_loops, batch_size, seq_len, depth_sampling_step)
        if cache is not None and not schedule.is_uniform:
            raise ValueError("a KV cache needs one loop count for the whole batch; pass an int num_loops")
        if exit_threshold is None:
            return schedule, output_depths
        if isinstance(exit_threshold, bool) or not isinstance(exit_threshold, (int, float)) or exit_threshold < 0:
            raise ValueError(f"exit_threshold must be a number >= 0 (0 never exits early), got {exit_threshold!r}")
        if cache is not None and cache.is_compileable:
            raise ValueError("exit_threshold packs the tokens that still loop, which a static (pre-allocated) cache "
                             "cannot serve: use the default dynamic cache")
        return ExitPolicy(schedule.num_loops, float(exit_threshold), attention_mask, past_length), None

    def _loop_schedule(self, num_loops: LoopCount | None, batch_size: int, seq_len: int,
                       depth_sampling_step: int | None = None) -> LoopSchedule:
        """``num_loops`` (default: the config's, or a sampled depth in training) as a schedule. An int in training
        back-propagates through its last ``mean_backprop_depth`` loops; a ``(no_grad, with_grad)`` pair as given."""
        config = self.config
        if num_loops is None and self.training and config.train_num_loops is None:
            return self._sample_schedule(batch_size, seq_len, depth_sampling_step)
        if num_loops is None:
            num_loops = config.train_num_loops if self.training else config.num_loops
        if isinstance(num_loops, torch.Tensor):
            num_loops = num_loops.tolist()
        if isinstance(num_loops, (tuple, list)):
            if len(num_loops) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in num_loops) \
                    or sum(num_loops) < 1:
                raise ValueError(f"num_loops as a sequence must be a (no_grad, with_grad) pair of integers >= 0 with "
                                 f"a positive sum, got {num_loops!r}")
            return LoopSchedule.fixed(*num_loops)
        validate_num_loops(num_loops)
        with_grad = min(num_loops, config.mean_backprop_depth) if self.training else num_loops
        return LoopSchedule.fixed(num_loops - with_grad, with_grad)

    @torch.compiler.disable  # host-side, also under a whole-model compile: no guard on the step, no .item() break
    def _sample_schedule(self, batch_size: int, seq_len: int, step: int | None) -> LoopSchedule:
        """The training depth of sampling step ``step``, or of the model's own count when none is given (a run is
        reproducible from its step)."""
        if step is None:
            step = self.depth_sampling_step
            self.depth_sampling_step += 1
        return sample_loop_schedule(self.config, batch_size, seq_len, step)

    def _positions_to_keep(self, positions_to_keep: int, seq_len: int, output_hidden_states: bool, kwargs: dict) -> int:
        """The positions the last block computes (0: all). None trimmed while hidden states or attention maps are
        asked for (the last ones would lose rows), nor off the eager and sdpa paths (trimming takes rows of a mask)."""
        if isinstance(positions_to_keep, bool) or not isinstance(positions_to_keep, int) or positions_to_keep < 0:
            raise ValueError(f"positions_to_keep must be an int >= 0 (0 keeps every position), got {positions_to_keep!r}")
        if (output_hidden_states or kwargs.get("output_attentions", self.config.output_attentions)
                or positions_to_keep >= seq_len or self.config._attn_implementation not in (None, "eager", "sdpa")):
            return 0
        return positions_to_keep

    def _position_ids(self, position_ids, attention_mask, past_length, batch_size, seq_len, device) -> torch.Tensor:
        """Positions count real tokens only, so a left-padded prompt gets the positions it would have alone (without
        padding that is ``arange``: no host sync). Past the trained context, one warning, as in transformers' decoders."""
        if (self.rotary_emb.rope_type == "default" and not torch.compiler.is_compiling()
                and past_length + seq_len > self.config.max_position_embeddings):
            logger.warning_once(  # one text for every length: warning_once repeats a message that differs
                "The sequence is longer than the context this model was trained for (max_position_embeddings="
                f"{self.config.max_position_embeddings}); quality may degrade past it. "
                "A RoPE scaling (rope_parameters={'rope_type': 'linear' | 'dynamic' | 'yarn', 'factor': ...}) extends "
                "the context.")
        if position_ids is not None:
            return position_ids.expand(batch_size, -1) if position_ids.dim() == 1 else position_ids
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == past_length + seq_len:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
        return torch.arange(past_length, past_length + seq_len, device=device).expand(batch_size, -1)

    def _embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The token embedding, with the clear error for an id out of range also where the value check did not run
        (a forward with a filled cache); on an accelerator such an id is the device's own assertion."""
        try:
            return self.embed_tokens(input_ids)
        except IndexError as error:
            raise token_ids_out_of_range(self.config, input_ids) from error

    def _lookup_value_embeddings(self, input_ids: torch.LongTensor | None) -> dict[str, torch.Tensor]:
        """Value embeddings by table key, for the tables some block mixes in (looked up once, reused by every loop)."""
        if input_ids is None:
            return {}
        keys = {block.spec.value_embedding_key for block in (*self.prelude, *self.core, *self.coda)}
        return {key: self.value_embeddings[key](input_ids) for key in sorted(keys - {None})}

    def _initial_state(self, embeds, initial_state, generator) -> torch.Tensor:
        config = self.config
        if initial_state is not None:
            return initial_state.to(embeds.dtype)  # its shape was checked with the other inputs
        method = config.state_init if self.training or config.inference_state_init == "config" else "zero"
        return initialize_state(method, embeds, config.state_size, config.initializer_range, generator)


@dataclass
class ParcaeModelOutputWithPast(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus ``num_loops``: the core iterations each sequence (or token) ran, and
    ``depth_hidden_states``: the final hidden states at each of ``output_depths``."""

    num_loops: torch.LongTensor | None = None
    depth_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ParcaeCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``num_loops``: the core iterations each sequence (or token) ran, and
    ``depth_logits``: the logits at each of ``output_depths`` (``logits`` are the deepest's)."""

    num_loops: torch.LongTensor | None = None
    depth_logits: tuple[torch.FloatTensor, ...] | None = None


class ParcaeForCausalLM(ParcaePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: ParcaeConfig):
        super().__init__(config)
        self.model = ParcaeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._float16_training_checked = False
        self.post_init()

    def train(self, mode: bool = True) -> "ParcaeForCausalLM":
        """Entering training mode re-arms the float16 check (run by the next training forward, then not again:
        ``Trainer`` calls ``train()`` every step, and a scan of every parameter per step buys nothing)."""
        if mode and not self.training:
            self._float16_training_checked = False
        return super().train(mode)

    @accepts_either_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_loops: LoopCount | None = None,
        initial_state: torch.Tensor | None = None,
        state_generator: torch.Generator | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_depths: Sequence[int] | None = None,
        exit_threshold: float | None = None,
        chunked_loss: bool = False,
        **kwargs,
    ) -> ParcaeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*):
            Token ids for the language-modelling loss, **unshifted** (the loss shifts them), -100 to ignore.
        shift_labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*, in ``kwargs`` as for Llama):
            Targets already aligned with the positions (the next token of each), instead of ``labels``.
        chunked_loss (`bool`, *optional*, defaults to `False`):
            Compute head and loss chunk by chunk (``chunked_loss.py``): the ``(tokens, vocab)`` logits never exist,
            ``logits`` is ``None``. Saves memory: at the parcae-140m training shape on an H200, 7.4 instead of 12.8 GiB
            (its step-time cost is to be re-measured: ``docs/performance.md``).
        num_loops, initial_state, state_generator, output_depths, exit_threshold: see [`ParcaeModel.forward`];
            with ``output_depths`` the logits of every depth are in ``depth_logits``.

        Example:

        ```python
        >>> model = ParcaeForCausalLM.from_pretrained("path/to/parcae", num_loops=8)
        >>> logits = model(input_ids, num_loops=16).logits   # more compute per token, same parameters
        >>> model.generate(input_ids, num_loops=4, max_new_tokens=20)
        ```"""
        if self.training and torch.is_grad_enabled() and not self._float16_training_checked:
            self._refuse_float16_training()
            self._float16_training_checked = True
        shift_labels = kwargs.pop("shift_labels", None)  # not a named argument: Trainer would take it for a label
        reference = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and tuple(labels.shape) != tuple(reference.shape[:2]):
            raise ValueError(
                f"labels must have shape (batch, seq_len) = {tuple(reference.shape[:2])}, got {tuple(labels.shape)}"
            )
        outputs: ParcaeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_loops=num_loops,
            initial_state=initial_state,
            state_generator=state_generator,
            output_depths=output_depths,
            exit_threshold=exit_threshold,
            positions_to_keep=logits_to_keep if isinstance(logits_to_keep, int) else 0,
            **kwargs,
        )
        if chunked_loss:
            if labels is None and shift_labels is None or self.config.logit_softcap is not None or logits_to_keep:
                raise ValueError("chunked_loss computes the loss without logits: it needs labels or shift_labels, "
                                 "and neither logit_softcap nor logits_to_keep")
            targets = shift_labels if shift_labels is not None else F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = chunked_linear_cross_entropy(outputs.last_hidden_state, self.lm_head.weight, targets)
            return ParcaeCausalLMOutputWithPast(loss=loss, hidden_states=outputs.hidden_states,
                                                attentions=outputs.attentions, num_loops=outputs.num_loops,
                                                **cache_field(cache_of(outputs)))
        logits = self._logits(outputs.last_hidden_state, logits_to_keep)
        depth_logits = None
        if outputs.depth_hidden_states is not None:
            depth_logits = tuple(self._logits(hidden, logits_to_keep) for hidden in outputs.depth_hidden_states)

        loss = None
        if labels is not None or shift_labels is not None:
            try:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                          shift_labels=None if shift_labels is None else shift_labels.contiguous(),
                                          **kwargs)
            except IndexError as error:  # torch's "Target 300 is out of bounds" (on an accelerator: a device assert)
                targets = labels if labels is not None else shift_labels
                raise token_ids_out_of_range(self.config, targets[targets != -100], "labels (other than -100)") \
                    from error

        return ParcaeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            num_loops=outputs.num_loops,
            depth_logits=depth_logits,
            **cache_field(cache_of(outputs)),
        )

    def generate(self, *args, **kwargs):
        """transformers' ``generate``, with a KV cache that is no transformers ``Cache`` refused as ``forward`` refuses
        it (transformers itself would fail inside, on an attribute of the object)."""
        for name in ("cache", "past_key_values"):
            check_cache_type(kwargs.get(name))
        return super().generate(*args, **kwargs)

    def _logits(self, hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype, as Llama returns them (the official code casts them to float32: in bf16 that
        copy costs more than a block at the 140M shape, and transformers' losses and ``generate`` upcast what they
        read). A soft cap is applied in float32, as officially."""
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep  # 0: every position
        logits = self.lm_head(hidden_states[:, kept])
        if self.config.logit_softcap is not None:
            logits = self.config.logit_softcap * torch.tanh(logits.float() / self.config.logit_softcap)
        return logits

    def _refuse_float16_training(self) -> None:
        """Once per entry into training mode (see :meth:`train`): float16 weights overflow in training without float32 master weights (the loss diverges, then NaN), which
        neither Trainer nor the optimizers add; a float16 checkpoint (the demo ships one) is trained in float32 with
        fp16/bf16 autocast instead. Frozen float16 weights (LoRA on a float16 base) are fine."""
        half = [name for name, parameter in self.named_parameters()
                if parameter.requires_grad and parameter.dtype == torch.float16]
        if half:
            raise ValueError(
                f"{len(half)} trainable parameters are float16 (e.g. {half[0]}): training float16 weights without "
                "float32 master weights diverges to NaN. Load the model in float32 (from_pretrained(..., "
                "dtype=torch.float32)) and use mixed precision (TrainingArguments(bf16=True) or fp16=True), or freeze "
                "the float16 weights (e.g. LoRA).")


__all__ = ["ParcaeForCausalLM", "ParcaeModel", "ParcaePreTrainedModel"]
