"""Evaluation prompt sets, read from the files users point to (nothing is bundled or downloaded).

PartiPrompts: the TSV with a header row (Prompt, Category, Challenge, Note).
GenEval: evaluation_metadata.jsonl, one {"tag", "include", "prompt", ...} object per line.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional


@dataclass
class Prompt:
    text: str
    metadata: Dict = field(default_factory=dict)


def read_partiprompts(path: str | Path) -> List[Prompt]:
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if reader.fieldnames is None or "Prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a TSV with a 'Prompt' column, got {reader.fieldnames}")
        return [Prompt(row["Prompt"].strip(), {k: v for k, v in row.items() if k != "Prompt"})
                for row in reader if row["Prompt"] and row["Prompt"].strip()]


def read_geneval(path: str | Path) -> List[Prompt]:
    path = Path(path)
    prompts = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
            if "prompt" not in row:
                raise ValueError(f"{path}:{lineno}: no 'prompt' field")
            prompts.append(Prompt(row["prompt"], {k: v for k, v in row.items() if k != "prompt"}))
    return prompts


def read_prompts(path: str | Path, limit: Optional[int] = None) -> List[Prompt]:
    """By extension: .tsv (PartiPrompts), .jsonl (GenEval), anything else one prompt per line."""
    path = Path(path)
    if path.suffix == ".tsv":
        prompts = read_partiprompts(path)
    elif path.suffix == ".jsonl":
        prompts = read_geneval(path)
    else:
        prompts = [Prompt(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts
