"""The torch backend: what runs on CPU tensors (and on CUDA with backend "torch").

Each op is the fastest exact torch formulation measured so far; where nothing beats it
the reference itself runs. Registered under backend "torch" in ``normlab.ops``.
"""

from __future__ import annotations

import torch.nn.functional as F

from normlab.ops import reference, register_impl


@register_impl("layer_norm", "torch")
def layer_norm(x, normalized_shape, weight, bias, eps):
    # torch's native op is already one fused pass on every device
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


register_impl("rms_norm", "torch")(reference.rms_norm)
dropout_add = register_impl("dropout_add", "torch")(reference.dropout_add)
register_impl("add_layer_norm", "torch")(reference.add_layer_norm)
register_impl("add_rms_norm", "torch")(reference.add_rms_norm)
