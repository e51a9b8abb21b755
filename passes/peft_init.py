"""PEFT's layer selection (``layers_to_transform``/``layers_pattern``) and its
base-changing initialisations (PiSSA, OLoRA), for InsertLoRA.

``in_selected_layers``: PEFT's rule (``check_target_module_exists``): a module named by a
``target_modules`` list item as its suffix is adapted only if its layer index is in
``layers_to_transform``.  The index is the first numbered path segment (``model.layers.3.mlp``
-> 3) or, with ``layers_pattern``, the number right after one of those names.  A module
named exactly (its full path in the list) is adapted whatever its index; PEFT refuses the
options with a regex ``target_modules``, and so does InsertLoRA.

``residual_init``: A, B and the residual base weight of a base-changing init, computed in
float32 (or the weight's wider dtype) on the weight in (out, in) layout:

- ``"pissa"`` (Meng et al., arXiv 2404.02948): W = U Σ Vᵀ, B = U_r (Σ_r/s)^½,
  A = (Σ_r/s)^½ V_rᵀ; ``"pissa_niter_N"`` the same from ``torch.svd_lowrank(W, r, niter=N)``
  (seeded here, so compiles agree; PEFT's draws from torch's global generator);
- ``"olora"`` (Büyükakyüz, arXiv 2406.01775): W = Q R, B = Q[:, :r], A = R[:r].

The residual is W − s·B A, so W_res + s·B A = W at init.  A transformers Conv1D weight
(stored (in, out)) is factorised in (out, in) layout too, as PEFT's PiSSA does; PEFT's OLoRA
factorises the stored matrix as it is, which for such a layer gives A and B of the wrong shapes.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["RESIDUAL_INITS", "is_residual_init", "check_init", "check_layer_options", "in_selected_layers",
           "layer_index", "residual_init"]

RESIDUAL_INITS = ("pissa", "olora")  # and "pissa_niter_N"
_NITER = re.compile(r"pissa_niter_(\d+)")


def is_residual_init(init) -> bool:
    """Whether ``init`` replaces the frozen weight by a residual (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in RESIDUAL_INITS or _NITER.fullmatch(init) is not None)


def check_init(name: str, value, where: str = "", choices: Sequence[str] = ()) -> None:
    """``value`` is one of ``choices``, True (kaiming), False, "pissa", "pissa_niter_N" or "olora"."""
    if isinstance(value, bool) or value in choices or is_residual_init(value):
        return
    if isinstance(value, str) and value.startswith("pissa_niter_"):
        raise ValueError(f"{where}{name}={value!r}: the number of subspace iterations must be an int, e.g. "
                         f"{name}='pissa_niter_4'")
    raise ValueError(f"{where}unknown {name} {value!r}; choose one of {tuple(choices)}, False (A and B both "
                     "random), 'pissa', 'pissa_niter_N' or 'olora'")


def check_layer_options(layers_to_transform, layers_pattern, target_modules, where: str = "") -> None:
    """PEFT's checks: ints (or one int) and names (or one name); both only with a list of target_modules."""
    if layers_to_transform is not None:
        items = [layers_to_transform] if not isinstance(layers_to_transform, (list, tuple, set, frozenset)) \
            else list(layers_to_transform)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
            raise TypeError(f"{where}layers_to_transform must be a layer index or a list of them (ints >= 0), "
                            f"got {layers_to_transform!r}; pass e.g. layers_to_transform=[0, 1]")
    if layers_pattern is not None:
        items = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        if not isinstance(items, (list, tuple)) or any(not isinstance(p, str) for p in items):
            raise TypeError(f"{where}layers_pattern must be a name or a list of names, got {layers_pattern!r}; "
                            "pass e.g. layers_pattern='layers'")
        if layers_to_transform is None and items:
            raise ValueError(f"{where}layers_pattern={layers_pattern!r} needs layers_to_transform (the indices "
                             "it picks); pass e.g. layers_to_transform=[0, 1]")
    if (layers_to_transform is not None or layers_pattern) and isinstance(target_modules, str):
        raise ValueError(f"{where}layers_to_transform/layers_pattern need target_modules as a list of module "
                         f"names (as in PEFT), got the regex or keyword {target_modules!r}; pass e.g. "
                         "target_modules=['q_proj', 'v_proj']")


def layer_index(module: str, layers_pattern=None) -> Optional[int]:
    """The layer index PEFT reads from a module path: the first numbered segment after a
    named one, or the number after one of ``layers_pattern``'s names; None if there is none."""
    key = module  # PEFT matches "<name>.<idx>." inside the module's path
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def in_selected_layers(module: str, target_modules, layers_to_transform, layers_pattern=None) -> bool:
    """Whether PEFT's ``layers_to_transform`` keeps ``module`` (already matched by ``target_modules``)."""
    if layers_to_transform is None or isinstance(target_modules, str):
        return True
    if isinstance(layers_to_transform, (list, tuple, set, frozenset)) and not layers_to_transform:
        return True  # PEFT: an empty list means no layer selection
    if module in target_modules:
        return True  # named exactly: PEFT adapts it whatever its index
    index = layer_index(module, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def residual_init(weight: torch.Tensor, r: int, scale: float, init: str, *, transposed: bool = False,
                  seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r), W_res)`` for a PiSSA or OLoRA init of ``weight``, computed in
    float32 or wider (PEFT: float32); W_res in ``weight``'s dtype and stored layout, a new tensor."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"init={init!r} needs a floating-point weight, got {weight.dtype}")
    W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    W = W.t() if transposed else W  # (out, in)
    if init == "olora":
        Q, R = torch.linalg.qr(W)
        A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    else:
        m = _NITER.fullmatch(init)
        if m is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []):
                torch.manual_seed(seed)
                U, S, V = torch.svd_lowrank(W, q=r, niter=int(m.group(1)))
            Vh = V.t()
        root = torch.sqrt(S / scale)
        A, B = (root[:, None] * Vh).contiguous(), (U * root[None, :]).contiguous()
    residual = W - scale * (B @ A)
    residual = residual.t() if transposed else residual
    return A, B, residual.to(weight.dtype).contiguous()
