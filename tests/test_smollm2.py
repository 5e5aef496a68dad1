"""The SmolLM2 cache (megatron_lora.hf.smollm2) without downloading: reuse and refusal."""

import pytest

from megatron_lora.hf import smollm2


def test_a_complete_cache_is_reused_without_download(tmp_path, monkeypatch):
    def no_download(*args):
        raise AssertionError("downloaded although the cache is complete")

    monkeypatch.setattr(smollm2, "_download_gguf", no_download)
    for name in smollm2.COMPLETE:
        (tmp_path / name).write_text("{}")
    assert smollm2.fetch_smollm2(tmp_path, log=lambda m: None) == tmp_path


def test_an_incomplete_cache_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # no model: an interrupted or foreign directory
    with pytest.raises(FileExistsError, match="not a complete SmolLM2 directory"):
        smollm2.fetch_smollm2(tmp_path, log=lambda m: None)


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path / "megatron-lora" / "smollm2-135m-instruct"
