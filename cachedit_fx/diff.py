"""What the passes do to a model's graph, as a JSON-able report (the ``cachedit-fx diff`` command)."""
from __future__ import annotations

from collections import Counter

import torch

from .capture import capture, clone_graph_module
from .config import DBCacheConfig
from .passes.patterns import Unmatched, analyze
from .passes.rewrite import rewrite


def load_model(name: str):
    from .testing import zoo

    return zoo.build_transformer(name)


def _val(node):
    return node.meta.get("example_value", node.meta.get("val"))


def _ops(gm) -> Counter:
    return Counter(n.op for n in gm.graph.nodes)


def _carry(node, role: str) -> dict:
    v = _val(node)
    return {"name": node.name, "role": role, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}


def describe(transformer, inputs: dict, fn: int = 1, bn: int = 0, separate_cfg: bool = False) -> dict:
    gm, example = capture(transformer, kwargs=inputs)
    before = {"nodes": len(gm.graph.nodes), "ops": dict(_ops(gm))}
    found = analyze(gm)
    if isinstance(found, Unmatched):
        return {"matched": False, "reason": found.reason, "before": before}
    work = clone_graph_module(gm)
    infos = analyze(work)
    cfg = DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn)
    with torch.no_grad():
        chains = rewrite(work, infos[:1], cfg, None, 2 if separate_cfg else 1)
    report = {"matched": True, "before": before,
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
    lines = [f"before: {report['before']['nodes']} nodes {report['before']['ops']}"]
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
