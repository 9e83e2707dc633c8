"""Encoders, the interrogator, hashing, and the no-pickle rule."""

import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from gmi_core.encoders import load_encoder, save_encoder, tiny_encoder
from gmi_core.errors import EncoderUnavailable
from gmi_core.hashing import sha256_file, short_hash
from gmi_core.interrogator import Interrogator, load_vocabulary

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_encoder_is_deterministic_and_unit_norm(tmp_path):
    images = [Image.new("RGB", (64, 64), (i * 60, 20, 200 - i * 50)) for i in range(3)]
    a, b = tiny_encoder(seed=3), tiny_encoder(seed=3)
    feats = a.encode_images(images)
    assert torch.equal(feats, b.encode_images(images))
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.equal(feats, tiny_encoder(seed=4).encode_images(images))
    path = save_encoder(a, tmp_path / "enc.safetensors")
    loaded = load_encoder(str(path))
    assert loaded.encoder_id == a.encoder_id and torch.equal(loaded.encode_texts(["a cat"]), a.encode_texts(["a cat"]))


def test_missing_weights_offline_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(EncoderUnavailable) as info:
        load_encoder("ViT-B-32", "openai", search_dirs=[tmp_path / "models" / "clip"])
    message = str(info.value)
    assert "ViT-B-32 (openai)" in message and "open_clip_model.safetensors" in message
    assert str(tmp_path / "models" / "clip") in message and "ViT-B-32-openai.safetensors" in message


def test_weights_found_in_a_model_folder(tmp_path):
    folder = tmp_path / "clip"
    save_encoder(tiny_encoder(seed=1), folder / "tiny.safetensors")
    assert load_encoder("tiny.safetensors", search_dirs=[folder]).encoder_id == "gmi-tiny-clip-s1"


def test_interrogator_ranks_labels_by_encoder_similarity(tmp_path):
    encoder = tiny_encoder(seed=0)
    interrogator = Interrogator(encoder, cache_dir=tmp_path)
    vocab = load_vocabulary()
    assert sum(len(v) for v in vocab.values()) >= 300
    target = vocab["subject"][17]
    query = encoder.encode_texts([target])  # a query that is exactly one label's embedding
    ranked = interrogator.rank_labels(query)
    assert ranked["subject"][0].label == target
    sims = [s.similarity for s in ranked["style"]]
    assert sims == sorted(sims, reverse=True)
    expected = encoder.encode_texts(vocab["style"]) @ query[0]
    assert ranked["style"][0].label == vocab["style"][int(expected.argmax())]
    assert target in interrogator.prompt_from_features(query)
    assert list(tmp_path.glob("labels--gmi-tiny-clip-s0--*.safetensors")), "label embeddings cached on disk"


def test_label_cache_is_reused(tmp_path, monkeypatch):
    encoder = tiny_encoder(seed=0)
    Interrogator(encoder, cache_dir=tmp_path).label_embeddings()
    fresh = Interrogator(encoder, cache_dir=tmp_path)
    monkeypatch.setattr(encoder, "encode_texts", lambda texts: pytest.fail("cache not used"))
    assert set(fresh.label_embeddings()) == set(load_vocabulary())


def test_sha256_cache_and_short_hash(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 3000)
    cache = tmp_path / "hashes.json"
    expected = hashlib.sha256(b"x" * 3000).hexdigest()
    assert sha256_file(path, cache) == expected and short_hash(expected) == expected[:10]
    entry = json.loads(cache.read_text())[str(path.resolve())]
    entry["sha256"] = "0" * 64
    cache.write_text(json.dumps({str(path.resolve()): entry}))
    assert sha256_file(path, cache) == "0" * 64, "unchanged size and mtime: the cache answers"
    path.write_bytes(b"y" * 3000)
    os.utime(path, ns=(1, 1))
    assert sha256_file(path, cache) == hashlib.sha256(b"y" * 3000).hexdigest()


def test_engine_source_has_no_pickle_loading_and_no_host_imports():
    for path in (ROOT / "gmi_core").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"torch\.load\(|import pickle|pickle\.load|weights_only", text), path
        assert not re.search(r"^\s*(import|from)\s+(comfy|folder_paths|modules|nodes|server)\b", text, re.M), path


def test_no_unpickling_on_build_and_identify(tiny_world, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    gmi = tiny_world.gmi(spec_root=tmp_path / "specs", prompt_set=tiny_world.prompt_set.head(2))
    source = tiny_world.source()
    assert len(gmi.build(source, tiny_world.generator()).built) == 4
    query = tiny_world.generator().generate(source.list_checkpoints().checkpoints[0], "a fox", [3], tiny_world.settings)
    assert len(gmi.identify(query, source=source).ranking) == 4
