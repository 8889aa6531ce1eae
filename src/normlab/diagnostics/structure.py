"""What a module is, read from any ``torch.nn.Module``: its blocks, layers and sublayer kinds.

The diagnostics group parameters and activations by *layer* (the index of the repeated
block they sit in) and by *sublayer kind*. A parameter's kind comes from the
model-structure table (``normlab.convert.blocks``: normlab's Block, torch's
encoder/decoder layers, the Hugging Face families, each declaring which of its modules
are attention, FFN input and FFN output projections, plus the known models' embeddings
and heads). The name rules below cover only models outside the table.

Blocks
    A *block list* is an ``nn.ModuleList`` or ``nn.Sequential`` of at least two children
    that all have the same type (``encoder.layers``, ``transformer.h``, ``model.layers``,
    ``blocks``; children that are containers themselves must hold the same modules in the
    same order, and not be lists of like blocks, whose own lists are the block lists).
    Lists nested inside another block list's blocks are ignored. A parameter's
    *stack* is the path of its block list and its *layer* the child's index; parameters
    outside every block list get ``layer=None``.

Sublayer kinds outside the table (first matching rule wins; see :data:`KIND_RULES`)
    ``norm``       the owning module is a norm: torch's LayerNorm/RMSNorm/GroupNorm/
                   BatchNorm, any normlab norm, or a class whose name ends in "Norm"
    ``embedding``  the owning module is an ``nn.Embedding``, or a path token is one of
                   embed, embeddings, wte, wpe, tok_emb, pos_emb, word_embeddings, ...
    ``attention``  inside an ``nn.MultiheadAttention``, or a path token is one of
                   self_attn, attn, attention, selfattention, cross_attn,
                   multihead_attn, encdecattention, or a projection named q/k/v/o,
                   q_proj, k_proj, v_proj, o_proj, out_proj, qkv, c_attn, wq, wk, wv,
                   query, key, value
    ``ffn_w2``     the FFN's output projection: linear2, fc2, down_proj, w2, wo,
                   dense_4h_to_h, fc_out, c_proj (in an mlp), output.dense (BERT)
    ``ffn_w1``     the FFN's input projection(s): linear1, fc1, up_proj, gate_proj, w1, w3,
                   wi, wi_0, wi_1, c_fc, dense_h_to_4h, fc_in, intermediate.dense
    ``ffn_w1/w2``  fallback inside a container named mlp/ffn/feed_forward/...: the last
                   registered ``nn.Linear`` is ``ffn_w2``, the others ``ffn_w1``
    ``head``       outside every block: a path token is one of lm_head, head, classifier,
                   unembed, output, decoder (the final projection)
    ``other``      everything else

Extend with :func:`register_kind_rule` (prepended, so it wins over the built-in rules).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from normlab.convert.blocks import structure_kinds
from normlab.errors import NormArgumentError
from normlab.norms.registry import is_norm


def check_model(where: str, model: object) -> None:
    """The diagnostics' ``model`` argument: an nn.Module, else NormArgumentError."""
    if not isinstance(model, nn.Module):
        raise NormArgumentError(f"{where}: expected model to be a torch.nn.Module, got {type(model).__name__}")


def check_every(where: str, every: object) -> int:
    """A monitor's ``every``: an int >= 1, else NormArgumentError."""
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise NormArgumentError(f"{where}: expected every to be an int >= 1, got {every!r}")
    return int(every)

SUBLAYER_KINDS = ("attention", "ffn_w1", "ffn_w2", "norm", "embedding", "head", "other")

_EMBED_TOKENS = {"embed", "embeds", "embedding", "embeddings", "wte", "wpe", "tok_emb", "pos_emb",
                 "word_embeddings", "position_embeddings", "token_type_embeddings", "embed_tokens",
                 "embed_positions", "tok_embeddings", "shared"}
_ATTN_TOKENS = {"self_attn", "attn", "attention", "selfattention", "self_attention", "cross_attn",
                "cross_attention", "multihead_attn", "encdecattention", "crossattention", "mixer_attn",
                "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv", "qkv_proj", "c_attn",
                "wq", "wk", "wv", "query", "key", "value", "q", "k", "v", "o", "in_proj"}
_FFN_W2_TOKENS = {"linear2", "fc2", "down_proj", "w2", "wo", "dense_4h_to_h", "fc_out", "proj_out"}
_FFN_W1_TOKENS = {"linear1", "fc1", "up_proj", "gate_proj", "w1", "w3", "wi", "wi_0", "wi_1",
                  "c_fc", "dense_h_to_4h", "fc_in", "gate_up_proj", "proj_in"}
_FFN_CONTAINERS = {"mlp", "ffn", "feed_forward", "feedforward", "ff", "densereludense", "fc",
                   "intermediate", "moe"}
_HEAD_TOKENS = {"lm_head", "head", "classifier", "unembed", "output", "decoder", "out_head",
                "score", "logits"}


@dataclass(frozen=True)
class ParamContext:
    """What a kind rule sees: the parameter's dotted name, its owning module and ancestors."""

    name: str                      # "blocks.3.linear2.weight"
    module: nn.Module              # the module that owns the parameter
    ancestors: tuple[nn.Module, ...]  # root first, owner last
    tokens: tuple[str, ...]        # lower-cased path tokens of the owner: ("blocks", "3", "linear2")
    in_block: bool                 # inside a detected block
    siblings_linear: tuple[str, ...] = ()  # names of the Linear children of the owner's parent


KindRule = Callable[[ParamContext], "str | None"]


def _rule_norm(c: ParamContext) -> str | None:
    return "norm" if is_norm(c.module) else None


def _rule_embedding(c: ParamContext) -> str | None:
    if isinstance(c.module, nn.Embedding) or any(t in _EMBED_TOKENS for t in c.tokens):
        return "embedding"
    return None


def _rule_attention(c: ParamContext) -> str | None:
    if any(isinstance(a, nn.MultiheadAttention) for a in c.ancestors):
        return "attention"
    if any(t in _ATTN_TOKENS for t in c.tokens):
        return "attention"
    return None


def _rule_ffn_named(c: ParamContext) -> str | None:
    if not c.tokens:
        return None
    last = c.tokens[-1]
    if last in _FFN_W2_TOKENS:
        return "ffn_w2"
    if last in _FFN_W1_TOKENS:
        return "ffn_w1"
    parent = c.tokens[-2] if len(c.tokens) > 1 else ""
    if last == "c_proj" and parent in _FFN_CONTAINERS:  # GPT-2's mlp.c_proj
        return "ffn_w2"
    if last == "dense" and parent == "intermediate":    # BERT
        return "ffn_w1"
    if last == "dense" and parent == "output":          # BERT's layer.output.dense
        return "ffn_w2"
    return None


def _rule_ffn_container(c: ParamContext) -> str | None:
    if len(c.tokens) < 2 or c.tokens[-2] not in _FFN_CONTAINERS or not isinstance(c.module, nn.Linear):
        return None
    if c.siblings_linear and c.tokens[-1] == c.siblings_linear[-1].lower():
        return "ffn_w2"
    return "ffn_w1"


def _rule_head(c: ParamContext) -> str | None:
    if not c.in_block and any(t in _HEAD_TOKENS for t in c.tokens):
        return "head"
    return None


KIND_RULES: list[KindRule] = [
    _rule_norm, _rule_embedding, _rule_attention, _rule_ffn_named, _rule_ffn_container, _rule_head,
]


def register_kind_rule(rule: KindRule) -> KindRule:
    """Add a rule ``ParamContext -> kind | None``; it is tried before the built-in ones."""
    KIND_RULES.insert(0, rule)
    return rule


# ------------------------------------------------------------------------ block lists


def _like_children(mod: nn.Module) -> bool:
    """Whether ``mod`` has >= 2 children, all of one type."""
    children = list(mod.children())
    return len(children) >= 2 and len({type(c) for c in children}) == 1


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All block lists of ``model`` as (path, container), the longest first.

    A block list is an ``nn.ModuleList``/``nn.Sequential`` of >= 2 same-typed children,
    and that is not inside another block list; children that are themselves containers
    (``nn.Sequential(nn.Sequential(norm, linear), ...)``) count where they hold the same
    modules in the same order (a container of unlike parts, a stem beside a head, is none)
    and are not block lists themselves (a model's stages, each a list of blocks: those
    inner lists are the block lists)."""
    found: list[tuple[str, nn.Module]] = []
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(mod.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        if isinstance(children[0], (nn.ModuleList, nn.Sequential, nn.ModuleDict)) and (
                len({tuple((name, type(m)) for name, m in c.named_modules()) for c in children}) != 1
                or _like_children(children[0])):
            continue  # (lists of lists of blocks, as a model's stages: the inner lists are the block lists)
        if not any(True for _ in children[0].parameters()):
            continue
        if any(path.startswith(p + ".") or (p == "" and path) for p, _ in found):
            continue
        found.append((path, mod))
    found.sort(key=lambda pm: -len(pm[1]))
    return found


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The main block list (the longest): (path, blocks). ``("", [])`` when there is none."""
    lists = find_block_lists(model)
    if not lists:
        return "", []
    path, mod = lists[0]
    return path, list(mod.children())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass(frozen=True)
class ParamInfo:
    """Where one parameter sits: its stack (block-list path), layer index and sublayer kind."""

    name: str
    stack: str
    layer: int | None
    kind: str


def _layer_of(path: str, block_lists: list[tuple[str, nn.Module]]) -> tuple[str, int | None]:
    for bpath, _ in block_lists:
        prefix = bpath + "." if bpath else ""
        if path.startswith(prefix) and path != bpath:
            head = path[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return bpath, int(head)
    return "", None


def sublayer_kind(ctx: ParamContext) -> str:
    for rule in KIND_RULES:
        kind = rule(ctx)
        if kind is not None:
            return kind
    return "other"


def _table_kind(path: str, table: dict[str, str]) -> str | None:
    """The kind the structure table gives the module at ``path`` (longest prefix)."""
    while True:
        if path in table:
            return table[path]
        if "." not in path:
            return None
        path = path.rsplit(".", 1)[0]


def iter_param_info(model: nn.Module) -> Iterator[tuple[ParamInfo, nn.Parameter]]:
    """Every (distinct) parameter of ``model`` with its stack, layer and sublayer kind:
    a norm by its type; then what the model-structure table (``normlab.convert.blocks``)
    says of the known blocks and models; the name rules only for the rest."""
    block_lists = find_block_lists(model)
    table = structure_kinds(model)
    seen: set[int] = set()

    def walk(mod: nn.Module, prefix: str, ancestors: tuple[nn.Module, ...], parent: nn.Module | None):
        ancestors = ancestors + (mod,)
        tokens = tuple(t.lower() for t in prefix.split(".")) if prefix else ()
        stack, layer = _layer_of(prefix, block_lists)
        siblings = ()
        if parent is not None:
            siblings = tuple(n for n, c in parent.named_children() if isinstance(c, nn.Linear))
        for pname, p in mod.named_parameters(recurse=False):
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            ctx = ParamContext(_join(prefix, pname), mod, ancestors, tokens, layer is not None,
                               siblings)
            kind = "norm" if is_norm(mod) else _table_kind(prefix, table) or sublayer_kind(ctx)
            yield ParamInfo(ctx.name, stack, layer, kind), p
        for cname, child in mod.named_children():
            yield from walk(child, _join(prefix, cname), ancestors, mod)

    yield from walk(model, "", (), None)


def module_layer(path: str, model: nn.Module,
                 block_lists: list[tuple[str, nn.Module]] | None = None) -> tuple[str, int | None]:
    """(stack, layer) of the module at ``path``."""
    return _layer_of(path, find_block_lists(model) if block_lists is None else block_lists)
