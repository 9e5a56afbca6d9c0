"""The tiny LoRA adapters: PEFT's format for the tiny model, deterministic, in a directory or the
HF cache (a real vLLM loading and serving one is in tests/contract/test_lora_contract.py)."""

from __future__ import annotations

import json
import struct

from runtimes.storage import RepoCache, snapshot_complete
from runtimes.tiny_lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TINY_LORA_REPO,
    TinyLora,
    adapter_files,
    main,
    write_adapter,
    write_adapter_dir,
)
from runtimes.tiny_model import HIDDEN


def _header(weights: bytes) -> dict:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8:8 + length])


def test_a_peft_lora_of_rank_8_on_q_and_v():
    files = adapter_files(TinyLora())
    config = json.loads(files[ADAPTER_CONFIG])
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["bias"] == "none"
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "local/tiny-llama"
    header = _header(files[ADAPTER_WEIGHTS])
    names = sorted(k for k in header if k != "__metadata__")
    assert len(names) == 2 * 2 * 2  # layers x targets x (A, B)
    a = header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = header["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert a["shape"] == [8, HIDDEN] and b["shape"] == [HIDDEN, 8] and a["dtype"] == "BF16"
    end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    assert 8 + struct.unpack("<Q", files[ADAPTER_WEIGHTS][:8])[0] + end == len(
        files[ADAPTER_WEIGHTS])


def test_deterministic_and_seeded():
    assert adapter_files(TinyLora(seed=3)) == adapter_files(TinyLora(seed=3))
    assert adapter_files(TinyLora(seed=3)) != adapter_files(TinyLora(seed=4))
    big = adapter_files(TinyLora(rank=16))
    assert json.loads(big[ADAPTER_CONFIG])["r"] == 16
    assert _header(big[ADAPTER_WEIGHTS])[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]["shape"] == [16, HIDDEN]


def test_written_to_a_directory_and_to_the_hf_cache(tmp_path):
    directory = write_adapter_dir(tmp_path / "adapter", TinyLora())
    assert sorted(p.name for p in directory.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    commit, written = write_adapter(tmp_path / "hf", TINY_LORA_REPO, TinyLora())
    assert written and len(commit) == 40
    assert write_adapter(tmp_path / "hf", TINY_LORA_REPO, TinyLora()) == (commit, False)
    assert snapshot_complete(tmp_path / "hf", TINY_LORA_REPO)
    snapshot = RepoCache(tmp_path / "hf", TINY_LORA_REPO).snapshot_dir(None)
    assert (snapshot / ADAPTER_CONFIG).is_symlink()
    assert (snapshot / ADAPTER_WEIGHTS).read_bytes() == (directory / ADAPTER_WEIGHTS).read_bytes()


def test_command_line(tmp_path, capsys):
    assert main(["--dir", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / ADAPTER_WEIGHTS).is_file()
    assert main(["--hf-home", str(tmp_path / "hf")]) == 0
    assert main(["--hf-home", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert f"{TINY_LORA_REPO}: written" in out and f"{TINY_LORA_REPO}: already there" in out
