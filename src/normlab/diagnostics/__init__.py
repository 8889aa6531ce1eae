"""Diagnostics of training stability that work on any ``torch.nn.Module``.

    grad_norms(model, loss) / GradientMonitor      gradient norms per layer and sublayer kind
    ActivationMonitor(model, every=1)              residual stream and norm-input statistics
    AttentionLogitMonitor(model)                   the largest attention logit per layer
    per_example_grad_norms(model)                  LN/RMSNorm per-example gradient norms
    gradient_noise_scale(...) / NoiseScaleEMA      the simple gradient noise scale
    audit(model, example_input=None, ...)          normalization mistakes, as findings
"""

from normlab.diagnostics.activations import ActivationMonitor, ActivationRecord, tensor_stats
from normlab.diagnostics.attention import AttentionLogitMonitor
from normlab.diagnostics.audit import Finding, audit, findings_table, has_warmup
from normlab.diagnostics.gradients import (
    GradientMonitor,
    GradNormRecord,
    GradNorms,
    grad_norms,
    plot_grad_norms,
)
from normlab.diagnostics.noise_scale import (
    NoiseScale,
    NoiseScaleEMA,
    gradient_noise_scale,
    two_batch_estimates,
)
from normlab.diagnostics.per_example import PerExampleGradNorms, per_example_grad_norms
from normlab.diagnostics.structure import (
    SUBLAYER_KINDS,
    find_block_lists,
    find_blocks,
    iter_param_info,
    register_kind_rule,
)

__all__ = [
    "SUBLAYER_KINDS", "ActivationMonitor", "ActivationRecord", "AttentionLogitMonitor", "Finding", "GradNormRecord",
    "GradNorms", "GradientMonitor", "NoiseScale", "NoiseScaleEMA", "PerExampleGradNorms", "audit",
    "find_block_lists", "find_blocks", "findings_table", "grad_norms", "gradient_noise_scale",
    "has_warmup", "iter_param_info", "per_example_grad_norms", "plot_grad_norms",
    "register_kind_rule", "tensor_stats", "two_batch_estimates",
]
