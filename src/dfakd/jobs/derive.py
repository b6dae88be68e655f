"""``dfakd derive``: a search result (or, for the fixed baselines, the pair in the config) -> an aggregation
file (METHOD.md section 3)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dfakd import models
from dfakd.errors import DfakdError
from dfakd.files import check_output_file, read_json
from dfakd.methods import aggregation as agg_mod
from dfakd.methods.base import match_groups


def check_search_document(doc: Any, path: Path) -> dict[str, Any]:
    """The full shape of a ``search.json``: teacher name, groups with spatial size, layer names and one
    finite alpha per layer."""

    def bad(what: str) -> DfakdError:
        return DfakdError(f"{path} is not a search.json from `dfakd search`: {what}")

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    if not isinstance(doc.get("teacher"), str) or not models.is_available(doc["teacher"]):
        raise bad(f"'teacher' is {doc.get('teacher')!r}, not a model of the zoo")
    groups = doc.get("groups")
    if not isinstance(groups, list) or not groups:
        raise bad("'groups' must be a non-empty list")
    spatials = []
    for n, g in enumerate(groups):
        where = f"groups[{n}]"
        if not isinstance(g, dict):
            raise bad(f"{where} is not an object")
        spatial, layers, alpha = g.get("spatial"), g.get("layers"), g.get("alpha")
        if isinstance(spatial, bool) or not isinstance(spatial, int) or spatial < 1:
            raise bad(f"{where}.spatial is {spatial!r}, not a positive integer")
        if not isinstance(layers, list) or not layers or not all(isinstance(v, str) and v for v in layers):
            raise bad(f"{where}.layers must be a non-empty list of layer names")
        if len(set(layers)) != len(layers):
            raise bad(f"{where}.layers names a layer twice")
        if not isinstance(alpha, list) or len(alpha) != len(layers):
            raise bad(f"{where}.alpha must be a list of {len(layers)} numbers, one per layer")
        if not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a >= 0
            for a in alpha
        ):
            raise bad(f"{where}.alpha must hold finite non-negative numbers, got {alpha!r}")
        if sum(alpha) <= 0:
            raise bad(f"{where}.alpha sums to 0")
        spatials.append(spatial)
    if len(set(spatials)) != len(spatials):
        raise bad("two groups have the same spatial size")
    return doc


def derive(cfg: dict[str, Any], search_path: str | Path | None, out: str | Path) -> agg_mod.Aggregation:
    mode, tau, k = cfg["derive"]["mode"], cfg["derive"]["tau"], cfg["derive"]["k"]
    check_output_file(out, "aggregation file (-o)")
    if mode in agg_mod.SEARCHED_MODES:
        if not search_path:
            raise DfakdError(
                f"derive mode {mode!r} needs --search SEARCH_JSON "
                f"(fixed modes: {', '.join(agg_mod.FIXED_MODES)})"
            )
        search_path = Path(search_path)
        doc = check_search_document(read_json(search_path, "search result"), search_path)
        result = agg_mod.from_search(doc, mode, tau, k, source=str(search_path))
    else:
        teacher_arch, student_arch = cfg["teacher"]["arch"], cfg["model"]["arch"]
        if not teacher_arch:
            raise DfakdError(
                f"derive mode {mode!r} needs config key 'teacher.arch' (and model.arch, the student)"
            )
        pairs = match_groups(models.build(teacher_arch, 10), models.build(student_arch, 10))
        result = agg_mod.fixed(teacher_arch, pairs, mode, seed=cfg["seed"])
    result.save(out)
    return result
