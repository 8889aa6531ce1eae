"""``audit(model)``: structural checks for the normalization mistakes that break training.

Each check is a function ``(context) -> list[Finding]`` in :data:`CHECKS`. The context
holds the model and, when an example input is given (or one can be made up), a *trace*
of one forward: which tensor every norm and every block consumed and produced. That
data flow is what tells "two norms back to back" apart from "a norm, then a residual
add, then a norm", and a Pre-LN block (its norms read the block's input, its output is
an add) from a Post-LN one (its output is a norm's output).

The forward runs in eval mode with every parameter requiring grad (both restored
afterwards): dropout then returns its input, so the findings do not depend on the mode
the model was left in, and the autograd graph of the forward says which ops read each
norm's output, for a frozen model too.

Findings (kind: severity)
    double-norm          warning  a norm whose one input is another norm's output, which
                                  nothing else reads (not a norm(x, residual), which
                                  normalizes a sum, nor a norm output changed in place
                                  before the next norm reads it, nor one that is also the
                                  residual stream a block adds to), both norms with
                                  per-example statistics or both with batch statistics
    pre-ln-no-final-norm warning  a Pre-LN stack whose output reaches no norm (directly, or
                                  pooled, sliced or reshaped first)
    eps-underflow        error    eps rounds to 0 in the norm's parameter dtype
    batchnorm-padding    warning  torch BatchNorm in a sequence model (padding in the stats)
    dead-norm            error    a norm's weight is all zero (or not finite); a warning
                                  where the all-zero norm's output is added to another
                                  tensor (a zero-initialized residual branch)
    norm-far-from-init   warning  ||w - w_init|| > 10 ||w_init||
    deep-post-ln-no-warmup warning  Post-LN with more than 12 layers and no lr warm-up
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from normlab.convert.blocks import block_spec
from normlab.convert.verify import hf_feature_inputs
from normlab.diagnostics.structure import check_model, find_block_lists, is_norm
from normlab.errors import NormArgumentError

SEVERITIES = ("error", "warning", "info")
POST_LN_MAX_SAFE_DEPTH = 12
FAR_FROM_INIT = 10.0


@dataclass
class Finding:
    severity: str      # "error" | "warning" | "info"
    kind: str          # e.g. "double-norm"
    module: str        # module path in model.named_modules() ("" = the model)
    message: str
    suggestion: str

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ trace


@dataclass
class _NormCall:
    path: str
    input_id: int | None         # the one tensor it normalizes; None when it reads several
    consumed: set[int]           # every tensor argument
    output_id: int | None = None
    # the tensors' versions (Tensor._version) when read: an in-place op in between
    # (h = norm1(x); h += fc(x); norm2(h)) makes the same tensor hold something else
    input_version: int | None = None
    output_version: int | None = None
    # the autograd node that made the tensor, and which of its outputs it is, when read
    # (None outside autograd); an in-place op later gives the tensor another node
    input_node: _Node | None = None
    output_node: _Node | None = None
    input_dtype: torch.dtype | None = None
    input_last: int | None = None   # the size of the last dim read and written
    output_last: int | None = None


@dataclass
class _BlockCall:
    stack: str
    index: int
    path: str
    input_id: int | None
    output_id: int | None = None
    output_node: _Node | None = None


_Node = tuple[object, int]  # (torch.autograd.graph.Node, output_nr)
_GRAPH_LIMIT = 100_000  # nodes walked at most, for one question about the graph


def _node(t: Tensor) -> _Node | None:
    return None if t.grad_fn is None else (t.grad_fn, t.output_nr)


@dataclass
class Trace:
    norm_calls: list[_NormCall] = field(default_factory=list)
    block_calls: list[_BlockCall] = field(default_factory=list)
    keep: list[Tensor] = field(default_factory=list)  # holds tensors so ids stay unique
    # autograd node -> [(a node that reads one of its outputs, which output)], over the
    # graph of the forward's outputs and every recorded tensor
    readers: dict[object, list[_Node]] = field(default_factory=dict)
    # the walk of the graph stopped at _GRAPH_LIMIT nodes: readers it did not reach are
    # unknown, so no finding rests on "nothing else reads it"
    truncated: bool = False

    def readers_of(self, node: _Node) -> list[object]:
        """The autograd nodes that read the tensor ``node`` made (their ops, in the forward)."""
        return [r for r, nr in self.readers.get(node[0], ()) if nr == node[1]]

    def read_besides(self, first: _NormCall, second: _NormCall) -> bool:
        """Whether anything besides the norm call ``second`` reads ``first``'s output:
        another norm call (normlab's norm(x, residual), which adds it to a branch), or an op
        outside ``second`` (the residual add of the Pre-LN block whose input norm is
        ``second``, as after an embedding norm). Without autograd nodes, only the former."""
        if any(first.output_id in c.consumed for c in self.norm_calls if c is not second and c is not first):
            return True
        if first.output_node is None or second.output_node is None:
            return False
        if self.truncated:
            return True
        inside = _upstream(second.output_node[0], stop=first.output_node[0])
        return any(r not in inside for r in self.readers_of(first.output_node))

    def only_summed(self, call: _NormCall) -> bool:
        """Whether everything that reads ``call``'s output adds it to another tensor (``x +
        out``, ``out += x``, normlab's norm(out, residual)): a residual branch's last norm. A
        Post-LN norm's output is the residual stream, which the next sublayer reads too:
        not only summed."""
        if call.output_node is None or self.truncated:
            return False
        readers = self.readers_of(call.output_node)
        fused = {c.output_node[0] for c in self.norm_calls
                 if c.input_id is None and call.output_id in c.consumed and c.output_node is not None}
        return bool(readers) and all(type(r).__name__ == "AddBackward0" or r in fused for r in readers)


def _graph_readers(roots) -> tuple[dict[object, list[_Node]], bool]:
    """node -> [(a node that reads one of its outputs, which output)] over the graph above
    ``roots``, and whether the walk stopped at ``_GRAPH_LIMIT`` nodes before its end."""
    readers: dict[object, list[_Node]] = {}
    seen: set[int] = set()
    todo = [r for r in roots if r is not None]
    while todo and len(seen) < _GRAPH_LIMIT:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, nr in node.next_functions:
            if nxt is not None:
                readers.setdefault(nxt, []).append((node, nr))
                todo.append(nxt)
    return readers, bool(todo)


def _upstream(node, stop) -> set:
    """The autograd nodes from ``node`` up (itself included), not past ``stop``: the ops
    that made ``node``'s tensor out of ``stop``'s (a norm's own ops, read from its output)."""
    seen, todo = set(), [node]
    while todo and len(seen) < _GRAPH_LIMIT:
        n = todo.pop()
        if n is stop or n in seen:
            continue
        seen.add(n)
        todo.extend(nxt for nxt, _ in n.next_functions if nxt is not None)
    return seen


def _derives(node: _Node | None, source: _Node | None, max_steps: int = 16) -> bool:
    """Whether the tensor of ``node`` is made from ``source``'s by a chain of ops that each
    read one tensor of the graph (pooling, slicing, reshaping, a mask or a constant scale:
    ``norm(x[:, 1:].mean(1))``); an op that mixes in another (a Linear's weight, an
    attention) ends the chain."""
    for _ in range(max_steps):
        if node is None or source is None:
            return False
        if node[0] is source[0] and node[1] == source[1]:
            return True
        inputs = [n for n in node[0].next_functions if n[0] is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def _tensor_args(args, kwargs) -> list[Tensor]:
    out = [a for a in args if isinstance(a, Tensor)]
    out += [v for v in kwargs.values() if isinstance(v, Tensor)]
    return out


def _normalized_input(ts: list[Tensor]) -> Tensor | None:
    """The one tensor a norm call normalizes, or None when the call reads several
    floating-point tensors: normlab's ``norm(x, residual)`` normalizes ``residual + x``, a
    sum, so it is no norm's output even where ``x`` is (Sandwich/Peri-LN's ``out`` norm
    feeding the next ``in`` norm). Masks (bool, integer) do not count."""
    data = [t for t in ts if t.is_floating_point() or t.is_complex()] or ts
    return data[0] if len(data) == 1 else None


def _first_tensor(obj) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], Tensor):
        return obj[0]
    return None


def _requiring_grad(example_input):
    """``example_input`` with each floating-point tensor (the input itself, or one of its
    arguments) a copy that requires grad: the graph then records every op that reads a
    norm of the input, an affine-free one too (whose output otherwise has no autograd
    node to ask who reads it). Token ids stay as they are."""
    def one(t):
        if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and not t.requires_grad:
            return t.detach().requires_grad_()
        return t

    return _each_input(example_input, one)


def _each_input(example_input, one):
    """``example_input`` (a tensor, a tuple or list of positional arguments, a mapping of
    keyword arguments) with ``one`` applied to the tensor or to each argument (a
    namedtuple, its own constructor, is left as it is)."""
    if isinstance(example_input, Mapping):
        return {k: one(v) for k, v in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return type(example_input)(one(t) for t in example_input) if type(example_input) in (tuple, list) \
            else example_input
    return one(example_input)


def _outside_inference(example_input):
    """``example_input`` with each inference tensor (made under torch.inference_mode) a
    normal copy, which a forward outside inference mode can record."""
    def one(t):
        if isinstance(t, Tensor) and t.is_inference():
            with torch.inference_mode(False):
                return t.clone()
        return t

    return _each_input(example_input, one)


# autograd nodes of ops that select or reshape whole rows, leaving each row's values as
# they were (a slice, an index, a view, a copy, a cast): a norm reading their output reads
# normalized rows when their input is a norm's output (a last-token head's n(h[:, -1]))
_ROW_VIEWS = frozenset({
    "SliceBackward0", "SelectBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
    "IndexBackward0", "CloneBackward0", "ToCopyBackward0", "ExpandBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0", "AliasBackward0",
})


def _row_view_of(call: _NormCall, trace: Trace, max_steps: int = 8) -> _NormCall | None:
    """The norm call whose output ``call`` reads through ops that only select or reshape
    its rows (same last dim), where nothing outside ``call`` reads those ops' outputs
    (a view of a norm's output that a residual add reads too is the stream), or None."""
    node = call.input_node
    if node is None or call.input_last is None or call.output_node is None or trace.truncated:
        return None
    outputs = {(id(c.output_node[0]), c.output_node[1]): c for c in trace.norm_calls
               if c.output_node is not None and c is not call}
    chain = []
    for _ in range(max_steps):
        if type(node[0]).__name__ not in _ROW_VIEWS:
            return None
        chain.append(node)
        inputs = [n for n in node[0].next_functions if n[0] is not None]
        if len(inputs) != 1:
            return None
        node = inputs[0]
        prev = outputs.get((id(node[0]), node[1]))
        if prev is not None:
            if prev.output_last != call.input_last:
                return None
            inside = _upstream(call.output_node[0], stop=prev.output_node[0])
            if any(r not in inside for n in chain for r in trace.readers_of(n)):
                return None
            return prev
    return None


def _call(model: nn.Module, example_input):
    if isinstance(example_input, Mapping):  # (a tokenizer's BatchEncoding is a UserDict)
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def trace_forward(model: nn.Module, example_input) -> Trace:
    """Run one forward of ``model`` on ``example_input`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments) and record the norms' and blocks' data flow.
    The forward runs in eval mode with every parameter requiring grad; the modules' modes,
    the parameters' requires_grad and every buffer (BatchNorm running statistics,
    non-persistent ones ...) are restored afterwards, and the forward runs on a fork of
    the global RNG (CPU and the CUDA devices in use), which it leaves as it was."""
    trace = Trace()
    handles = []
    lists = find_block_lists(model)

    def norm_pre(path):
        def hook(module, args, kwargs):
            ts = _tensor_args(args, kwargs)
            if not ts:
                return
            trace.keep.extend(ts)
            x = _normalized_input(ts)
            trace.norm_calls.append(_NormCall(path, None if x is None else id(x), {id(t) for t in ts},
                                              input_version=None if x is None else x._version,
                                              input_node=None if x is None else _node(x),
                                              input_dtype=None if x is None else x.dtype,
                                              input_last=x.shape[-1] if x is not None and x.dim() else None))
        return hook

    def norm_post(path):
        def hook(module, args, kwargs, output):
            out = _first_tensor(output)
            if out is not None and trace.norm_calls:
                trace.keep.append(out)
                for c in reversed(trace.norm_calls):
                    if c.path == path and c.output_id is None:
                        c.output_id, c.output_version, c.output_node = id(out), out._version, _node(out)
                        c.output_last = out.shape[-1] if out.dim() else None
                        break
        return hook

    def block_pre(stack, i, path):
        def hook(module, args, kwargs):
            ts = _tensor_args(args, kwargs)
            x = ts[0] if ts else None
            if x is not None:
                trace.keep.append(x)
            trace.block_calls.append(_BlockCall(stack, i, path, None if x is None else id(x)))
        return hook

    def block_post(path):
        def hook(module, args, kwargs, output):
            out = _first_tensor(output)
            if out is None and hasattr(output, "last_hidden_state"):
                out = output.last_hidden_state
            if out is not None:
                trace.keep.append(out)
                for c in reversed(trace.block_calls):
                    if c.path == path and c.output_id is None:
                        c.output_id, c.output_node = id(out), _node(out)
                        break
        return hook

    for path, mod in model.named_modules():
        if is_norm(mod):
            handles.append(mod.register_forward_pre_hook(norm_pre(path), with_kwargs=True))
            handles.append(mod.register_forward_hook(norm_post(path), with_kwargs=True))
    for stack, container in lists:
        for i, block in enumerate(container.children()):
            path = f"{stack}.{i}" if stack else str(i)
            handles.append(block.register_forward_pre_hook(block_pre(stack, i, path), with_kwargs=True))
            handles.append(block.register_forward_hook(block_post(path), with_kwargs=True))
    # every buffer, persistent or not: (module, name, the tensor, its values)
    buffers = [(mod, name, b, b.detach().clone()) for mod in model.modules()
               for name, b in mod.named_buffers(recurse=False)]
    # the data flow, not the training noise: in eval mode dropout returns its input, so what
    # a norm reads is the same whatever mode the model was left in (set on each module, as
    # restored: a train() override is not run). Every parameter requiring grad makes the
    # autograd graph record which ops read each norm's output, for a frozen model too
    modes = [(mod, mod.training) for mod in model.modules()]
    thawed: list[Tensor] = []
    frozen: list[tuple[Tensor, int, Tensor]] = []  # (parameter, its version, its values)

    def restore() -> None:
        """The modules' modes, the parameters' requires_grad and every buffer, as they were."""
        for mod, training in modes:
            mod.training = training
        for p in thawed:
            p.requires_grad_(False)
        thawed.clear()
        with torch.no_grad():
            for mod, name, b, value in buffers:
                setattr(mod, name, b)  # a forward that replaced the tensor gets it back
                b.copy_(value)
            for p, version, value in frozen:
                if p._version != version:
                    p.copy_(value)
        frozen.clear()

    try:
        for mod, _ in modes:
            mod.training = False
        for p in model.parameters():
            if not p.requires_grad and (p.is_floating_point() or p.is_complex()):
                try:
                    p.requires_grad_(True)
                except RuntimeError:  # an inference-mode tensor: left frozen
                    continue
                thawed.append(p)
        # grad mode keeps torch's encoder off its fused fast path; the forked RNG leaves
        # the global one as it was
        # (under torch.inference_mode the forward would record no versions and no graph: the
        # trace runs outside it, on a normal copy of an inference tensor given)
        example_input = _outside_inference(example_input)
        with torch.random.fork_rng(devices=_cuda_devices(model, example_input)), torch.enable_grad(), \
                torch.inference_mode(False):
            try:
                result = _call(model, _requiring_grad(example_input))
            except Exception as err:
                # a forward that refuses eval mode, or updates a frozen parameter in place
                # (refused once it requires grad): once more as the model was left; for the
                # latter, the frozen parameters' values are kept to be put back (copied only then)
                restore()
                trace.norm_calls.clear()
                trace.block_calls.clear()
                trace.keep.clear()
                if "leaf Variable that requires grad" in str(err):
                    frozen.extend((p, p._version, p.detach().clone()) for p in model.parameters()
                                  if not p.requires_grad and not p.is_inference())
                result = _call(model, example_input)
        roots = [t.grad_fn for t in _tensors_in(result)]
        roots += [c.output_node[0] for c in (*trace.norm_calls, *trace.block_calls) if c.output_node is not None]
        trace.readers, trace.truncated = _graph_readers(roots)
    finally:
        for h in handles:
            h.remove()
        restore()
    return trace


def _tensors_in(obj, depth: int = 0) -> list[Tensor]:
    """The tensors of a forward's output: a tensor, or in tuples, lists and dicts (a
    Hugging Face ModelOutput) of them."""
    if isinstance(obj, Tensor):
        return [obj]
    if depth > 4:
        return []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for o in items for t in _tensors_in(o, depth + 1)]


def _cuda_devices(model: nn.Module, example_input) -> list[int]:
    """Indices of the CUDA devices the model's tensors and the input live on."""
    inputs = example_input.values() if isinstance(example_input, Mapping) else (
        example_input if isinstance(example_input, (tuple, list)) else [example_input])
    tensors = [*model.parameters(), *model.buffers(), *(t for t in inputs if isinstance(t, Tensor))]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


# last path token of an nn.Embedding that reads token ids (not positions or token types)
_TOKEN_EMBEDDINGS = {"tokens", "wte", "embed_tokens", "word_embeddings", "tok_embeddings", "tok_emb",
                     "token_embedding", "token_embeddings", "embed", "embedding", "embeddings", "shared",
                     "emb", "embed_in"}


def example_inputs_for(model: nn.Module) -> list:
    """Small made-up inputs for ``model``, most likely first (``audit`` tries them in order):
    (src, tgt) for nn.Transformer; token ids [2, 8] when the model has an nn.Embedding
    (for an encoder-decoder, normlab's Seq2SeqTransformer or a Hugging Face model whose
    config says ``is_encoder_decoder``, source and target ids first)
    (below the vocabulary of its token embedding: one named like ``tokens``/``wte``/
    ``embed_tokens``/``word_embeddings``, else the first); a float [2, 8, in_features]
    for the first nn.Linear; for a Hugging Face vision or speech model, images or audio
    features first (``convert.verify.hf_feature_inputs``). Token ids come first wherever there is an embedding, even
    after a Linear in module order (normlab's TransformerLM registers its blocks first)."""
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else None
    g = torch.Generator().manual_seed(0)
    if isinstance(model, nn.Transformer):
        d = model.d_model
        shape = (2, 8, d) if model.batch_first else (8, 2, d)
        return [(torch.randn(shape, generator=g).to(device, dtype),
                 torch.randn(shape, generator=g).to(device, dtype))]
    out = hf_feature_inputs(model, g, device, dtype)
    embeddings = [(path, mod) for path, mod in model.named_modules() if isinstance(mod, nn.Embedding)]
    if embeddings:
        named = [mod for path, mod in embeddings if path.rsplit(".", 1)[-1].lower() in _TOKEN_EMBEDDINGS]
        vocab = (named or [embeddings[0][1]])[0].num_embeddings
        ids = torch.randint(0, vocab, (2, 8), generator=g).to(device)
        from normlab.models import Seq2SeqTransformer

        if isinstance(model, Seq2SeqTransformer):  # (source, target) token ids
            out.append((ids, ids.flip(-1)))
        elif getattr(getattr(model, "config", None), "is_encoder_decoder", False):  # Hugging Face's T5, BART, ...
            out.append({"input_ids": ids, "decoder_input_ids": ids.flip(-1)})
        out.append(ids)
    linear = next((mod for mod in model.modules() if isinstance(mod, nn.Linear)), None)
    if linear is not None:
        out.append(torch.randn(2, 8, linear.in_features, generator=g).to(device, dtype))
    return out


def example_input_for(model: nn.Module):
    """The first of :func:`example_inputs_for`, or None."""
    return next(iter(example_inputs_for(model)), None)


# ---------------------------------------------------------------------------- context


@dataclass
class AuditContext:
    model: nn.Module
    trace: Trace | None
    optimizer: torch.optim.Optimizer | None
    scheduler: object | None
    block_lists: list[tuple[str, nn.Module]]
    trace_error: str | None = None

    def placement(self, stack: str) -> str | None:
        """"pre", "post", "deepnorm" (Post-LN with an up-weighted skip) or None (unknown)
        for the blocks of ``stack``: from the model-structure table
        (``normlab.convert.blocks``: normlab's placements, torch's layers, the Hugging
        Face families), else from the trace."""
        first = next(iter(dict(self.block_lists)[stack].children()))
        # the block, or the known sublayers it is made of (BERT's BertSelfOutput/BertOutput)
        specs = [s for s in map(block_spec, first.modules()) if s is not None]
        if specs and all(s.unknown is None for s in specs) and any(s.post_norms or s.pre_norms for s in specs):
            if not any(s.post_norms for s in specs):
                return "pre"
            return "deepnorm" if getattr(getattr(first, "placement", None), "skip_scale", 1.0) > 1.0 else "post"
        if self.trace is None or isinstance(first, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            # (a container block adds no residual: neither Pre-LN nor Post-LN, whatever its norms read)
            return None
        votes = [self._traced_placement(c) for c in self.trace.block_calls if c.stack == stack]
        votes = [v for v in votes if v is not None]
        if votes and all(v == votes[0] for v in votes):
            return votes[0]
        return None

    def _traced_placement(self, call: _BlockCall) -> str | None:
        inside = [c for c in self.trace.norm_calls if c.path.startswith(call.path + ".")]
        if not inside:
            return None
        if call.output_id is not None and any(c.output_id == call.output_id for c in inside):
            return "post"
        if call.input_id is not None and any(call.input_id in c.consumed for c in inside):
            return "pre"
        return None


# ----------------------------------------------------------------------------- checks


def _batch_statistics(mod: nn.Module) -> bool:
    """A norm whose statistics are each channel's over the batch (torch's BatchNorm,
    normlab's MaskedBatchNorm and PowerNorm): a per-example norm (LayerNorm, RMSNorm,
    GroupNorm) next to it normalizes along other axes, so neither rescales what the other
    already normalized."""
    from normlab.norms import MaskedBatchNorm, PowerNorm

    return isinstance(mod, (nn.modules.batchnorm._BatchNorm, MaskedBatchNorm, PowerNorm))


def _normalizes(mod: nn.Module) -> bool:
    """A norm that divides by a statistic: not normlab's "none" (the identity) or Dynamic
    Tanh (an elementwise tanh), which register as norms to stand in for one."""
    from normlab.norms import DyT, NoNorm

    return not isinstance(mod, (DyT, NoNorm))


def check_double_norm(ctx: AuditContext) -> list[Finding]:
    found: dict[str, str] = {}
    if ctx.trace is not None:
        trace = ctx.trace
        outputs = {(c.output_id, c.output_version): c for c in trace.norm_calls if c.output_id is not None}
        for c in trace.norm_calls:
            prev = outputs.get((c.input_id, c.input_version)) if c.input_id is not None else None
            if prev is None or prev is c:  # (a norm that returns its input: normlab's "none")
                prev = _row_view_of(c, trace)
            # a norm output that something else reads too is the residual stream (an
            # embedding norm's output, which block 0 adds to): the second norm is no
            # rescaling of the first's then, but a block's own input norm
            if (prev is not None and not trace.read_besides(prev, c)
                    and _normalizes(ctx.model.get_submodule(prev.path))
                    and _normalizes(ctx.model.get_submodule(c.path))
                    and _batch_statistics(ctx.model.get_submodule(prev.path))
                    == _batch_statistics(ctx.model.get_submodule(c.path))):
                found.setdefault(c.path, prev.path)
    else:  # known structure: torch's TransformerEncoder/Decoder with a norm after Post-LN layers
        for path, mod in ctx.model.named_modules():
            if not (isinstance(mod, (nn.TransformerEncoder, nn.TransformerDecoder)) and mod.norm is not None
                    and len(mod.layers)):
                continue
            spec = block_spec(mod.layers[-1])  # the structure table says which norm ends the layer
            if spec is not None and spec.unknown is None and spec.post_norms:
                last = len(mod.layers) - 1
                prefix = f"{path}." if path else ""
                found[f"{prefix}norm"] = f"{prefix}layers.{last}.{spec.post_norms[-1]}"
    return [
        Finding("warning", "double-norm", path,
                f"'{path}' normalizes the output of '{prev}' with nothing in between: the second "
                f"norm only rescales an already normalized tensor (the Post-LN double LayerNorm "
                f"of torch.nn.Transformer)",
                f"drop '{path}' (e.g. norm=None for a Post-LN nn.TransformerEncoder/Decoder), or "
                f"use Pre-LN (norm_first=True), where a final norm is needed")
        for path, prev in found.items()
    ]


def check_pre_ln_final_norm(ctx: AuditContext) -> list[Finding]:
    out = []
    for stack, container in ctx.block_lists:
        if ctx.placement(stack) != "pre":
            continue
        last = len(container) - 1
        last_path = f"{stack}.{last}" if stack else str(last)
        if ctx.trace is not None:
            calls = [c for c in ctx.trace.block_calls if c.path == last_path]
            if not calls or calls[-1].output_id is None:
                continue
            out_id, out_node = calls[-1].output_id, calls[-1].output_node
            outside = [c for c in ctx.trace.norm_calls if not c.path.startswith(last_path + ".")]
            if any(out_id in c.consumed for c in outside):
                continue
            # a final norm after pooling (BEiT's, timm's fc_norm(x[:, 1:].mean(1))) reads a
            # tensor made from the stack output
            if any(_derives(c.input_node, out_node) for c in outside):
                continue
        else:
            parent = ctx.model.get_submodule(stack.rsplit(".", 1)[0]) if "." in stack else ctx.model
            if not (isinstance(parent, (nn.TransformerEncoder, nn.TransformerDecoder)) and parent.norm is None):
                continue
        out.append(Finding(
            "warning", "pre-ln-no-final-norm", stack or "",
            f"the Pre-LN stack '{stack}' ends without a norm: the residual stream, which grows "
            f"with depth in Pre-LN, reaches the output unnormalized",
            "add a final norm after the last block (norm=LayerNorm(d) for nn.TransformerEncoder)"))
    return out


def _param_dtype(mod: nn.Module) -> torch.dtype | None:
    p = next(mod.parameters(recurse=False), None)
    return p.dtype if p is not None and p.is_floating_point() else None


def _stat_dtype(ctx: AuditContext, path: str, mod: nn.Module) -> torch.dtype | None:
    """The dtype a norm computes in: its parameters', else (no parameters) its traced
    input's, else the model's first floating-point parameter's."""
    dtype = _param_dtype(mod)
    if dtype is None and ctx.trace is not None:
        dtype = next((c.input_dtype for c in ctx.trace.norm_calls if c.path == path and c.input_dtype), None)
    if dtype is None:
        dtype = next((p.dtype for p in ctx.model.parameters() if p.is_floating_point()), None)
    return dtype


def check_eps(ctx: AuditContext) -> list[Finding]:
    from normlab.convert.detect import _eps_of  # eps, variance_epsilon (Hugging Face's), ...

    out = []
    for path, mod in ctx.model.named_modules():
        eps = _eps_of(mod) if is_norm(mod) else None
        if eps is None:
            continue
        # the statistics' dtype: torch's norms, normlab's and Hugging Face's form them in
        # float32 for half-precision parameters and input (float64 for float64)
        dtype = torch.float64 if _stat_dtype(ctx, path, mod) is torch.float64 else torch.float32
        if eps < 0:
            out.append(Finding(
                "error", "eps-underflow", path,
                f"eps={eps:g} is negative: every row whose variance (mean square, for RMSNorm) is "
                f"below {-eps:g} takes the square root of a negative number and gives nan, a "
                f"constant or all-zero row (padding) first",
                "use eps=1e-5 (LayerNorm) or 1e-6 (RMSNorm)"))
        elif eps == 0 or torch.tensor(float(eps), dtype=dtype).item() == 0.0:
            out.append(Finding(
                "error", "eps-underflow", path,
                f"eps={eps:g} is 0 in {dtype}, the dtype of the norm's statistics: a row with zero "
                f"variance (a constant or all-zero row, padding) divides by zero and gives nan",
                "use eps=1e-5 (LayerNorm) or 1e-6 (RMSNorm)"))
    return out


def _is_sequence_model(model: nn.Module) -> bool:
    """A model with attention or embeddings, told by module types: torch's
    MultiheadAttention and Embedding, normlab's Attention, the attention the model-structure
    table declares (the Hugging Face families). Not by names: a conv net's head named
    ``value`` or ``key`` is no attention."""
    from normlab.convert.blocks import structure_kinds
    from normlab.models.attention import Attention

    if any(isinstance(mod, (nn.MultiheadAttention, nn.Embedding, Attention)) for mod in model.modules()):
        return True
    return any(kind in ("attention", "embedding") for kind in structure_kinds(model).values())


def check_batchnorm(ctx: AuditContext) -> list[Finding]:
    if not _is_sequence_model(ctx.model):
        return []
    return [
        Finding("warning", "batchnorm-padding", path,
                f"torch {type(mod).__name__} in a sequence model: its batch statistics (and running "
                f"averages) include padded positions, so they change with the padding amount",
                "use LayerNorm/RMSNorm, or normlab.MaskedBatchNorm with a padding_mask")
        for path, mod in ctx.model.named_modules()
        if isinstance(mod, nn.modules.batchnorm._BatchNorm)
    ]


def _init_params(mod: nn.Module) -> dict[str, Tensor] | None:
    if not hasattr(mod, "reset_parameters"):
        return None
    fresh = copy.deepcopy(mod)
    with torch.no_grad():
        fresh.reset_parameters()
    return {k: v.detach() for k, v in fresh.named_parameters(recurse=False)}


def _gain_offset(mod: nn.Module) -> float:
    """The offset of a norm's gain, offset + weight: normlab's ``offset``; for a norm of
    another library, what ``convert.detect`` verifies by running it (1 for Gemma's
    x * (1 + weight)); else 0."""
    offset = getattr(mod, "offset", None)
    if isinstance(offset, (int, float)) and not isinstance(offset, bool):
        return float(offset)
    if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
        return 0.0
    from normlab.convert.detect import NormSemantics, semantics

    try:
        sem = semantics(mod)
    except Exception:  # noqa: BLE001 - a module the probe cannot run: judged as offset 0
        return 0.0
    return float(sem.offset) if isinstance(sem, NormSemantics) else 0.0


def check_norm_weights(ctx: AuditContext) -> list[Finding]:
    out = []
    for path, mod in ctx.model.named_modules():
        if not is_norm(mod):
            continue
        params = {k: v.detach() for k, v in mod.named_parameters(recurse=False)
                  if v is not None and not k.endswith("bias")}
        if not params:
            continue
        init = _init_params(mod) or {}
        calls = [c for c in ctx.trace.norm_calls if c.path == path] if ctx.trace is not None else []
        residual = bool(calls) and all(ctx.trace.only_summed(c) for c in calls)
        offset = _gain_offset(mod)  # the gain is offset + weight (Gemma's zero-centred gamma: 1)
        for name, w in params.items():
            # without reset_parameters, the weight that makes the gain 1
            w0 = init.get(name, torch.full_like(w, 1.0 - offset) if name == "weight" else torch.ones_like(w))
            full = f"{path}.{name}" if path else name
            w64, w064 = w.double(), w0.double()
            if name == "weight":  # judged on the gain it applies
                w64, w064 = w64 + offset, w064 + offset
            if not torch.isfinite(w64).all():
                out.append(Finding("error", "dead-norm", path, f"'{full}' has non-finite values",
                                   "restart from a checkpoint before the divergence; lower the lr"))
            elif w64.abs().max() == 0 and w064.abs().max() > 0:
                zero = (f"'{full}' is all zero" if not offset else
                        f"the gain {offset:g} + '{full}' is all zero ('{full}' is all {-offset:g})")
                if residual:
                    # the output is added to another tensor: the branch is switched off, the
                    # network is not (torchvision's zero_init_residual, zero-gamma init)
                    out.append(Finding(
                        "warning", "dead-norm", path,
                        zero + ", and the norm's output is added to another tensor: a zero-init residual "
                        "branch (torchvision's zero_init_residual), the identity at init, as intended there; "
                        "in a trained model the branch is switched off",
                        "nothing to do at init; in a trained model, check weight decay on norm weights "
                        "(usually excluded)"))
                    continue
                out.append(Finding(
                    "error", "dead-norm", path,
                    zero + (": the norm outputs a constant (its bias)" if getattr(mod, "bias", None) is not None
                            else ": the norm outputs zeros") + " and passes no gradient to its input",
                    f"re-initialize the weight ({'ones' if not offset else f'{1 - offset:g}: a gain of 1'}), check "
                    "weight decay on norm weights (usually excluded); a zero-init residual branch is a warning "
                    "where the traced forward shows its add (pass example_input=)"))
            elif w064.norm() > 0:
                rel = float((w64 - w064).norm() / w064.norm())
                if rel > FAR_FROM_INIT:
                    out.append(Finding(
                        "warning", "norm-far-from-init", path,
                        f"'{full}' is {rel:.1f}x its init norm away from its init (||w - w0|| / "
                        f"||w0||): the norm amplifies what it normalizes",
                        "check the lr and weight decay of norm parameters; consider clipping"))
    return out


def _lrs(optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def _check_schedule(where: str, optimizer, scheduler) -> None:
    """``optimizer``: None or a torch optimizer (what has ``param_groups``, the lrs read);
    ``scheduler``: None or an lr scheduler (what has ``step()``); else NormArgumentError."""
    if optimizer is not None and not isinstance(getattr(optimizer, "param_groups", None), list):
        raise NormArgumentError(f"{where}: expected optimizer to be a torch.optim.Optimizer (with param_groups) "
                                f"or None, got {type(optimizer).__name__}")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise NormArgumentError(f"{where}: expected scheduler to be a learning-rate scheduler "
                                f"(torch.optim.lr_scheduler, with step()) or None, got {type(scheduler).__name__}")


def has_warmup(optimizer=None, scheduler=None, probe_steps: int = 200) -> bool:
    """True if the learning rate starts below half its peak in the first ``probe_steps``
    scheduler steps, or the optimizer has a warm-up built in: RAdam (rectified), Hugging
    Face's Adafactor with ``relative_step`` and ``warmup_init``.

    The steps run on copies of the scheduler and of the optimizer's param_groups (the
    parameters and the optimizer state are not copied), so the caller's scheduler and
    optimizer are never changed. ReduceLROnPlateau (which only lowers the lr, on plateaus
    of a metric) has no warm-up. A scheduler that cannot step further (OneCycleLR past its
    total_steps: ValueError; a step() that wants arguments: TypeError) ends the probe,
    judged on the lrs seen so far; one that cannot be copied (copy.deepcopy) is judged
    without warm-up. An optimizer without ``param_groups`` or a scheduler without
    ``step()`` raises NormArgumentError."""
    _check_schedule("has_warmup", optimizer, scheduler)
    if optimizer is None and scheduler is not None:
        optimizer = getattr(scheduler, "optimizer", None)
    if isinstance(optimizer, torch.optim.RAdam):
        return True
    if type(optimizer).__name__ == "Adafactor" and any(
            g.get("warmup_init") and g.get("relative_step") for g in optimizer.param_groups):
        return True  # (Hugging Face's Adafactor with warmup_init: its relative step size warms up)
    if scheduler is None or optimizer is None:
        return False
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return False
    optimizer = getattr(scheduler, "optimizer", optimizer)  # the one the scheduler steps
    # a stand-in optimizer: the same class and state, its own copy of the param_groups'
    # settings (lr, betas, ...), which is all a scheduler reads and writes
    stand_in = object.__new__(type(optimizer))
    stand_in.__dict__.update(optimizer.__dict__)
    stand_in.param_groups = [{k: v if k == "params" else copy.deepcopy(v) for k, v in g.items()}
                             for g in optimizer.param_groups]
    try:
        probe = copy.deepcopy(scheduler, {id(optimizer): stand_in})
    except Exception:  # noqa: BLE001 - a scheduler holding what cannot be copied: not probed
        return False
    start = _lrs(stand_in)
    lrs = [start]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(probe_steps):
            try:
                probe.step()
            except (ValueError, TypeError):
                break
            lrs.append(_lrs(stand_in))
    peak = [max(col) for col in zip(*lrs, strict=True)]
    return any(s < 0.5 * p for s, p in zip(start, peak, strict=True))


def check_deep_post_ln(ctx: AuditContext) -> list[Finding]:
    if ctx.optimizer is None and ctx.scheduler is None:
        return []
    if has_warmup(ctx.optimizer, ctx.scheduler):
        return []
    return [
        Finding("warning", "deep-post-ln-no-warmup", stack,
                f"Post-LN stack '{stack}' has {len(container)} layers (> {POST_LN_MAX_SAFE_DEPTH}) "
                f"and the learning rate has no warm-up: at init the last layers' gradients are "
                f"the largest (Xiong et al. 2020), a known cause of early divergence",
                "add a linear warm-up (e.g. 4000 steps), or use Pre-LN / DeepNorm")
        for stack, container in ctx.block_lists
        if len(container) > POST_LN_MAX_SAFE_DEPTH and ctx.placement(stack) == "post"
    ]


CHECKS: list[Callable[[AuditContext], list[Finding]]] = [
    check_double_norm, check_pre_ln_final_norm, check_eps, check_batchnorm, check_norm_weights,
    check_deep_post_ln,
]


def audit(model: nn.Module, example_input=None, optimizer=None, scheduler=None) -> list[Finding]:
    """Check ``model`` for normalization mistakes; returns findings, most severe first.

    ``example_input`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments) is used for one traced forward; without it one is made up when possible
    (:func:`example_inputs_for`: the first that runs), else structural checks fall back
    to known module types.
    ``optimizer``/``scheduler`` enable the warm-up check (an optimizer without
    ``param_groups`` or a scheduler without ``step()`` raises NormArgumentError). The
    model (its modes, requires_grad flags and buffers), the optimizer, the scheduler and
    the global RNG are left as they were."""
    check_model("audit", model)
    _check_schedule("audit", optimizer, scheduler)
    lazy = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if is_lazy(t)), None)
    if lazy is not None:
        raise NormArgumentError(
            f"audit: expected a model with values, got '{lazy}' uninitialized (a lazy module: torch.nn.Lazy*, "
            f"whose shapes and values its first forward decides): run one forward on a real input first "
            f"(the audit's own forward would initialize it, and leave the model changed)")
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise NormArgumentError(
            f"audit: expected a model with values, got '{meta}' on the meta device (no values for the "
            f"weight checks, nothing to run): materialize it first (model.to_empty(device=...) and "
            f"load its weights)")
    with torch.random.fork_rng(devices=_cuda_devices(model, example_input)):
        return _audit(model, example_input, optimizer, scheduler)


def _audit(model: nn.Module, example_input, optimizer, scheduler) -> list[Finding]:
    trace, err = None, None
    candidates = example_inputs_for(model) if example_input is None else [example_input]
    for candidate in candidates:
        try:
            trace = trace_forward(model, candidate)
        except Exception as e:  # a made-up input may not fit: try the next, else fall back to structure
            err = err or f"{type(e).__name__}: {e}"
        else:
            err = None
            break
    ctx = AuditContext(model, trace, optimizer, scheduler, find_block_lists(model), err)
    findings: list[Finding] = []
    if err is not None and example_input is not None:
        findings.append(Finding(
            "info", "no-trace", "", f"the forward on the example input given failed ({err}); data-flow "
            f"checks fell back to known module structure", "fix example_input (a tensor, a tuple of "
            "positional arguments or a dict of keyword arguments the model's forward takes)"))
    elif err is not None:
        findings.append(Finding(
            "info", "no-trace", "", f"the example forward failed ({err}); data-flow checks "
            f"fell back to known module structure", "pass example_input= (or a factory that "
            "returns (model, example_input))"))
    elif trace is None and any(is_norm(m) for m in model.modules()):
        findings.append(Finding(
            "info", "no-trace", "", f"no example input could be made up for {type(model).__name__} (one is "
            f"made up from an nn.Embedding's vocabulary, an nn.Linear's in_features or a known model's "
            f"config); data-flow checks fell back to known module structure",
            "pass example_input= (or a factory that returns (model, example_input))"))
    for check in CHECKS:
        findings.extend(check(ctx))
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return findings


def findings_table(findings: list[Finding], title: str = "normlab audit"):
    """A rich.table.Table of findings (their text is escaped: printed as is, not as markup)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for col in ("severity", "kind", "module", "message", "suggestion"):
        table.add_column(col, overflow="fold")
    colors = {"error": "red", "warning": "yellow", "info": "cyan"}
    for f in findings:
        table.add_row(f"[{colors.get(f.severity, 'white')}]{escape(f.severity)}[/]", escape(f.kind),
                      escape(f.module or "(model)"), escape(f.message), escape(f.suggestion))
    return table

