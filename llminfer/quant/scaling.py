"""Per-input-channel scaling that leaves a float model's function unchanged (used by AWQ and SmoothQuant).

For a linear layer, W x = (W diag(s)) (x / s) for any positive s. When the op that produces x can divide
its output by s for free (an RMSNorm's weight, the output rows of a linear layer before it), the model
computes the same function, but weights and activations have new ranges: AWQ picks s to protect the weight
columns that meet large activations, SmoothQuant to move activation outliers into the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llminfer.models.llama import DecoderLayer, Llama, RMSNorm
from llminfer.quant.calibration import capture_inputs, decoder_inputs


@dataclass
class ScaleGroup:
    """Linear layers that read one input, and the op (an RMSNorm or a linear) whose output it is."""

    previous: nn.Module
    linears: dict[str, nn.Linear]   # name inside the decoder layer -> layer

    def reader(self) -> tuple[str, nn.Linear]:
        """The group's first linear and its name (they all read the same input)."""
        return next(iter(self.linears.items()))


def scale_groups(layer: DecoderLayer) -> list[ScaleGroup]:
    """The groups of a Llama decoder layer whose input scaling can be folded, in the order the layer runs them."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [ScaleGroup(layer.input_layernorm, {"self_attn.q_proj": attn.q_proj, "self_attn.k_proj": attn.k_proj,
                                                 "self_attn.v_proj": attn.v_proj})]
    # o_proj reads the attention output; attention only mixes tokens, so with one query head per KV head, input
    # channel c of o_proj is output channel c of v_proj, and dividing v_proj's row c divides it. With grouped-query
    # attention one v_proj channel feeds num_heads / num_kv_heads o_proj channels, which would all need the same
    # scale: per-channel scales cannot be folded there, and o_proj is left unscaled (as AWQ does).
    if attn.num_heads == attn.num_kv_heads:
        groups.append(ScaleGroup(attn.v_proj, {"self_attn.o_proj": attn.o_proj}))
    groups.append(ScaleGroup(layer.post_attention_layernorm, {"mlp.gate_proj": mlp.gate_proj,
                                                              "mlp.up_proj": mlp.up_proj}))
    # down_proj reads silu(gate) * up, which is linear in up: dividing up_proj's row c divides channel c.
    groups.append(ScaleGroup(mlp.up_proj, {"mlp.down_proj": mlp.down_proj}))
    return groups


@torch.no_grad()
def apply_scales(group: ScaleGroup, scales: torch.Tensor) -> None:
    """Multiply the group's weight columns by `scales` [in] and divide the previous op's output by them."""
    previous = group.previous
    if isinstance(previous, RMSNorm):
        previous.weight.div_(scales.to(previous.weight.dtype))
    elif isinstance(previous, nn.Linear):
        previous.weight.div_(scales.to(previous.weight.dtype)[:, None])
        if previous.bias is not None:
            previous.bias.div_(scales.to(previous.bias.dtype))
    else:
        raise ValueError(f"cannot fold scales into a {type(previous).__name__}: only RMSNorm and nn.Linear")
    for linear in group.linears.values():
        linear.weight.mul_(scales.to(linear.weight.dtype))


@torch.no_grad()
def scale_model(model: Llama, ids: torch.Tensor,
                choose: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]) -> None:
    """Fold per-channel scales into every foldable group of every decoder layer, in float, in place.

    `choose(x, weights)` gets a group's calibration inputs x [tokens, in] and its weights [out_i, in] and
    returns the scales [in]. The inputs come from the float model, which scaling does not change."""
    hidden, cos, sin = decoder_inputs(model, ids)
    for layer in model.layers:
        groups = scale_groups(layer)
        inputs = capture_inputs(layer, (hidden, cos, sin), dict(g.reader() for g in groups))
        # Later groups first: a group's scales divide the op before it, which can be a layer of an earlier group
        # (up_proj before down_proj, v_proj before o_proj), and that group's choice should see its final weights.
        for group in reversed(groups):
            x = inputs[group.reader()[0]]
            apply_scales(group, choose(x, [linear.weight for linear in group.linears.values()]))
        hidden = layer(hidden, cos, sin)
