"""Dataset blends: which shard prefixes a run reads, and with which weights.

    parse_blend("0.7 data/web 0.3 data/books")  -> (["data/web", "data/books"], [0.7, 0.3])

Kept free of torch and megatron-core: the config check (`pretrain.config`) parses blends before any of them is
imported, so a bad blend is reported in a fraction of a second.
"""
import os

from data_tools.errors import DataError

__all__ = ["parse_blend"]


def _as_weight(value, where: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: weight {value!r} is not a number") from None
    if not weight > 0 or weight != weight or weight == float("inf"):
        raise DataError(f"{where}: weight {value!r} must be a positive finite number")
    return weight


def _as_prefix(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: {value!r} is not a shard path prefix")
    for suffix in (".bin", ".idx"):
        if value.endswith(suffix):
            return value[: -len(suffix)]
    return value


def _looks_like_number(value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def parse_blend(blend) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights) from any accepted blend form; weights None means "by size".

    Accepted: "path/a"; "path/a path/b" (weighted by their sizes); "0.7 path/a 0.3 path/b";
    a path to a .yaml/.yml file holding one of the list forms; ["0.7", "path/a", ...];
    [[0.7, "path/a"], ...]; [{"weight": 0.7, "prefix": "path/a"}, ...].
    """
    where = "blend"
    if isinstance(blend, str):
        stripped = blend.strip()
        if stripped.endswith((".yaml", ".yml")) and os.path.isfile(stripped):
            import yaml
            try:
                with open(stripped) as stream:
                    loaded = yaml.safe_load(stream)
            except yaml.YAMLError as error:
                raise DataError(f"{stripped}: not valid YAML ({' '.join(str(error).split())})") from None
            if isinstance(loaded, dict) and "blend" in loaded:
                loaded = loaded["blend"]
            if not isinstance(loaded, (list, str)):
                raise DataError(f"{stripped}: expected a list of weight/prefix entries, found "
                                f"{type(loaded).__name__}")
            return parse_blend(loaded)
        items = stripped.split()
    elif isinstance(blend, (list, tuple)):
        items = list(blend)
    else:
        raise DataError(f"blend: expected a string or a list, found {type(blend).__name__}")
    if not items:
        raise DataError("blend is empty: name at least one shard prefix")

    if all(isinstance(item, dict) for item in items):
        prefixes, weights = [], []
        for number, item in enumerate(items):
            here = f"blend entry {number}"
            unknown = set(item) - {"weight", "prefix", "path"}
            if unknown:
                raise DataError(f"{here}: unknown keys {sorted(unknown)} (use weight and prefix)")
            if "prefix" not in item and "path" not in item:
                raise DataError(f"{here}: missing 'prefix'")
            prefixes.append(_as_prefix(item.get("prefix", item.get("path")), here))
            weights.append(_as_weight(item.get("weight", 1.0), here))
        return prefixes, weights
    if all(isinstance(item, (list, tuple)) for item in items):
        prefixes, weights = [], []
        for number, item in enumerate(items):
            here = f"blend entry {number}"
            if len(item) != 2:
                raise DataError(f"{here}: expected [weight, prefix], found {list(item)!r}")
            weights.append(_as_weight(item[0], here))
            prefixes.append(_as_prefix(item[1], here))
        return prefixes, weights
    if any(isinstance(item, (dict, list, tuple)) for item in items):
        raise DataError(f"{where}: mixes entry kinds; use one of the documented forms")
    if not any(_looks_like_number(item) for item in items):
        return [_as_prefix(item, where) for item in items], None
    if len(items) % 2:
        raise DataError(f"{where}: {len(items)} items; a weighted blend alternates weight and prefix "
                        f"(\"0.7 path/a 0.3 path/b\")")
    weights = [_as_weight(item, f"{where} item {2 * number}") for number, item in enumerate(items[0::2])]
    prefixes = [_as_prefix(item, f"{where} item {2 * number + 1}") for number, item in enumerate(items[1::2])]
    return prefixes, weights
