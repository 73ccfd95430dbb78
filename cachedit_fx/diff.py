"""What the passes do to a model's graph, as a JSON-able report (the ``cachedit-fx diff`` command),
and the report drawn as text, DOT, or a picture (PNG / SVG, drawn with matplotlib: no graphviz needed).

Models (:func:`load_model`): a zoo family name (``flux``), ``package.module:Class`` with a
diffusers-style config JSON (random weights), or a local diffusers model folder (``config.json`` with
``_class_name``, loaded with ``from_pretrained``). Example inputs come from the zoo family whose
transformer class the model is.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from . import islands
from .capture import capture, clone_graph_module
from .config import DBCacheConfig
from .passes.patterns import Unmatched, analyze
from .passes.rewrite import rewrite


# ----------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    transformer: torch.nn.Module
    inputs: dict
    family: Any  # zoo.Family
    label: str


def _zoo_transformer_classes() -> dict[str, str]:
    """Transformer class name -> zoo family, read from each family's build_pipeline source."""
    from .testing import zoo

    out: dict[str, str] = {}
    for name in zoo.FAMILY_NAMES:
        try:
            src = inspect.getsource(zoo.get(name).build_pipeline)
        except (OSError, TypeError):
            continue
        for cls in re.findall(r"\b(\w*Transformer\w*Model)\(", src):
            out.setdefault(cls, name)
    return out


def family_for_class(cls: type):
    """The zoo family whose transformer is ``cls`` (by class name), or None."""
    from .testing import zoo

    name = _zoo_transformer_classes().get(cls.__name__)
    return zoo.get(name) if name else None


def _import_class(spec: str) -> type:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {spec!r}: expected package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not isinstance(obj, type) or not issubclass(obj, torch.nn.Module):
        raise ValueError(f"model {spec!r}: {attr} is not a torch.nn.Module class")
    return obj


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object (a diffusers-style config dict)")
    return data


def _instantiate(cls: type, config: dict, where: str) -> torch.nn.Module:
    try:
        if hasattr(cls, "from_config"):  # diffusers ConfigMixin: ignores _class_name / _diffusers_version
            return cls.from_config(config)
        return cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cls.__name__}(**config) from {where} failed: {e}") from None


def _no_inputs(cls: type) -> ValueError:
    known = ", ".join(sorted(_zoo_transformer_classes()))
    return ValueError(f"no example inputs for {cls.__module__}.{cls.__name__}: only the zoo families' transformer "
                      f"classes have them ({known})")


def load_model(spec: str, config: str | None = None, seed: int = 0) -> LoadedModel:
    """A transformer and the kwargs of one call, from a zoo name, ``package.module:Class`` + config
    JSON, or a local diffusers model folder."""
    from .testing import zoo

    if config is not None and not (":" in spec and not os.path.exists(spec)):
        raise ValueError(f"--config needs MODEL as package.module:Class (got {spec!r})")
    if ":" in spec and not os.path.exists(spec):
        cls = _import_class(spec)
        if config is None:
            raise ValueError(f"model {spec!r}: a package.module:Class model needs --config cfg.json")
        family = family_for_class(cls)
        if family is None:
            raise _no_inputs(cls)
        torch.manual_seed(seed)
        model = _instantiate(cls, _read_json(config, "config file"), config)
        label = f"{cls.__name__} (random weights from {os.path.basename(config)})"
    elif os.path.isdir(spec):
        cfg = _read_json(os.path.join(spec, "config.json"), "config.json of model folder")
        name = cfg.get("_class_name")
        if not isinstance(name, str):
            raise ValueError(f"model folder {spec}: config.json has no _class_name (not a diffusers model folder)")
        import diffusers

        cls = getattr(diffusers, name, None)
        if not isinstance(cls, type):
            raise ValueError(f"model folder {spec}: _class_name {name!r} is not a diffusers class")
        family = family_for_class(cls)
        if family is None:
            raise _no_inputs(cls)
        try:
            model = cls.from_pretrained(spec, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ValueError(f"model folder {spec}: {name}.from_pretrained failed: {str(e).splitlines()[0]}") from None
        label = f"{name} from {spec}"
    elif os.sep in spec or spec.startswith(".") or spec.endswith(".json"):
        raise FileNotFoundError(f"no such model folder: {spec}")
    else:
        transformer, inputs = zoo.build_transformer(spec)  # ValueError for unknown names
        return LoadedModel(transformer, inputs, zoo.get(spec), spec)
    model = model.eval()
    return LoadedModel(model, family.transformer_inputs(model, seed), family, label)


# ----------------------------------------------------------------------------- report


def _val(node):
    return node.meta.get("example_value", node.meta.get("val"))


def _ops(gm) -> Counter:
    return Counter(n.op for n in gm.graph.nodes)


def _carry(node, role: str) -> dict:
    v = _val(node)
    return {"name": node.name, "role": role, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}


def _one_graph(transformer, inputs: dict):
    """(graph, None) from a fullgraph capture, or (None, the reason it breaks)."""
    try:
        return capture(transformer, kwargs=inputs)[0], None
    except Exception as e:  # noqa: BLE001 - any Dynamo failure under fullgraph=True means a break
        reason = str(e).strip().split(" The cachedit pass needs")[0].strip() or type(e).__name__
        return None, (reason.splitlines()[0] if "\n" in reason else reason).rstrip(".")


def capture_graphs(transformer, inputs: dict) -> tuple[list, str | None]:
    """The graph(s) the backend would see (with the islands enable_cache makes, left installed: the
    caller uninstalls them): one with fullgraph capture, or, where the forward has a graph break
    (data-dependent Python, an unsupported context manager), every graph of the split forward and the
    reason of the break."""
    gm, reason = _one_graph(transformer, inputs)
    if (gm is None or islands.needed_for_graph(transformer, gm)) and islands.find(transformer, transformer.forward,
                                                                                 (), inputs):
        gm, reason = _one_graph(transformer, inputs)
    if gm is not None:
        return [gm], None
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    import logging

    log = logging.getLogger("torch._dynamo")
    level = log.level
    log.setLevel(logging.ERROR)  # recompile-limit warnings of loops split into many graphs
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(transformer, backend=record, dynamic=False)(**inputs)
    finally:
        torch._dynamo.reset()
        log.setLevel(level)
    return graphs, reason


def describe(transformer, inputs: dict, fn: int = 1, bn: int = 0, separate_cfg: bool = False) -> dict:
    cfg = DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn)  # validates fn / bn first
    try:
        graphs, graph_break = capture_graphs(transformer, inputs)
        made = Counter(type(m).__name__ for m in transformer.modules() if hasattr(m, "_cachedit_island"))
        report = _describe(graphs, graph_break, cfg, separate_cfg)
    finally:
        for m in transformer.modules():
            islands.uninstall(m)
    if made:
        report["islands"] = dict(made)
    return report


def _describe(graphs, graph_break, cfg, separate_cfg: bool) -> dict:
    fn, bn = cfg.Fn_compute_blocks, cfg.Bn_compute_blocks
    found, gm, reasons = None, None, Counter()
    for g in graphs:
        f = analyze(g)
        if not isinstance(f, Unmatched):
            found, gm = f, g
            break
        reasons[f.reason] += 1
    if gm is None and graphs:
        gm = max(graphs, key=lambda g: len(g.graph.nodes))
    before = {"nodes": len(gm.graph.nodes), "ops": dict(_ops(gm))} if gm is not None else {"nodes": 0, "ops": {}}
    head = {"fn": fn, "bn": bn}
    if graph_break is not None:
        head["graphs"] = len(graphs)
        head["graph_break"] = graph_break
    if found is None:
        why = "; ".join(r if k == 1 else f"{r} ({k} graphs)" for r, k in reasons.items()) or "no graph captured"
        if graph_break is not None:
            why = (f"{graph_break}; none of the {len(graphs)} graphs Dynamo splits it into has a cacheable chain: "
                   f"{why}")
        return {"matched": False, "reason": why, **head, "before": before}
    work = clone_graph_module(gm)
    infos = analyze(work)
    with torch.no_grad():
        chains = rewrite(work, infos[:1], cfg, None, 2 if separate_cfg else 1)
    report = {"matched": True, **head, "before": before,
              "after": {"nodes": len(work.graph.nodes), "ops": dict(_ops(work))}, "chains": []}
    for rc in chains:
        s, info = rc.split, rc.info
        start, lists = 0, []
        for path, count, pattern in info.list_patterns:
            lists.append({"list": path, "blocks": [start, start + count - 1], "pattern": int(pattern)})
            start += count
        n = info.n_blocks
        report["chains"].append({
            "name": info.name, "pattern": info.pattern, "n_blocks": n, "lists": lists,
            "cut": {"Fn": [0, s.fn - 1], "middle": [s.fn, n - s.bn - 1],
                    "Bn": [n - s.bn, n - 1] if s.bn else None},
            "fn_residual": {"H_in": _carry(s.h_in, "H"), "H_after_Fn": _carry(s.h_fn, "H")},
            "carries_into_middle": [_carry(i, info.streams[s.fn - 1].outputs.get(i, "context"))
                                    for i in s.middle_inputs
                                    if isinstance(_val(i), torch.Tensor) and "_parameters_" not in i.name
                                    and i.op != "placeholder"],
            "carries_out_of_middle": [_carry(o, s.output_roles[o]) for o in s.middle_outputs],
            "inserted": [{"name": n.name, "op": n.op, "target": getattr(n.target, "__name__", str(n.target))}
                         for n in rc.inserted if n.target.__class__.__name__ != "builtin_function_or_method"
                         or n.target.__name__ != "getitem"],
            "state": {name: {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                             "bytes": int(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size())}
                      for name, (shape, dtype) in rc.layout.shapes().items()},
        })
    return report


def render_text(report: dict) -> str:
    lines = []
    if report.get("graph_break") and report["matched"]:
        lines.append(f"graph break: {report['graph_break']}; without fullgraph=True Dynamo splits the forward "
                     f"into {report['graphs']} graphs, and the one below has a cacheable chain")
    if report.get("islands"):
        made = ", ".join(f"{name} x{k}" for name, k in report["islands"].items())
        lines.append(f"islands (opaque custom ops that enable_cache makes of submodules breaking every block): {made}")
    lines.append(f"before: {report['before']['nodes']} nodes {report['before']['ops']}")
    if not report["matched"]:
        lines.append(f"unmatched: {report['reason']}")
        return "\n".join(lines)
    lines.append(f"after:  {report['after']['nodes']} nodes {report['after']['ops']}")
    for c in report["chains"]:
        lines.append(f"chain {c['name']}  pattern {c['pattern']}  {c['n_blocks']} blocks")
        for l in c["lists"]:
            lines.append(f"  {l['list']}: blocks {l['blocks'][0]}..{l['blocks'][1]} pattern {l['pattern']}")
        cut = c["cut"]
        lines.append(f"  cut: Fn {cut['Fn']} | middle {cut['middle']} | Bn {cut['Bn'] or '-'}")
        for key in ("carries_into_middle", "carries_out_of_middle"):
            for v in c[key]:
                lines.append(f"  {key.replace('_', ' ')}: {v['name']} {v['role']} {v['shape']} {v['dtype']}")
        lines.append("  inserted: " + ", ".join(f"{i['name']}({i['target']})" for i in c["inserted"]))
        total = sum(v["bytes"] for v in c["state"].values())
        lines.append(f"  state: {len(c['state'])} tensors, {total} bytes")
        for name, v in c["state"].items():
            lines.append(f"    {name}: {v['shape']} {v['dtype']} ({v['bytes']} B)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- DOT


def _block_labels(chain: dict) -> list[str]:
    labels = []
    for l in chain["lists"]:
        first = l["blocks"][0]
        labels += [f"{l['list']}.{i - first}" for i in range(l["blocks"][0], l["blocks"][1] + 1)]
    return labels


def _q(text: str) -> str:
    return '"' + text.replace('"', '\\"').replace("\n", "\\n") + '"'


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _carries(chain: dict, key: str) -> str:
    return ", ".join(f"{v['role']} {'x'.join(map(str, v['shape']))}" for v in chain[key]) or "-"


_PRE = "pre_step: diff = rel-L1(Fn residual vs ref)\ngates: warmup, mask, limits, diff < threshold"
_CACHED = "cached branch: passthrough glue\n+ cached / forecast middle residual"


def render_dot(report: dict, title: str = "") -> str:
    """The chain as Graphviz DOT text (render with ``dot -Tpng``; emitting it needs no graphviz)."""
    out = ["digraph cachedit {", "  rankdir=LR;", "  compound=true;",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fillcolor=white];',
           '  edge [fontname="Helvetica", fontsize=9];']
    label = title + (": " if title else "")
    if not report["matched"]:
        out.append(f"  label={_q(label + 'unmatched (compiled uncached): ' + report['reason'])};")
        out.append(f"  model [label={_q((title or 'model') + ' (no cacheable chain)')}, fillcolor=\"#dddddd\"];")
        out.append("}")
        return "\n".join(out)
    for ci, c in enumerate(report["chains"]):
        p = f"c{ci}_"
        n, cut = c["n_blocks"], c["cut"]
        fn_end, mid = cut["Fn"][1], cut["middle"]
        bn = cut["Bn"]
        names = _block_labels(c)
        blk = [f"{p}b{i}" for i in range(n)]

        def block(i, color):
            text = _q(f"{i}: {names[i]}")
            return f"    {blk[i]} [label={text}, fillcolor=\"{color}\"];"

        def cluster(key, label, border, fill, first, last):
            out.append(f"  subgraph cluster_{p}{key} {{ label={_q(label)}; color=\"{border}\";")
            out.extend(block(i, fill) for i in range(first, last + 1))
            out.append("  }")

        out.append(f"  {p}in [label={_q('inputs')}, shape=ellipse];")
        cluster("fn", f"Fn: blocks {cut['Fn'][0]}..{fn_end} (always run)", "#2ca02c", "#c7e9c0", 0, fn_end)
        out.append(f"  {p}pre [label={_q(_PRE)}, fillcolor=\"#fff7bc\"];")
        out.append(f"  {p}cond [label={_q('torch.cond(use_cache)')}, shape=diamond, fillcolor=\"#fee391\"];")
        cluster("mid", f"middle: blocks {mid[0]}..{mid[1]} (full branch)", "#ff7f0e", "#fdd0a2", *mid)
        out.append(f"  {p}cached [label={_q(_CACHED)}, fillcolor=\"#dadaeb\"];")
        out.append(f"  {p}post [label={_q('post_step: update ref, ladders, counters, logs')}, fillcolor=\"#fff7bc\"];")
        if bn:
            cluster("bn", f"Bn: blocks {bn[0]}..{bn[1]} (always run)", "#1f77b4", "#c6dbef", *bn)
        out.append(f"  {p}out [label={_q('output')}, shape=ellipse];")
        chain = [f"{p}in"] + blk[: fn_end + 1] + [f"{p}pre", f"{p}cond"]
        out.append("  " + " -> ".join(chain) + ";")
        out.append(f"  {p}cond -> {blk[mid[0]]} [label=\"False: compute\"];")
        if mid[1] > mid[0]:
            out.append("  " + " -> ".join(blk[mid[0]: mid[1] + 1]) + ";")
        out.append(f"  {blk[mid[1]]} -> {p}post;")
        out.append(f"  {p}cond -> {p}cached [label=\"True: reuse\"];")
        out.append(f"  {p}cached -> {p}post;")
        tail = [f"{p}post"] + (blk[bn[0]: bn[1] + 1] if bn else []) + [f"{p}out"]
        out.append("  " + " -> ".join(tail) + ";")
    c = report["chains"][0]
    total = sum(v["bytes"] for v in c["state"].values())
    summary = (f"{label}chain {c['name']}, pattern {c['pattern']}, {c['n_blocks']} blocks; carries in: "
               f"{_carries(c, 'carries_into_middle')}; out: {_carries(c, 'carries_out_of_middle')}; "
               f"state {_fmt_bytes(total)}")
    out.append(f"  label={_q(summary)};")
    out.append("  labelloc=t;")
    out.append("}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- picture (matplotlib)

_COLORS = {"Fn": ("#c7e9c0", "#2ca02c"), "middle": ("#fdd0a2", "#e6550d"), "Bn": ("#c6dbef", "#1f77b4"),
           "glue": ("#fff7bc", "#b8860b"), "cached": ("#dadaeb", "#6a51a3"), "io": ("#f0f0f0", "#555555")}
_MAX_SHOWN = 28  # blocks drawn one by one; longer chains show the ends of each segment and an ellipsis


def _shown(indices: list[int], keep: int) -> list[int | None]:
    if len(indices) <= keep:
        return list(indices)
    half = max(1, keep // 2)
    return indices[:half] + [None] + indices[-(keep - half - 1):] if keep - half - 1 > 0 else indices[:half] + [None]


def render_figure(report: dict, path: str, fmt: str | None = None, title: str = "") -> str:
    """Draw the block chain with the Fn | middle | Bn cut and the cond as a PNG or SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Polygon

    fmt = fmt or os.path.splitext(path)[1].lstrip(".").lower() or "png"
    if not report["matched"]:
        fig, ax = plt.subplots(figsize=(9, 2.2))
        ax.axis("off")
        ax.text(0.5, 0.62, f"{title or 'model'}: no cacheable chain (compiles uncached)", ha="center",
                fontsize=12, weight="bold")
        ax.text(0.5, 0.3, _wrap(report["reason"], 110), ha="center", va="center", fontsize=9)
        fig.savefig(path, format=fmt, dpi=110)
        plt.close(fig)
        return path

    c = report["chains"][0]
    n, cut = c["n_blocks"], c["cut"]
    names = _block_labels(c)
    seg_of = {}
    for seg in ("Fn", "middle", "Bn"):
        if cut[seg]:
            for i in range(cut[seg][0], cut[seg][1] + 1):
                seg_of[i] = seg
    # which blocks get a box (long chains: both ends of every segment)
    slots: list[int | None] = []
    if n <= _MAX_SHOWN:
        slots = list(range(n))
    else:
        for seg, keep in (("Fn", 6), ("middle", 10), ("Bn", 6)):
            if cut[seg]:
                slots += _shown(list(range(cut[seg][0], cut[seg][1] + 1)), keep)

    w, gap = 1.0, 0.35
    chain_width = 1.6 + len(slots) * (w + gap) - gap + 1.8
    width = max(chain_width, 14.5)
    off = (width - chain_width) / 2
    xs = [off + 1.6 + k * (w + gap) for k in range(len(slots))]
    fig_w = min(max(9.0, width * 0.62), 30.0)
    fig, ax = plt.subplots(figsize=(fig_w, 5.6))
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-3.9, 3.0)
    ax.axis("off")
    y, h = 1.0, 0.9

    def box(x, yy, bw, bh, text, kind, fontsize=7, hatch=None, rot=0):
        face, edge = _COLORS[kind]
        ax.add_patch(FancyBboxPatch((x, yy), bw, bh, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=face, edgecolor=edge, linewidth=1.2, hatch=hatch))
        ax.text(x + bw / 2, yy + bh / 2, text, ha="center", va="center", fontsize=fontsize, rotation=rot)

    def arrow(p, q, text=None, color="#333333", style="-|>", rad=0.0, ls="-"):
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle=style, mutation_scale=10, color=color, linewidth=1.0,
                                     connectionstyle=f"arc3,rad={rad}", linestyle=ls))
        if text:
            ax.text((p[0] + q[0]) / 2, (p[1] + q[1]) / 2 + 0.08, text, fontsize=7, ha="center", color=color)

    box(off, y, 1.2, h, "inputs", "io", fontsize=8)
    arrow((off + 1.2, y + h / 2), (xs[0], y + h / 2))
    for k, (x, i) in enumerate(zip(xs, slots)):
        if i is None:
            ax.text(x + w / 2, y + h / 2, "…", ha="center", va="center", fontsize=14)
        else:
            seg = seg_of[i]
            local = names[i].rsplit(".", 1)[-1]
            box(x, y, w, h, f"{i}\n[{local}]", seg, fontsize=7, hatch="//" if seg == "middle" else None)
        if k + 1 < len(xs):
            arrow((x + w, y + h / 2), (xs[k + 1], y + h / 2), color="#999999")
    box(xs[-1] + w + gap, y, 1.2, h, "output", "io", fontsize=8)
    arrow((xs[-1] + w, y + h / 2), (xs[-1] + w + gap, y + h / 2))

    def span(seg):
        ks = [k for k, i in enumerate(slots) if i is not None and seg_of[i] == seg]
        return (xs[ks[0]], xs[ks[-1]] + w) if ks else None

    # segment brackets and the cut lines
    for seg, note in (("Fn", "always run"), ("middle", "skipped on cached steps"), ("Bn", "always run")):
        sp = span(seg)
        if sp is None:
            continue
        edge = _COLORS[seg][1]
        rng = cut[seg]
        ax.plot([sp[0], sp[0], sp[1], sp[1]], [y + h + 0.15, y + h + 0.3, y + h + 0.3, y + h + 0.15], color=edge)
        narrow = sp[1] - sp[0] < 3.0
        text = f"{seg}\n{rng[0]}..{rng[1]}" if narrow else f"{seg}: blocks {rng[0]}..{rng[1]}\n({note})"
        ax.text((sp[0] + sp[1]) / 2, y + h + 0.4, text, ha="center", fontsize=8, color=edge, weight="bold")
    for seg in ("middle", "Bn"):
        sp = span(seg)
        if sp is not None:
            xc = sp[0] - gap / 2
            ax.plot([xc, xc], [y - 0.25, y + h + 0.25], color="#d62728", linestyle="--", linewidth=1.4)
    # list boundaries (e.g. Flux's double- then single-stream blocks)
    for l in c["lists"]:
        ks = [k for k, i in enumerate(slots) if i is not None and l["blocks"][0] <= i <= l["blocks"][1]]
        if ks:
            a, b = xs[ks[0]], xs[ks[-1]] + w
            ax.plot([a, b], [y - 0.12, y - 0.12], color="#555555", linewidth=2)
            ax.text((a + b) / 2, y - 0.35, f"{l['list']} (pattern {l['pattern']})", ha="center", fontsize=7,
                    color="#555555")

    # the cond, below the middle
    mid = span("middle")
    fn_sp = span("Fn")
    bn_sp = span("Bn")
    pre_x, mx, post_x = width * 0.22, width * 0.5, width * 0.78
    by = -1.25
    box(pre_x - 0.9, by - 0.35, 1.8, 0.7, "pre_step\ndiff = relL1(Fn residual)\nfirst gate that fires", "glue",
        fontsize=6)
    arrow((fn_sp[1] - 0.05, y), (pre_x, by + 0.35))
    dx, dy = 0.75, 0.5
    ax.add_patch(Polygon([(mx, by + dy), (mx + dx, by), (mx, by - dy), (mx - dx, by)], closed=True,
                         facecolor="#fee391", edgecolor="#b8860b"))
    ax.text(mx, by, "torch.cond\n(use_cache)", ha="center", va="center", fontsize=6)
    arrow((pre_x + 0.9, by), (mx - dx, by))
    arrow((mx, by + dy), ((mid[0] + mid[1]) / 2, y - 0.5), text="False: run middle blocks", color=_COLORS["middle"][1],
          ls="--")
    cb_y = by - 1.55
    box(mx - 1.9, cb_y - 0.35, 3.8, 0.7, "True: cached branch\npassthrough glue + cached / forecast residual",
        "cached", fontsize=6)
    arrow((mx, by - dy), (mx, cb_y + 0.35), color=_COLORS["cached"][1])
    box(post_x - 0.9, by - 0.35, 1.8, 0.7, "post_step\nupdate ref, ladders,\ncounters, logs", "glue", fontsize=6)
    arrow((mx + dx, by), (post_x - 0.9, by))
    arrow((mx + 1.9, cb_y), (post_x, by - 0.35), color=_COLORS["cached"][1])
    arrow((mid[1] - 0.2, y - 0.5), (post_x - 0.3, by + 0.35), text="middle outputs", color=_COLORS["middle"][1],
          ls="--")
    arrow((post_x, by + 0.35), ((bn_sp[0] + 0.2) if bn_sp else xs[-1] + w + gap + 0.3, y))

    total = sum(v["bytes"] for v in c["state"].values())
    info = (f"carries into middle: {_carries(c, 'carries_into_middle')}\n"
            f"carries out of middle: {_carries(c, 'carries_out_of_middle')}\n"
            f"state: {len(c['state'])} tensors, {_fmt_bytes(total)};  graph {report['before']['nodes']} -> "
            f"{report['after']['nodes']} nodes")
    ax.text(0.0, -3.85, _wrap(info, int(fig_w * 14)), fontsize=7, va="bottom", family="monospace")
    head = f"{title + ': ' if title else ''}chain {c['name']}  pattern {c['pattern']}  {n} blocks  " \
           f"F{report.get('fn', cut['Fn'][1] + 1)}B{report.get('bn', 0)}"
    if report.get("graph_break"):
        head += f"  ({report['graphs']} graphs: graph break)"
    ax.set_title(head, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, max(width, 40)) for line in text.splitlines())
