"""Where each norm's output goes, and what writes the residual stream.

Two sources, first match wins:

1. the known-block and known-model table (``normlab.convert.blocks``), the only source
   for Hugging Face models;
2. a torch.fx trace of the model, for other models built from plain torch modules
   (norms, Linear, Embedding, Dropout, MultiheadAttention and known blocks are leaves).

Anything neither source establishes is reported as unknown: the transforms refuse
rather than guess.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from normlab.convert.blocks import BlockSpec, block_entry, block_spec, hf_families, model_spec
from normlab.convert.linear import LinearView, is_linear_like
from normlab.norms import is_norm

_CONTAINERS = (nn.TransformerEncoder, nn.TransformerDecoder)
_ADDS = (operator.add, operator.iadd, torch.add)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


@dataclass
class Analysis:
    """``consumers``: norm path -> the Linear views reading its output, or why unknown.
    ``writers``: modules writing the residual stream, or why it cannot be established.
    ``stream_norms``: the norms whose input is that residual stream.
    ``branch_norms``: norm path -> why it reads a branch rather than the stream (Sub-LN's
    inner norms): a LayerNorm there stays one under layernorm_to_rmsnorm."""

    consumers: dict[str, list[LinearView] | str] = field(default_factory=dict)
    writers: list[LinearView] | str = ""
    stream_norms: set[str] = field(default_factory=set)
    branch_norms: dict[str, str] = field(default_factory=dict)


def _view(model: nn.Module, path: str, rows: str = "all") -> LinearView:
    if path and "." not in path and isinstance(getattr(model, path, None), nn.Parameter):
        return LinearView(getattr(model, path), path)
    return LinearView(model.get_submodule(path), path, rows)


def _known_blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockSpec]]:
    out = []
    for path, m in model.named_modules():
        if block_entry(m)[1] is not None:
            out.append((path, m, block_spec(m)))
    return out


_POST_LN = "the model has Post-LN blocks: the residual stream is re-normalized, not a sum of writers"


def analyse(model: nn.Module) -> Analysis:
    a = Analysis()
    blocks = _known_blocks(model)
    block_writers: list[LinearView] = []
    stream_why: str | None = None  # why the stream is not a sum of Linear writers, first found
    for path, block, spec in blocks:
        if spec.unknown:
            for sub, m in block.named_modules():
                if sub and is_norm(m):
                    a.consumers[_join(path, sub)] = f"consumers unknown: {spec.unknown}"
            stream_why = stream_why or f"residual stream unknown: {path}: {spec.unknown}"
            continue
        for norm, cons in spec.pre_norms.items():
            a.consumers[_join(path, norm)] = [_view(model, _join(path, c.path), c.rows) for c in cons]
            a.stream_norms.add(_join(path, norm))
        for norm, cons in spec.inner_norms.items():
            a.consumers[_join(path, norm)] = cons if isinstance(cons, str) else [
                _view(model, _join(path, c.path), c.rows) for c in cons]
            a.branch_norms[_join(path, norm)] = "reads its sublayer's branch, not the residual stream"
        for norm in spec.post_norms:
            a.consumers[_join(path, norm)] = (
                "Post-LN: its output is the residual stream (it feeds the next block and the "
                "residual add), not only Linear layers")
            stream_why = stream_why or _POST_LN
        for norm, what in spec.writer_norms.items():
            a.consumers[_join(path, norm)] = (
                f"its output is written to the residual stream ({what}), not read only by Linear layers")
            stream_why = stream_why or (
                f"{_join(path, norm)} writes the residual stream ({what}): a norm's output is not "
                "zero-mean, so the stream cannot be centered")
        block_writers += [_view(model, _join(path, w)) for w in spec.writers if _has(model, _join(path, w))]
    mspec = model_spec(model)
    if mspec is not None:
        for norm, cons in mspec.final_norms.items():
            if cons is None:
                cons = "its output leaves the model (a model output); no consumer to fold into"
            a.consumers[norm] = cons if isinstance(cons, str) else [_view(model, c.path, c.rows) for c in cons]
            a.stream_norms.add(norm)
        if stream_why:
            a.writers = stream_why
        elif mspec.embeddings is None:
            a.writers = ("the residual stream starts at a model input, which cannot be made zero-mean; "
                         "convert a model that includes its embedding")
        elif isinstance(mspec.embeddings, str):
            a.writers = mspec.embeddings
        else:
            a.writers = [_view(model, e) for e in mspec.embeddings] + block_writers
        return a
    if _is_hugging_face(model):
        # a Hugging Face model's structure comes from the table, never from a trace
        why = (f"{type(model).__name__} is not in normlab's table of Hugging Face models "
               f"(normlab/convert/blocks.py; it has {', '.join(hf_families())})")
        for path, m in model.named_modules():
            if is_norm(m):
                a.consumers.setdefault(path, f"consumers unknown: {why}")
        a.writers = stream_why or f"residual stream unknown: {why}"
        return a
    _trace(model, a, blocks)
    if stream_why:
        a.writers = stream_why
    return a


def _is_hugging_face(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            is_norm(m) or is_linear_like(m)
            or isinstance(m, (nn.Embedding, nn.MultiheadAttention, nn.Dropout, *_CONTAINERS))
            or block_entry(m)[1] is not None or super().is_leaf_module(m, qualname)
        )


def _trace(model: nn.Module, a: Analysis, blocks) -> None:
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # any tracing failure means: structure unknown
        reason = f"consumers unknown: not a known block, and torch.fx cannot trace {type(model).__name__} ({type(err).__name__})"
        for path, m in model.named_modules():
            if is_norm(m):
                a.consumers.setdefault(path, reason)
        a.writers = f"residual stream unknown: torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err})"
        return
    mod = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    # consumers of norms that are graph nodes (not inside known blocks)
    for n in graph.nodes:
        if n.op != "call_module" or not is_norm(mod[n.target]) or n.target in a.consumers:
            continue
        a.consumers[n.target] = _fx_consumers(model, mod, calls, n)
    for n in graph.nodes:  # a torch encoder/decoder's final norm: its users are the container's
        m = mod.get(n.target) if n.op == "call_module" else None
        if isinstance(m, _CONTAINERS) and m.norm is not None:
            a.consumers[f"{n.target}.norm"] = _fx_consumers(model, mod, calls, n)
            a.stream_norms.add(f"{n.target}.norm")
    for path, m in model.named_modules():
        if is_norm(m):
            a.consumers.setdefault(path, "consumers unknown: not reached as a leaf in the torch.fx graph")
    a.writers = _fx_stream(model, mod, graph, a)


def _fx_consumers(model, mod, calls, node: fx.Node) -> list[LinearView] | str:
    norm_calls = set(calls[node.target])
    views = []
    for user in node.users:
        m = mod.get(user.target) if user.op == "call_module" else None
        if m is not None and is_linear_like(m) and user.args[0] is node:
            views.append(LinearView(m, user.target))
        elif isinstance(m, nn.MultiheadAttention) and node in user.args[:3] and not user.kwargs.keys() & {"query", "key", "value"}:
            q, k, v = user.args[:3]
            if q is node and k is node and v is node:
                views.append(LinearView(m, user.target, "all"))
            elif q is node and node not in (k, v):
                views.append(LinearView(m, user.target, "q"))
            elif q is not node and k is node and v is node:
                views.append(LinearView(m, user.target, "kv"))
            else:
                return f"its output feeds {user.target} as only part of its key/value inputs"
        else:
            return f"its output also feeds `{user.format_node()}`, which is not a Linear layer (a non-linear path or the residual stream)"
    for v in views:  # every call of a consumer must read this norm's output
        for call in calls[v.path]:
            inputs = call.args[:3] if v.rows != "all" or isinstance(v.module, nn.MultiheadAttention) else call.args[:1]
            if not any(isinstance(i, fx.Node) and i in norm_calls for i in inputs):
                return f"consumer {v.path} is also called on another input"
    return views


def _fx_stream(model, mod, graph: fx.Graph, a: Analysis) -> list[LinearView] | str:
    writers: dict[tuple[str, str], LinearView] = {}
    stream: set[fx.Node] = set()

    def walk(n) -> str | None:
        if not isinstance(n, fx.Node):
            return f"a constant ({n!r}) is added to the residual stream"
        if n in stream:
            return None
        stream.add(n)
        if (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in ("add", "add_")):
            return walk(n.args[0]) or walk(n.args[1])
        if n.op == "call_function" and n.target is operator.getitem and getattr(n.args[0], "op", "") == "get_attr":
            return walk(n.args[0])
        if n.op == "get_attr":
            writers[(n.target, "all")] = _view(model, n.target)
            return None
        if n.op == "call_module":
            m = mod[n.target]
            if isinstance(m, (nn.Dropout, nn.Identity)):
                return walk(n.args[0])
            if isinstance(m, _CONTAINERS) and m.norm is not None:
                return f"{n.target} ends with a norm: its output is not the residual stream"
            if is_linear_like(m) or isinstance(m, nn.Embedding):
                writers[(n.target, "all")] = LinearView(m, n.target)
                return None
            inner = _block_writers(model, n.target, m)
            if isinstance(inner, str):
                return inner
            for v in inner:
                writers[(v.path, v.rows)] = v
            return walk(n.args[0])
        if n.op == "placeholder":
            return (f"the residual stream starts at the model input `{n.target}`, which cannot be made "
                    "zero-mean; convert a model that includes its embedding")
        return f"the residual stream passes through `{n.format_node()}`"

    roots = []
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        m = mod[n.target]
        if is_norm(m):
            roots.append(n)
            a.stream_norms.add(n.target)
        elif isinstance(m, _CONTAINERS) or block_entry(m)[1] is not None:
            roots.append(n)
    for n in roots:
        if not is_norm(mod[n.target]):
            inner = _block_writers(model, n.target, mod[n.target])
            if isinstance(inner, str):
                return inner
            for v in inner:
                writers[(v.path, v.rows)] = v
        why = walk(n.args[0])
        if why:
            return why
    out = next(n for n in graph.nodes if n.op == "output")
    for leaf in _flat_nodes(out.args):
        if leaf in stream:
            return "the residual stream is itself a model output (no final norm): centering would change it"
    for n in stream:
        for user in n.users:
            ok = user in stream or (user.op == "call_module" and user in roots and user.args[0] is n)
            if not ok:
                return f"the residual stream also feeds `{user.format_node()}`"
    return list(writers.values())


def _flat_nodes(args) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n) or n)
    return out


def _block_writers(model, path: str, m: nn.Module) -> list[LinearView] | str:
    """Writers inside a Pre-LN known block or a torch encoder/decoder of them."""
    if isinstance(m, _CONTAINERS):
        views = []
        for i, layer in enumerate(m.layers):
            inner = _block_writers(model, f"{path}.layers.{i}", layer)
            if isinstance(inner, str):
                return inner
            views += inner
        return views
    spec = block_spec(m)
    if spec is None:
        return f"the residual stream passes through {path} ({type(m).__name__}), whose structure is unknown"
    if spec.unknown:
        return f"residual stream unknown: {path}: {spec.unknown}"
    if spec.post_norms:
        return f"{path} is a Post-LN block: its norm output is the residual stream"
    for norm, what in spec.writer_norms.items():
        return (f"{path}.{norm} writes the residual stream ({what}): a norm's output is not "
                "zero-mean, so the stream cannot be centered")
    return [LinearView(model.get_submodule(f"{path}.{w}"), f"{path}.{w}") for w in spec.writers if _has(model, f"{path}.{w}")]
