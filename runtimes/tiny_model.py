"""Tiny Llama-shaped models made here, so a real vLLM can run on a CPU with no download at all.

The CPU lane of the project (`config/models.cpu.json`, the real-engine tests) needs weights that
vLLM loads as it loads any Hugging Face model, yet that can be had on a machine with no Hub: this
module writes them, deterministically, into the shared HF cache (`$HF_HOME`) in huggingface_hub's
layout (blobs, a snapshot of symlinks, `refs/main`, and the manifest our downloader leaves), under
repo ids of our choosing. vLLM then finds them by repo id with `HF_HUB_OFFLINE=1`, and the
gateway's own cache code counts them complete.

What is written, per model: a `LlamaForCausalLM` config (hidden 128, 2 heads of 64, a few layers),
bf16 safetensors of random weights (under 2 MB), and a byte-level BPE tokenizer trained here with
`tokenizers` on a fixed word list, with a chat template. The answers are noise, but every part of
the engine that the gateway drives is real: tokenizer, chat template, scheduler, sampler, guided
decoding, metrics.

One thing is not random: every embedding carries a constant component in dimension 0, which the
small random layers leave dominant, so the final hidden state always points the same way there and
column 0 of the output head acts as a per-token bias. It makes whitespace and end-of-sequence
unlikely, so plain generations run to `max_tokens` (as the sim's do) and guided JSON does not
wander in whitespace before it closes (the grammar still forces end-of-sequence at its end).

    python -m runtimes.tiny_model [--hf-home DIR]      (`make tiny-model`; DIR default: HF_HOME)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes.storage import RepoCache

# The models of config/models.cpu.json: two, so placement, eviction and swaps happen between two
# real engines.
TINY_REPOS = ("local/tiny-llama", "local/tiny-llama-2")

HIDDEN = 128
HEADS = 2
HEAD_DIM = 64
INTERMEDIATE = 256
MAX_POSITIONS = 2048
VOCAB_TARGET = 2048
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as Llama's
BOS, EOS = "<s>", "</s>"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

# The tokenizer's training text: words, digits and JSON punctuation, so that prose, numbers and
# structured output all tokenize into a few thousand merges. Fixed here, so the model never
# changes unless this module does.
_WORDS = """
the a an and or but if then else when while of to in on at by for with from into over under about
model engine token request stream server answer quick brown fox jumps lazy dog cache batch queue
latency gateway text river mountain signal window garden pixel orbit harbor lantern meadow copper
silver thunder echo vector kernel prompt hello world snow haiku write good bad yes no true false
null label score pass fail correct wrong positive negative neutral red green blue one two three
four five six seven eight nine ten time day night water fire earth air light dark small large
system user assistant tool function call result value name type object string number integer
array boolean enum required properties items minimum maximum json schema format response content
role message choice index finish reason stop length usage prompt completion total tokens
""".split()


@dataclass(frozen=True)
class TinyModel:
    """One tiny model: its repo id, the seed of its weights, and its depth."""

    repo_id: str
    seed: int
    layers: int = 2


def default_models() -> tuple[TinyModel, ...]:
    return tuple(TinyModel(repo, seed=index + 1) for index, repo in enumerate(TINY_REPOS))


# -- the tokenizer ------------------------------------------------------------------------------


def _training_text() -> list[str]:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(400):
        words = rng.choice(_WORDS, size=12)
        lines.append(" ".join(words.tolist()))
        lines.append(json.dumps({str(words[0]): str(words[1]), "score": round(float(rng.random()),
                                                                               2)}))
        lines.append(" ".join(str(n) for n in rng.integers(0, 1000, size=6)))
    return lines


def build_tokenizer() -> tuple[str, int]:
    """The tokenizer.json text and its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return tokenizer.to_str(), tokenizer.get_vocab_size()


def _biased_token_ids(tokenizer_json: str) -> list[int]:
    """Ids made unlikely: end-of-sequence and every token that is whitespace only."""
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    # Byte-level BPE spells space, tab, newline and carriage return as these characters.
    blank = set("ĠĉĊč")
    ids = [i for token, i in vocab.items() if token and set(token) <= blank]
    return sorted({*ids, SPECIAL_TOKENS.index(EOS)})


# -- the weights --------------------------------------------------------------------------------


def _bf16_bytes(array: np.ndarray) -> bytes:
    """float32 to bfloat16 (round to nearest even), as raw little-endian bytes."""
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file of bf16 tensors. Written directly (the format is an 8-byte header
    length, a JSON header, then the data) because numpy has no bfloat16 to hand to a library."""
    header: dict = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = _bf16_bytes(tensors[name])
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def build_weights(model: TinyModel, vocab: int, biased: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(model.seed)

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    embed = normal(vocab, HIDDEN)
    embed[:, 0] = 1.0  # the constant direction (see the module docstring)
    head = normal(vocab, HIDDEN, std=0.5)
    head[:, 0] = 0.0
    head[biased, 0] = -3.0  # about -20 in the logits: never picked unless a grammar says so
    tensors = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": np.ones(HIDDEN, np.float32),
        "lm_head.weight": head,
    }
    width = HEADS * HEAD_DIM
    for layer in range(model.layers):
        prefix = f"model.layers.{layer}."
        tensors.update({
            prefix + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
            prefix + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
            prefix + "self_attn.q_proj.weight": normal(width, HIDDEN),
            prefix + "self_attn.k_proj.weight": normal(width, HIDDEN),
            prefix + "self_attn.v_proj.weight": normal(width, HIDDEN),
            prefix + "self_attn.o_proj.weight": normal(HIDDEN, width),
            prefix + "mlp.gate_proj.weight": normal(INTERMEDIATE, HIDDEN),
            prefix + "mlp.up_proj.weight": normal(INTERMEDIATE, HIDDEN),
            prefix + "mlp.down_proj.weight": normal(HIDDEN, INTERMEDIATE),
        })
    return tensors


# -- the repo files and the cache ---------------------------------------------------------------


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def repo_files(model: TinyModel) -> dict[str, bytes]:
    """Every file of the model's snapshot, by name."""
    tokenizer_json, vocab_size = build_tokenizer()
    vocab = -(-vocab_size // 64) * 64  # the embedding rows, rounded up as real models do
    eos_id, bos_id = SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(BOS)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": model.layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "vocab_size": vocab, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False,
        "mlp_bias": False,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "unk_token": "<unk>", "pad_token": EOS, "model_max_length": MAX_POSITIONS,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    weights = build_weights(model, vocab, _biased_token_ids(tokenizer_json))
    return {
        "config.json": _json(config),
        "generation_config.json": _json({"bos_token_id": bos_id, "eos_token_id": eos_id}),
        "model.safetensors": safetensors_bytes(weights),
        "special_tokens_map.json": _json({"bos_token": BOS, "eos_token": EOS,
                                          "unk_token": "<unk>", "pad_token": EOS}),
        "tokenizer.json": tokenizer_json.encode(),
        "tokenizer_config.json": _json(tokenizer_config),
    }


def commit_of(files: dict[str, bytes]) -> str:
    """A 40-hex commit id from the files' names and contents: the same files, the same id."""
    digest = hashlib.sha1(usedforsecurity=False)
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def write_model(hf_home: Path, model: TinyModel) -> tuple[str, bool]:
    """Put the model into the cache at `hf_home`; returns (commit, whether anything was
    written). Idempotent: a complete snapshot of the same commit is left as it is."""
    return write_snapshot(hf_home, model.repo_id, repo_files(model))


def write_snapshot(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> tuple[str, bool]:
    """Put these files into the cache at `hf_home` as the snapshot of `repo_id`, in
    huggingface_hub's layout; returns (commit, whether anything was written)."""
    commit = commit_of(files)
    cache = RepoCache(Path(hf_home), repo_id)
    if cache.commit_for(None) == commit and cache.is_complete(None):
        return commit, False
    snapshot = cache.path / "snapshots" / commit
    cache.blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = cache.blobs / hashlib.sha256(data).hexdigest()
        if not blob.is_file() or blob.stat().st_size != len(data):
            tmp = blob.with_name(blob.name + ".incomplete")
            tmp.write_bytes(data)
            tmp.replace(blob)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    cache.write_manifest(commit, None, {name: len(data) for name, data in files.items()})
    cache.write_ref(None, commit)
    return commit, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtimes.tiny_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-home", default=None,
                        help="the HF cache to write into (default: HF_HOME of the settings)")
    args = parser.parse_args(argv)
    if args.hf_home is None:
        from config.settings import load_settings

        hf_home = load_settings().hf_home
    else:
        hf_home = Path(args.hf_home)
    for model in default_models():
        commit, written = write_model(hf_home, model)
        state = "written" if written else "already there"
        print(f"{model.repo_id}: {state} ({hf_home}, commit {commit[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
