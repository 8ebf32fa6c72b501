"""Tensor names -> (role, layer): the units a cut works with, from the GGUF name alone.

Scheme 1 (CUT_SCHEME): the first dot-separated component after the first that is all ASCII digits is the
layer ("blk.12.attn_q.weight" -> layer 12); the role is the name without it and without its last component
when there are two or more ("blk.attn_q"; "token_embd.weight" -> "token_embd"; "output_norm.weight" ->
"output_norm"), so a weight and its bias share a role. It is plain string parsing: it does not depend on
the installed gguf package (whose TensorNameMap grows with every release), so an `add` on another
machine cuts exactly as the split did. A change to this mapping must come with a new scheme number.

The order of a group's pieces (its files' positions, consecutive) puts what fine-tunes change most often
last: a later task that cannot load the last pieces of a group simply loads fewer files, while one that
cannot load a piece in the middle needs a hole there. LoRA fine-tunes most often target attn_q and
attn_v; then every linear layer; partial fine-tunes the top layers (higher blocks later)."""

from __future__ import annotations

from .records import CUT_SCHEME, Cut, TensorId

# where a role's pieces go in its group: higher ranks later, then by role name, then by block
ROLE_RANK = {
    "token_embd": 1, "output": 1,
    "blk.attn_k": 2, "blk.attn_output": 2,
    "blk.ffn_gate": 3, "blk.ffn_up": 3, "blk.ffn_down": 3,
    "blk.ffn_gate_exps": 3, "blk.ffn_up_exps": 3, "blk.ffn_down_exps": 3,
    "blk.attn_q": 4, "blk.attn_v": 4,
}  # everything else (norms, biases, rope factors, unknown roles): rank 0, first


def role_and_layer(name: str, scheme: int = CUT_SCHEME) -> tuple[str, int | None]:
    if scheme != CUT_SCHEME:
        raise ValueError(f"cut scheme {scheme} is not known to this version (it knows {CUT_SCHEME})")
    parts = name.split(".")
    layer = None
    for i in range(1, len(parts)):
        p = parts[i]
        if p.isascii() and p.isdigit():
            layer = int(p)
            parts = parts[:i] + parts[i + 1:]
            break
    if len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts), layer


Unit = tuple[str, int]  # (role, block): block -1 for tensors outside the layers


def unit_of(x: TensorId, cut: Cut) -> Unit:
    """The smallest piece a cut may give a file of its own: a tensor ("tensor"), or a role within a block of
    layers ("role"; one block for all layers when cut.layers is 0)."""
    if cut.kind == "tensor":
        return x.name, -1
    role, layer = role_and_layer(x.name, cut.scheme)
    if layer is None:
        return role, -1
    return role, layer // cut.layers if cut.layers else 0


def unit_order(u: Unit) -> tuple[int, str, int]:
    """Where a unit's piece goes within its group (see the module docstring)."""
    return ROLE_RANK.get(u[0], 0), u[0], u[1]
