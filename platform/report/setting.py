"""What a group's runs were run under, from their MLflow params and tags: the online setting
(issue 15) named in the group's header, and the class orders that ran (issue 14)."""

from __future__ import annotations

import json
from collections import defaultdict

from clgrid.report.aggregate import Group
from clgrid.tracking.schema import CLASS_ORDER


def setting(group: Group) -> str:
    """"online (batch 10), boundaries hidden, blurry (disjoint 0.5, blur 0.1)", or "" for the offline,
    announced-boundary setting. Each part is named when any of the group's runs has it (the runs of a
    group may differ, e.g. a grid over `train.online`)."""
    runs = [t.params for t in group.trials]
    parts = []
    online = sorted({p.get("train.batch_size", "?") for p in runs if p.get("train.online") == "True"}, key=str)
    if online:
        parts.append(f"online (one pass, batch {', '.join(online)})")
    if any(p.get("benchmark.boundaries") == "hidden" for p in runs):
        parts.append("boundaries hidden")
    blurry = sorted({(p["benchmark.blurry.disjoint"], p.get("benchmark.blurry.blur", "?"))
                     for p in runs if "benchmark.blurry.disjoint" in p})
    if blurry:
        parts.append("blurry (" + "; ".join(f"disjoint {d}, blur {b}" for d, b in blurry) + ")")
    return ", ".join(parts)


def class_orders(group: Group) -> list[tuple[str, list[str]]]:
    """(class order, the seeds that ran it) for each distinct order the group's runs logged, most
    seeds first; empty when no run logged one (runs from before `clgrid.class_order`)."""
    seeds: dict[str, set[str]] = defaultdict(set)
    for t in group.trials:
        if CLASS_ORDER in t.tags:
            seeds[_order_text(t.tags[CLASS_ORDER])].add(t.seed)
    return sorted(((order, sorted(s, key=lambda x: (len(x), x))) for order, s in seeds.items()),
                  key=lambda item: (-len(item[1]), item[0]))


def _order_text(tag: str) -> str:
    """The order as "3 1 4 ...", or per experience "3 1 / 4 0 / ..." when the tag's JSON groups the
    classes by experience; a tag that is not a JSON list is shown as it is."""
    try:
        value = json.loads(tag)
    except ValueError:
        return tag
    if not isinstance(value, list):
        return tag

    def classes(e) -> str:
        return " ".join(map(str, e)) if isinstance(e, list) else str(e)

    return (" / " if any(isinstance(e, list) for e in value) else " ").join(map(classes, value))
