"""Training data: the built-in standard-library corpus, text folders, .npy token arrays, batches, splits."""

import numpy as np
import pytest

from train.corpus import build_stdlib_corpus, stdlib_corpus, stdlib_sources
from train.data import load_tokens, split_tokens


def test_stdlib_corpus_builds_offline_deterministically_and_is_cached(tmp_path):
    sources = stdlib_sources()
    assert sources and all(path.suffix == ".py" for path in sources[:50])
    assert not any("site-packages" in path.parts for path in sources)
    first = build_stdlib_corpus(50_000)
    assert first.dtype == np.uint8 and first.size == 50_000
    np.testing.assert_array_equal(first, build_stdlib_corpus(50_000))
    cached = stdlib_corpus(50_000, tmp_path)
    np.testing.assert_array_equal(cached, first)
    (cache_file,) = tmp_path.glob("*.npy")
    np.testing.assert_array_equal(np.load(cache_file), first)
    np.testing.assert_array_equal(stdlib_corpus(50_000, tmp_path), first)  # read back from the cache
    assert bytes(first[:2000]).decode("utf-8", errors="replace").count("\n") > 10  # it is source text


def test_text_folder_is_read_as_sorted_utf8_bytes(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("héllo")
    (tmp_path / "b" / "c.md").write_text("world")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00")
    tokens, source = load_tokens([tmp_path], vocab_size=256, corpus_bytes=1000)
    assert bytes(tokens) == "héllo\nworld\n".encode()
    assert "2 text file(s)" in source and "skipped 1" in source


def test_single_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_tokens([path], vocab_size=256, corpus_bytes=1000)


def test_npy_tokens_are_checked_against_the_vocabulary(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(1000, dtype=np.int32).reshape(10, 100) % 500)
    tokens, _ = load_tokens([path], vocab_size=500, corpus_bytes=1000)
    assert tokens.shape == (1000,) and tokens.max() == 499
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 256\)"):
        load_tokens([path], vocab_size=256, corpus_bytes=1000)
    np.save(path, np.ones(100, np.float32))
    with pytest.raises(ValueError, match="integer"):
        load_tokens([path], vocab_size=256, corpus_bytes=1000)


def test_bad_paths_and_mixtures(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokens([tmp_path / "missing.txt"], vocab_size=256, corpus_bytes=1000)
    np.save(tmp_path / "t.npy", np.zeros(10, np.int32))
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot mix"):
        load_tokens([tmp_path / "t.npy", tmp_path / "t.txt"], vocab_size=256, corpus_bytes=1000)
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        load_tokens([tmp_path / "t.txt"], vocab_size=100, corpus_bytes=1000)


def test_batches_are_a_pure_function_of_seed_and_step_and_eval_uses_the_heldout_tail():
    tokens = np.arange(10_000)
    data = split_tokens(tokens, 0.1, seq_len=16)
    assert data.train.size == 9000 and data.heldout.size == 1000
    np.testing.assert_array_equal(data.heldout, tokens[9000:])
    batch = data.batch(seed=3, step=7, batch_size=4, seq_len=16)
    assert batch.shape == (4, 17) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, data.batch(seed=3, step=7, batch_size=4, seq_len=16))
    assert not np.array_equal(batch, data.batch(seed=3, step=8, batch_size=4, seq_len=16))
    assert not np.array_equal(batch, data.batch(seed=4, step=7, batch_size=4, seq_len=16))
    evals = data.eval_batches(3, 4, 16)
    assert len(evals) == 3 and all(b.shape == (4, 17) for b in evals)
    assert all(b.min() >= 9000 for b in evals)  # only held-out tokens
    assert batch.max() < 9000  # only training tokens
    with pytest.raises(ValueError, match="--seq-len"):
        split_tokens(tokens[:100], 0.05, seq_len=16)
