"""How megatron-core divides a shard's documents among the train / valid / test splits (no torch import:
the trainer's config validation uses it before anything heavy loads)."""


def empty_split(documents: int, split_weights) -> str | None:
    """The first split ("train", "valid", "test") with a positive weight that gets no documents of a
    shard holding `documents`, else None. megatron-core gives split i the documents [round(a_i n), round(b_i n))
    with a_i, b_i the cumulative normalised weights, and builds every split of positive weight, even one no
    samples are asked of; its GPTDataset loops forever on a split with no documents."""
    total, bounds = sum(split_weights), [0.0]
    for weight in split_weights:
        bounds.append(bounds[-1] + weight / total)
    for name, weight, low, high in zip(("train", "valid", "test"), split_weights, bounds, bounds[1:]):
        if weight > 0 and int(round(high * documents)) - int(round(low * documents)) == 0:
            return name
    return None


def empty_split_problem(prefix: str, documents: int, split_weights) -> str | None:
    """The message for `empty_split` (the caller puts the split field's name in front), or None."""
    name = empty_split(documents, split_weights)
    if name is None:
        return None
    return (f"{prefix} has {documents} documents, so its {name} split gets none (megatron-core would never "
            f"finish building it); use more data or give {name} weight 0")
