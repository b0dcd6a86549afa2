"""A base with a model's architecture and tokenizer but seeded random weights, for timing where
the weights cannot go (a GPU machine with no hub, reached with a size limit on what travels).

Serving and training take as long with these weights as with the real ones wherever the work
does not depend on what the model says: the serving benchmarks ignore EOS, so every request
generates the tokens it asks for. Quality figures from such a base mean nothing.

    python -m fedprefix.simulations.random_base SKELETON OUT

SKELETON is a model folder without its weights: config.json and the tokenizer's files (the
chat template with them), a few MB where the weights are hundreds.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SKELETON_FILES = ("config.json", "generation_config.json", "chat_template.jinja")  # besides tokenizer*


def skeleton_files(folder: Path) -> list[Path]:
    """The files of a model folder that describe it without its weights."""
    return sorted(p for p in folder.iterdir() if p.name in SKELETON_FILES or p.name.startswith("tokenizer"))


def write_random_base(skeleton: Path, out: Path, seed: int = 0) -> Path:
    """`out`: a model folder loadable by load_base, with `skeleton`'s architecture and tokenizer."""
    if not (skeleton / "config.json").is_file():
        raise SystemExit(f"{skeleton} has no config.json: give a model folder (its weights may be left out)")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(skeleton), dtype=torch.float32)
    model.save_pretrained(out)  # writes config.json and the weights
    for path in skeleton_files(skeleton):
        if path.name != "config.json":
            shutil.copy2(path, out / path.name)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("skeleton", type=Path, help="a model folder's config.json and tokenizer files")
    parser.add_argument("out", type=Path, help="where to write the model folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_random_base(args.skeleton, args.out, args.seed))


if __name__ == "__main__":
    main()
