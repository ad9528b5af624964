"""Images a folder holds twice: the same pixels in two splits, or under two classes.

A photo copied into train/ and test/ (or into one folder that the validation and test splits are then drawn
from) is scored on the test split as an image the model trained on: the accuracy reads high exactly where the
user cannot tell. Compared as decoded pixels at the training size, so a copy under another name or in another
lossless format is caught; a photo saved again as JPEG or at another size is not (its pixels differ).
"""
from __future__ import annotations

import hashlib

import numpy as np

# Split pairs in the order the warning names them: the held-out split first.
PAIRS = (("test", "train"), ("val", "train"), ("test", "val"))
EXAMPLES = 5


def duplicates(x: np.ndarray, y: np.ndarray, rows: dict, paths: list[str], log) -> dict | None:
    """What the manifest records about images found twice (None when there are none), warning about them.

    `rows` maps each split to its rows of `x`/`y`; `paths` names each row's file."""
    first: dict[bytes, dict[str, int]] = {}  # pixels -> {split: its first row with them}
    label: dict[bytes, int] = {}
    shared = {pair: 0 for pair in PAIRS}
    examples, conflicts, conflict_examples = [], 0, []
    for split in ("train", "val", "test"):
        for r in rows[split]:
            key = hashlib.blake2b(x[r].tobytes(), digest_size=16).digest()
            seen = first.setdefault(key, {})
            if key in label and label[key] != y[r]:
                conflicts += 1
                if len(conflict_examples) < EXAMPLES:
                    conflict_examples.append(f"{paths[next(iter(seen.values()))]} = {paths[r]}")
            label.setdefault(key, int(y[r]))
            for held, other in PAIRS:
                if split == held and other in seen:
                    shared[(held, other)] += 1
                    if len(examples) < EXAMPLES:
                        examples.append(f"{paths[r]} = {paths[seen[other]]}")
            seen.setdefault(split, int(r))
    if not any(shared.values()) and not conflicts:
        return None
    counted = {f"{held}_in_{other}": n for (held, other), n in shared.items()}
    trained = [(held, n) for (held, other), n in shared.items() if n and other == "train"]
    if trained:
        words = ", ".join(f"{n} {held} image(s) also in train" for held, n in trained)
        log(f"warning: {words} (the same pixels after resizing, e.g. {examples[0]}): the held-out accuracy counts "
            f"images the model has seen, so it reads high; remove the copies from one of the splits")
    if shared[("test", "val")]:
        log(f"warning: {shared[('test', 'val')]} test image(s) also in val (the same pixels after resizing): what is "
            f"chosen on validation (the accuracy guard's variant) is judged on some of the same images; remove the "
            f"copies from one of the splits")
    if conflicts:
        log(f"warning: {conflicts} image(s) are in two class folders (the same pixels, e.g. {conflict_examples[0]}): "
            f"one of their labels is wrong; keep each image under its one class")
    return {**counted, "examples": examples, "label_conflicts": conflicts, "label_conflict_examples": conflict_examples}
