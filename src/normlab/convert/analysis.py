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
from normlab.convert.swap import parametrization_modules
from normlab.norms import is_norm

_CONTAINERS = (nn.TransformerEncoder, nn.TransformerDecoder)
_ADDS = (operator.add, operator.iadd, torch.add)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


@dataclass
class Analysis:
    """``consumers``: norm path -> the Linear views reading its output, or why unknown.
    ``fx_uses``: id(norm module) -> the Linear views reading the outputs of all its calls in
    the torch.fx graph (a module called twice, or also called by a parent of the known
    block holding it), or why unknown; ``consumers_of`` merges the two.
    ``writers``: modules writing the residual stream, or why it cannot be established.
    ``stream_norms``: the norms whose input is that residual stream.
    ``branch_norms``: norm path -> why it reads a branch rather than the stream (Sub-LN's
    inner norms): a LayerNorm there stays one under layernorm_to_rmsnorm."""

    consumers: dict[str, list[LinearView] | str] = field(default_factory=dict)
    fx_uses: dict[int, list[LinearView] | str] = field(default_factory=dict)
    writers: list[LinearView] | str = ""
    stream_norms: set[str] = field(default_factory=set)
    branch_norms: dict[str, str] = field(default_factory=dict)
    # final norm path -> the output returned on request that folding it changes (ModelSpec.final_outputs)
    final_outputs: dict[str, str] = field(default_factory=dict)
    # id() of the modules computing a parametrized tensor (weight norm's ``_WeightNorm``):
    # not layers of the model, even where the class name ends in "Norm"
    parametrizations: set[int] = field(default_factory=set, repr=False)

    def is_norm(self, m: nn.Module) -> bool:
        return id(m) not in self.parametrizations and is_norm(m)

    def consumers_of(self, module: nn.Module, paths: list[str]) -> tuple[list[LinearView], set[str]] | str:
        """Every Linear view reading ``module``'s output, over each path it sits at and each
        call of it (one view a consumer module), with every path those views were found
        at; or why its output is not read only by Linear layers at one of them. A norm used
        at several places folds into all their consumers at once (exact: each use feeds
        only Linear layers reading only this norm); one use that cannot fold leaves it."""
        uses: list[list[LinearView] | str] = []
        for result in [self.consumers.get(p, "consumers unknown") for p in paths] + [self.fx_uses.get(id(module))]:
            if result is not None and not any(result is u for u in uses):
                uses.append(result)
        shared = len(paths) > 1 or len(uses) > 1
        where = f"shared norm (used at {', '.join(paths)}): " if shared else ""
        views: dict[int, LinearView] = {}
        positions: set[str] = set()
        for use in uses:
            if isinstance(use, str):
                return where + use
            for v in use:
                seen = views.setdefault(id(v.module), v)
                positions.add(v.path)
                if seen.rows != v.rows:
                    return (f"{where}consumer {v.path} reads its output as rows {seen.rows!r} at one use "
                            f"and {v.rows!r} at another")
        return list(views.values()), positions


def _view(model: nn.Module, path: str, rows: str = "all") -> LinearView:
    if path and "." not in path and isinstance(getattr(model, path, None), nn.Parameter):
        return LinearView(getattr(model, path), path)
    return LinearView(model.get_submodule(path), path, rows)


def _known_blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockSpec]]:
    """Every path of every known block (a block reachable by two paths runs at both)."""
    out = []
    for path, m in model.named_modules(remove_duplicate=False):
        if block_entry(m)[1] is not None:
            out.append((path, m, block_spec(m)))
    return out


_POST_LN = "the model has Post-LN blocks: the residual stream is re-normalized, not a sum of writers"


def analyse(model: nn.Module) -> Analysis:
    a = Analysis(parametrizations=parametrization_modules(model))
    blocks = _known_blocks(model)
    block_writers: list[LinearView] = []
    stream_why: str | None = None  # why the stream is not a sum of Linear writers, first found
    for path, block, spec in blocks:
        if spec.unknown:
            for sub, m in block.named_modules(remove_duplicate=False):
                if sub and a.is_norm(m):
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
        a.final_outputs.update(mspec.final_outputs)
        for norm, cons in mspec.final_norms.items():
            if cons is None:
                cons = "its output leaves the model (a model output); no consumer to fold into"
            a.consumers[norm] = cons if isinstance(cons, str) else [_view(model, c.path, c.rows) for c in cons]
            a.stream_norms.add(norm)
        if stream_why:
            a.writers = stream_why
        elif not mspec.final_norms and a.stream_norms:
            # Pre-LN blocks without a final norm (OPT with _remove_final_layer_norm): the
            # stream itself reaches the head or the model's output
            a.writers = ("the residual stream is itself a model output (no final norm reads it: it feeds "
                         "the head or leaves the model directly): centering would change it")
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
        for path, m in model.named_modules(remove_duplicate=False):
            if a.is_norm(m):
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
    def __init__(self, analysis: Analysis) -> None:
        super().__init__()
        self.analysis = analysis

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            self.analysis.is_norm(m) or is_linear_like(m)
            or isinstance(m, (nn.Embedding, nn.MultiheadAttention, nn.Dropout, *_CONTAINERS))
            or block_entry(m)[1] is not None or super().is_leaf_module(m, qualname)
        )


def _trace(model: nn.Module, a: Analysis, blocks) -> None:
    try:
        graph = _Tracer(a).trace(model)
    except Exception as err:  # any tracing failure means: structure unknown
        reason = f"consumers unknown: not a known block, and torch.fx cannot trace {type(model).__name__} ({type(err).__name__})"
        for path, m in model.named_modules(remove_duplicate=False):
            if a.is_norm(m):
                a.consumers.setdefault(path, reason)
        a.writers = f"residual stream unknown: torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err})"
        return
    mod = dict(model.named_modules())
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    table = set(a.consumers)  # the paths inside known blocks, which the table describes
    calls: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    reads = _direct_reads(model, graph)
    # the norms called in the graph (fx names a module by its first path): their consumers
    # over all their calls, for every path of theirs outside the known blocks
    for target, nodes in calls.items():
        m = mod[target]
        if a.is_norm(m):
            a.fx_uses[id(m)] = _fx_consumers(model, mod, calls, nodes)
            for p in paths[id(m)]:
                if p not in table:
                    a.consumers[p] = a.fx_uses[id(m)]
    for target in calls:  # a norm whose own weight or bias the forward also reads directly (x * ln.weight)
        m = mod[target]
        own = [n for p in m.parameters(recurse=False) for n in reads.get(id(p), ())] if a.is_norm(m) else []
        if own:
            by = ", ".join(f"`{_callee(u)}`" for u in own[0].users) or "the forward"
            why = (f"the norm's own parameter `{own[0].target}` is also read directly by {by}, outside its "
                   "call: folding would change that use too")
            a.fx_uses[id(m)] = why
            for p in paths[id(m)]:
                a.consumers[p] = why
    for target, nodes in calls.items():  # a torch encoder/decoder's final norm: its users are the container's
        m = mod[target]
        if isinstance(m, _CONTAINERS) and m.norm is not None:
            a.consumers[f"{target}.norm"] = _fx_consumers(model, mod, calls, nodes)
            a.stream_norms.add(f"{target}.norm")
    for path, m in model.named_modules(remove_duplicate=False):
        if a.is_norm(m):
            a.consumers.setdefault(path, "consumers unknown: not reached as a leaf in the torch.fx graph")
    # a consumer whose parameter the forward also reads directly (F.linear(h, self.head.weight))
    checked: dict[int, list[LinearView] | str] = {}
    for table_ in (a.consumers, a.fx_uses):
        for key, use in table_.items():
            if id(use) not in checked:
                checked[id(use)] = _read_elsewhere(use, reads, "folding")
            table_[key] = checked[id(use)]
    a.writers = _fx_stream(model, mod, graph, a, calls, reads, paths)


def _direct_reads(model: nn.Module, graph: fx.Graph) -> dict[int, list[fx.Node]]:
    """id(tensor) -> the get_attr nodes reading it: parameters and buffers the forward uses
    outside their module's call."""
    reads: dict[int, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op != "get_attr":
            continue
        t = model
        try:
            for part in n.target.split("."):
                t = getattr(t, part)
        except AttributeError:
            continue
        if isinstance(t, torch.Tensor):
            reads.setdefault(id(t), []).append(n)
    return reads


def _read_elsewhere(use, reads: dict[int, list[fx.Node]], action: str, allowed=frozenset()) -> list[LinearView] | str:
    """``use`` (views), or why not: a parameter of one of them is read directly by the
    forward (a get_attr node not in ``allowed``), so changing it changes that read too."""
    if isinstance(use, str):
        return use
    for v in use:
        for p in v.parameters():
            for n in reads.get(id(p), ()):
                if n in allowed:
                    continue
                by = ", ".join(f"`{_callee(u)}`" for u in n.users) or "the forward"
                role = "consumer" if action == "folding" else "writer of the residual stream"
                return (f"{role} {v.path}'s parameter `{n.target}` is also read directly by {by}, outside "
                        f"{v.path}'s call: {action} would change that use too")
    return use


def _keyword_inputs(n: fx.Node, count: int = 1) -> str | None:
    """Why ``n``'s first ``count`` inputs cannot be followed: a call passing them by
    keyword (``fc(input=h)``, ``torch.add(x, other=y)``), which the analysis reads by
    position only; None when they are positional."""
    if len(n.args) >= count:
        return None
    return f"`{n.format_node()}` takes its input as a keyword argument, which the analysis does not follow"


def _callee(n: fx.Node) -> str:
    """A node as ``name(...)``: what it calls, in one short phrase."""
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{target}(...)" if n.op.startswith("call") else str(target)


def _fx_consumers(model, mod, calls, nodes: list[fx.Node]) -> list[LinearView] | str:
    """The Linear views reading the outputs of ``nodes`` (every call of one norm), or why
    not only Linear layers read them."""
    norm_calls = set(nodes)
    views: dict[tuple[str, str], LinearView] = {}
    rows_of: dict[str, str] = {}

    def add(view: LinearView) -> str | None:
        if rows_of.setdefault(view.path, view.rows) != view.rows:
            return f"consumer {view.path} reads its output as rows {rows_of[view.path]!r} at one call and {view.rows!r} at another"
        views[(view.path, view.rows)] = view
        return None

    for node in nodes:
        for user in node.users:
            m = mod.get(user.target) if user.op == "call_module" else None
            why = None
            if m is not None and is_linear_like(m) and (kw := _keyword_inputs(user)):
                return kw
            if m is not None and is_linear_like(m) and user.args[0] is node:
                why = add(LinearView(m, user.target))
            elif isinstance(m, nn.MultiheadAttention) and node in user.args[:3] and not user.kwargs.keys() & {"query", "key", "value"}:
                q, k, v = (i in norm_calls for i in user.args[:3])
                if q and k and v:
                    why = add(LinearView(m, user.target, "all"))
                elif q and not k and not v:
                    why = add(LinearView(m, user.target, "q"))
                elif not q and k and v:
                    why = add(LinearView(m, user.target, "kv"))
                else:
                    return f"its output feeds {user.target} as only part of its key/value inputs"
            else:
                return f"its output also feeds `{user.format_node()}`, which is not a Linear layer (a non-linear path or the residual stream)"
            if why:
                return why
    for v in views.values():  # every call of a consumer must read this norm's output
        for call in calls[v.path]:
            if kw := _keyword_inputs(call):
                return kw
            inputs = call.args[:3] if v.rows != "all" or isinstance(v.module, nn.MultiheadAttention) else call.args[:1]
            if not any(isinstance(i, fx.Node) and i in norm_calls for i in inputs):
                return f"consumer {v.path} is also called on another input"
    return list(views.values())


def _fx_stream(model, mod, graph: fx.Graph, a: Analysis, calls, reads, paths) -> list[LinearView] | str:
    writers: dict[tuple[str, str], LinearView] = {}
    stream: set[fx.Node] = set()

    def walk(n) -> str | None:
        if not isinstance(n, fx.Node):
            return f"a constant ({n!r}) is added to the residual stream"
        if n in stream:
            return None
        stream.add(n)
        if (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in ("add", "add_")):
            return _keyword_inputs(n, 2) or walk(n.args[0]) or walk(n.args[1])
        if n.op == "call_function" and n.target is operator.getitem and n.args and getattr(n.args[0], "op", "") == "get_attr":
            return walk(n.args[0])
        if n.op == "get_attr":
            try:  # a parameter table (a learned position table, on any module): centred as a writer
                param = model.get_parameter(n.target)
            except AttributeError:
                return (f"{n.target} (a buffer, not a parameter: a fixed table) is added to the residual "
                        f"stream; centring the stream would have to change it")
            writers[(n.target, "all")] = LinearView(param, n.target)
            return None
        if n.op == "call_module":
            m = mod[n.target]
            if isinstance(m, (nn.Dropout, nn.Identity)):
                return _keyword_inputs(n) or walk(n.args[0])
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
            return _keyword_inputs(n) or walk(n.args[0])
        if n.op == "placeholder":
            return (f"the residual stream starts at the model input `{n.target}`, which cannot be made "
                    "zero-mean; convert a model that includes its embedding")
        return f"the residual stream passes through `{n.format_node()}`"

    roots = []
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        m = mod[n.target]
        if a.is_norm(m):
            roots.append(n)
            a.stream_norms.update(paths[id(m)])
        elif isinstance(m, _CONTAINERS) or block_entry(m)[1] is not None:
            roots.append(n)
    for n in roots:
        if not a.is_norm(mod[n.target]):
            inner = _block_writers(model, n.target, mod[n.target])
            if isinstance(inner, str):
                return inner
            for v in inner:
                writers[(v.path, v.rows)] = v
        why = _keyword_inputs(n) or walk(n.args[0])
        if why:
            return why
    out = next(n for n in graph.nodes if n.op == "output")
    for leaf in _flat_nodes(out.args):
        if leaf in stream:
            return "the residual stream is itself a model output (no final norm): centering would change it"
    for n in stream:
        for user in n.users:
            ok = user in stream or (user.op == "call_module" and user in roots and user.args[:1] == (n,))
            if not ok:
                return f"the residual stream also feeds `{user.format_node()}`"
    for v in writers.values():  # a writer used elsewhere: centering it would change that use
        for call in calls.get(v.path, ()):
            if call not in stream:
                return (f"writer of the residual stream {v.path} is also called outside it "
                        f"(`{call.format_node()}`): centering would change that use too")
        why = _read_elsewhere([v], reads, "centering", allowed=stream)
        if isinstance(why, str):
            return why
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
