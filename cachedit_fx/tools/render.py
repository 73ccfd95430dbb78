"""A :class:`~cachedit_fx.report.GraphReport` as text, JSON, Graphviz DOT, or a picture (PNG / SVG,
laid out by Graphviz's ``dot`` program when it is installed)."""
from __future__ import annotations

import json
import shutil
import subprocess

from ..errors import ConfigError, MissingDependency
from .report import ChainReport, GraphReport

IMAGE_FORMATS = ("png", "svg")
_SHOWN = 3  # blocks drawn at each end of a longer segment, with an ellipsis between


def render_text(report: GraphReport) -> str:
    lines = []
    if report.graph_break and report.matched:
        lines.append(f"graph break: {report.graph_break}; without fullgraph=True Dynamo splits the forward "
                     f"into {report.graphs} graphs, and the one below has a cacheable chain")
    if report.islands:
        made = ", ".join(f"{name} x{k}" for name, k in report.islands.items())
        lines.append(f"islands (opaque custom ops that enable_cache makes of submodules breaking every block): {made}")
    lines.append(f"before: {report.before.nodes} nodes {report.before.ops}")
    if not report.matched:
        lines.append(f"unmatched: {report.reason}")
        return "\n".join(lines)
    lines.append(f"after:  {report.after.nodes} nodes {report.after.ops}")
    if report.moved_into_branches:
        lines.append(f"moved into the one cond branch that reads them: {len(report.moved_into_branches)} nodes "
                     f"({', '.join(report.moved_into_branches)})")
    if report.flattened_subclasses:
        lines.append("tensor-subclass weights passed to the cond as their plain tensors: " + ", ".join(
            f"{n} {cls}" for cls, n in report.flattened_subclasses.items()))
    for c in report.chains:
        lines.append(f"chain {c.name}  pattern {c.pattern}  {c.n_blocks} blocks")
        for l in c.lists:
            lines.append(f"  {l.list}: blocks {l.blocks[0]}..{l.blocks[1]} pattern {l.pattern}")
        lines.append(f"  cut: Fn {c.cut.Fn} | middle {c.cut.middle} | Bn {c.cut.Bn or '-'}")
        for key, carries in (("carries into middle", c.carries_into_middle),
                             ("carries out of middle", c.carries_out_of_middle)):
            for v in carries:
                lines.append(f"  {key}: {v.name} {v.role} {v.shape} {v.dtype}")
        lines.append("  inserted: " + ", ".join(f"{i.name}({i.target})" for i in c.inserted))
        lines.append(f"  state: {len(c.state)} tensors, {c.state_bytes} bytes")
        for name, v in c.state.items():
            lines.append(f"    {name}: {v.shape} {v.dtype} ({v.bytes} B)")
    return "\n".join(lines)


def render_json(report: GraphReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


# ----------------------------------------------------------------------------- DOT


def _q(text: str) -> str:
    return '"' + text.replace('"', '\\"').replace("\n", "\\n") + '"'


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _carries(carries) -> str:
    return ", ".join(f"{v.role} {'x'.join(map(str, v.shape))}" for v in carries) or "-"


def _shown(first: int, last: int) -> list[int | None]:
    """The block indices drawn for a segment; None is an ellipsis."""
    if last - first + 1 <= 2 * _SHOWN + 1:
        return list(range(first, last + 1))
    return [*range(first, first + _SHOWN), None, *range(last - _SHOWN + 1, last + 1)]


_PRE = "pre_step: diff = rel-L1(Fn residual vs ref)\ngates: warmup, mask, limits, diff < threshold"
_CACHED = "cached branch: passthrough glue\n+ cached / forecast middle residual"
_SEGMENTS = (("fn", "Fn", "always run", "#2ca02c", "#c7e9c0"),
             ("mid", "middle", "full branch", "#ff7f0e", "#fdd0a2"),
             ("bn", "Bn", "always run", "#1f77b4", "#c6dbef"))


def _chain_dot(ci: int, c: ChainReport) -> list[str]:
    p, names = f"c{ci}_", c.block_labels()
    out, firsts, lasts = [], {}, {}
    for key, seg, note, border, fill in _SEGMENTS:
        span = getattr(c.cut, seg)
        if not span:
            continue
        out.append(f"  subgraph cluster_{p}{key} {{ label={_q(f'{seg}: blocks {span[0]}..{span[1]} ({note})')}; "
                   f"color=\"{border}\";")
        ids = []
        for i in _shown(*span):
            node = f"{p}b{i}" if i is not None else f"{p}{key}_more"
            text = f"{i}: {names[i]}" if i is not None else f"… {span[1] - span[0] + 1 - 2 * _SHOWN} more"
            out.append(f"    {node} [label={_q(text)}, fillcolor=\"{fill}\"];")
            ids.append(node)
        out.append("  }")
        if len(ids) > 1:
            out.append("  " + " -> ".join(ids) + ";")
        firsts[key], lasts[key] = ids[0], ids[-1]
    out += [f"  {p}in [label={_q('inputs')}, shape=ellipse];",
            f"  {p}pre [label={_q(_PRE)}, fillcolor=\"#fff7bc\"];",
            f"  {p}cond [label={_q('torch.cond(use_cache)')}, shape=diamond, fillcolor=\"#fee391\"];",
            f"  {p}cached [label={_q(_CACHED)}, fillcolor=\"#dadaeb\"];",
            f"  {p}post [label={_q('post_step: update ref, ladders, counters, logs')}, fillcolor=\"#fff7bc\"];",
            f"  {p}out [label={_q('output')}, shape=ellipse];",
            f"  {p}in -> {firsts['fn']};",
            f"  {lasts['fn']} -> {p}pre -> {p}cond;",
            f"  {p}cond -> {firsts['mid']} [label=\"False: compute\"];",
            f"  {lasts['mid']} -> {p}post;",
            f"  {p}cond -> {p}cached [label=\"True: reuse\"];",
            f"  {p}cached -> {p}post;"]
    if "bn" in firsts:
        out += [f"  {p}post -> {firsts['bn']};", f"  {lasts['bn']} -> {p}out;"]
    else:
        out.append(f"  {p}post -> {p}out;")
    return out


def render_dot(report: GraphReport, title: str = "") -> str:
    """The chain as Graphviz DOT text (render with ``dot -Tpng``; emitting it needs no Graphviz)."""
    out = ["digraph cachedit {", "  rankdir=LR;", "  compound=true;", "  pad=0.3;",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fillcolor=white];',
           '  edge [fontname="Helvetica", fontsize=9];']
    label = title + (": " if title else "")
    if not report.matched:
        out.append(f"  label={_q(label + 'unmatched (compiled uncached):' + chr(10) + (report.reason or ''))};")
        out.append(f"  model [label={_q((title or 'model') + ' (no cacheable chain)')}, fillcolor=\"#dddddd\"];")
        out.append("}")
        return "\n".join(out)
    for ci, c in enumerate(report.chains):
        out += _chain_dot(ci, c)
    c = report.chains[0]
    summary = (f"{label}chain {c.name}, pattern {c.pattern}, {c.n_blocks} blocks, F{report.fn}B{report.bn}; "
               f"carries in: {_carries(c.carries_into_middle)}; out: {_carries(c.carries_out_of_middle)}; "
               f"state {_fmt_bytes(c.state_bytes)}; graph {report.before.nodes} -> {report.after.nodes} nodes")
    if report.graph_break:
        summary += f" ({report.graphs} graphs: graph break)"
    out += [f"  label={_q(summary)};", "  labelloc=t;", "}"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- pictures


def render_image(report: GraphReport, path: str, fmt: str = "png", title: str = "") -> str:
    """Lay the report's DOT out with Graphviz and write it to ``path`` as PNG or SVG."""
    if fmt not in IMAGE_FORMATS:
        raise ConfigError(f"format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    dot = shutil.which("dot")
    if dot is None:
        raise MissingDependency("png/svg pictures are laid out by Graphviz's `dot` program, which is not installed "
                                "(apt install graphviz, brew install graphviz or conda install graphviz); "
                                "--format dot writes the DOT text without it")
    subprocess.run([dot, f"-T{fmt}", "-Gdpi=110" if fmt == "png" else "-Gdpi=72", "-o", path],
                   input=render_dot(report, title), text=True, check=True, capture_output=True)
    return path
