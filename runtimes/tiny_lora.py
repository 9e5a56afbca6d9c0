"""Tiny LoRA adapters for the tiny models, made here, so LoRA serving can be tried on a CPU vLLM.

An adapter is a directory in PEFT's format, which is what vLLM's `/v1/load_lora_adapter` and
`--lora-modules` read: `adapter_config.json` (`peft_type` LORA, rank `r`, `lora_alpha`,
`target_modules`) and `adapter_model.safetensors` holding, per layer and target,
`base_model.model.model.layers.<i>.self_attn.<target>.lora_A.weight` (rank x in) and
`...lora_B.weight` (out x rank). The weights are random but fixed by a seed, and small: the
adapter changes which tokens the tiny model picks without undoing its bias against whitespace
and end-of-sequence (`runtimes.tiny_model`), so generations still run to `max_tokens`.

It can be written to any directory (vLLM then gets that path) or into the HF cache under a repo
id, in huggingface_hub's layout like the tiny models, so that vLLM finds it by repo id offline.

    python -m runtimes.tiny_lora --dir DIR | [--hf-home DIR]   (default: HF_HOME of the settings)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes.tiny_model import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    TINY_REPOS,
    safetensors_bytes,
    write_snapshot,
)

TINY_LORA_REPO = "local/tiny-llama-lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# in and out features of the attention projections a tiny model's adapter may target
_SHAPES = {"q_proj": (HIDDEN, HEADS * HEAD_DIM), "k_proj": (HIDDEN, HEADS * HEAD_DIM),
           "v_proj": (HIDDEN, HEADS * HEAD_DIM), "o_proj": (HEADS * HEAD_DIM, HIDDEN)}


@dataclass(frozen=True)
class TinyLora:
    """One adapter: the base model it is for, the seed of its weights, its rank and targets."""

    base_repo: str = TINY_REPOS[0]
    seed: int = 1
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: int = 2  # the base model's depth (TinyModel.layers)


def adapter_config(lora: TinyLora) -> dict:
    return {
        "base_model_name_or_path": lora.base_repo, "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(lora.targets), "fan_in_fan_out": False, "inference_mode": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }


def adapter_weights(lora: TinyLora) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(lora.seed)
    tensors = {}
    for layer in range(lora.layers):
        for target in lora.targets:
            in_features, out_features = _SHAPES[target]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}."
            # A scaled delta (alpha/r * B @ A) of ~0.02 a weight: the size of the base's own
            # weights, enough to change the picks, too small to swamp the constant direction.
            tensors[prefix + "lora_A.weight"] = rng.normal(
                0.0, 0.1, size=(lora.rank, in_features)).astype(np.float32)
            tensors[prefix + "lora_B.weight"] = rng.normal(
                0.0, 0.03, size=(out_features, lora.rank)).astype(np.float32)
    return tensors


def adapter_files(lora: TinyLora) -> dict[str, bytes]:
    """The adapter's files, by name: the same adapter, the same bytes."""
    config = (json.dumps(adapter_config(lora), indent=2, sort_keys=True) + "\n").encode()
    return {ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: safetensors_bytes(adapter_weights(lora))}


def write_adapter_dir(directory: Path, lora: TinyLora) -> Path:
    """Write the adapter into `directory` (made if missing); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in adapter_files(lora).items():
        (directory / name).write_bytes(data)
    return directory


def write_adapter(hf_home: Path, repo_id: str, lora: TinyLora) -> tuple[str, bool]:
    """Put the adapter into the HF cache at `hf_home` as `repo_id`; returns (commit, whether
    anything was written). Idempotent, as `tiny_model.write_model`."""
    return write_snapshot(hf_home, repo_id, adapter_files(lora))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtimes.tiny_lora",
                                     description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dir", default=None, help="write the adapter into this directory")
    where.add_argument("--hf-home", default=None,
                       help=f"write it into this HF cache as {TINY_LORA_REPO} "
                            "(default: HF_HOME of the settings)")
    args = parser.parse_args(argv)
    if args.dir is not None:
        print(f"adapter written to {write_adapter_dir(Path(args.dir), TinyLora())}")
        return 0
    if args.hf_home is None:
        from config.settings import load_settings

        hf_home = load_settings().hf_home
    else:
        hf_home = Path(args.hf_home)
    commit, written = write_adapter(hf_home, TINY_LORA_REPO, TinyLora())
    state = "written" if written else "already there"
    print(f"{TINY_LORA_REPO}: {state} ({hf_home}, commit {commit[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
