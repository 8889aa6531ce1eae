"""Adopt normlab in an existing model without rewriting it.

    swap_norms(model)            norm layers -> normlab's (fused add+norm in known blocks)
    fold_norm_affine(model)      fold each norm's gamma/beta into the Linear layers reading it
    layernorm_to_rmsnorm(model)  exact Pre-LN -> Pre-RMSNorm (Jiang et al. 2023)

Each changes the model in place and returns it, with a ``ConversionReport`` as
``model.normlab_report``; where a transform cannot be exact it leaves the module
(reason in the report) or raises ``ConversionError`` with the model unchanged. Model
structure (which norm reads the residual stream, which Linear layers read each norm,
what writes the stream) comes from one table, ``normlab.convert.blocks``: normlab's
placements, torch's encoder/decoder layers and the Hugging Face families.
"""

from normlab.convert.blocks import BlockSpec, Consumer, ModelSpec, register_block, register_model
from normlab.convert.fold import fold_norm_affine
from normlab.convert.fused import fuse, unfuse
from normlab.convert.report import ConversionError, ConversionReport, Entry
from normlab.convert.rms import RMSNormWithBias, layernorm_to_rmsnorm
from normlab.convert.swap import swap_norms

__all__ = [
    "BlockSpec", "Consumer", "ConversionError", "ConversionReport", "Entry", "ModelSpec",
    "RMSNormWithBias", "fold_norm_affine", "fuse", "layernorm_to_rmsnorm", "register_block",
    "register_model", "swap_norms", "unfuse",
]
