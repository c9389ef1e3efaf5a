"""Token data for training: loading (built-in corpus, text, ``.npy``), the held-out split, and batches.

A training batch is a pure function of ``(seed, step)``: ``batch_size`` random windows of
``seq_len + 1`` tokens from the training split, drawn with ``numpy.random.default_rng([seed, step])``.
A run resumed at step s therefore sees exactly the batches it would have seen without stopping.
Evaluation uses fixed windows spread evenly over the held-out split (the last ``holdout`` fraction
of the tokens), the same at every evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib

import numpy as np

from train.corpus import stdlib_corpus

BYTE_VOCAB = 256


@dataclasses.dataclass(frozen=True)
class TokenData:
    """A token stream split into a training part and a held-out part.

    Attributes:
      train: integer ``[N_train]`` tokens.
      heldout: integer ``[N_heldout]`` tokens (the stream's last tokens).
      source: a short description of where the tokens came from.
    """

    train: np.ndarray
    heldout: np.ndarray
    source: str

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """int32 ``[batch_size, seq_len + 1]`` windows of the training split for ``step``.

        The model reads ``[:, :-1]`` and predicts ``[:, 1:]``.
        """
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.train.size - seq_len, size=batch_size)
        return _windows(self.train, starts, seq_len + 1)

    def eval_batches(self, num_batches: int, batch_size: int, seq_len: int) -> list[np.ndarray]:
        """``num_batches`` int32 ``[batch_size, seq_len + 1]`` held-out batches, evenly spaced."""
        count = num_batches * batch_size
        starts = np.linspace(0, self.heldout.size - seq_len - 1, count).astype(np.int64)
        windows = _windows(self.heldout, starts, seq_len + 1)
        return [windows[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return np.stack([tokens[start:start + length] for start in starts]).astype(np.int32)


def load_tokens(paths, *, vocab_size: int, corpus_bytes: int, cache_dir=None) -> tuple[np.ndarray, str]:
    """The token stream for ``--data`` (empty: the built-in standard-library corpus).

    Args:
      paths: text files, folders (every non-hidden file under it, sorted, that is valid UTF-8), or
        ``.npy`` integer token arrays (flattened); text and ``.npy`` cannot be mixed.
      vocab_size: the model's vocabulary; text needs 256 (bytes), ``.npy`` values must be below it.
      corpus_bytes: the built-in corpus cap.
      cache_dir: the built-in corpus cache folder.

    Returns:
      ``(tokens [N], description)``.

    Raises:
      FileNotFoundError: a path does not exist (named).
      ValueError: no data, a named file is not UTF-8 text, a ``.npy`` is not integer or has values
        outside ``[0, vocab_size)``, or byte data for a model with fewer than 256 tokens.
    """
    paths = [pathlib.Path(path) for path in paths]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"--data: {str(path)!r} does not exist")
    arrays = [path for path in paths if path.is_file() and path.suffix == ".npy"]
    if arrays and len(arrays) != len(paths):
        raise ValueError("--data: cannot mix .npy token arrays with text files or folders")
    if arrays:
        tokens = np.concatenate([_load_token_array(path, vocab_size) for path in arrays])
        return tokens, f"{tokens.size:,} tokens from {', '.join(map(str, arrays))}"
    if vocab_size < BYTE_VOCAB:
        raise ValueError(f"byte-level text data needs a model vocab_size >= {BYTE_VOCAB}, got {vocab_size} "
                         "(use a .npy token array, or --model.vocab_size=256)")
    if not paths:
        tokens = stdlib_corpus(corpus_bytes, cache_dir)
        return tokens, f"{tokens.size:,} bytes of the Python standard library's sources (built-in corpus)"
    chunks, files, skipped = [], 0, []
    for path in paths:
        if path.is_dir():
            for file in _files_under(path):
                content = file.read_bytes()
                if _is_utf8(content):
                    chunks.append(content + b"\n")
                    files += 1
                else:
                    skipped.append(file)
        else:
            content = path.read_bytes()
            if not _is_utf8(content):
                raise ValueError(f"--data: {str(path)!r} is not UTF-8 text (pass token arrays as .npy)")
            chunks.append(content + b"\n")
            files += 1
    tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    note = f" (skipped {len(skipped)} non-UTF-8 files)" if skipped else ""
    return tokens, f"{tokens.size:,} bytes from {files} text file(s){note}"


def _files_under(folder: pathlib.Path) -> list[pathlib.Path]:
    files = []
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files.extend(pathlib.Path(parent) / name for name in names if not name.startswith("."))
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


def _is_utf8(content: bytes) -> bool:
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _load_token_array(path: pathlib.Path, vocab_size: int) -> np.ndarray:
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"--data: cannot read {str(path)!r} as a numpy array: {error}") from None
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"--data: {str(path)!r} must hold integer token ids, got dtype {tokens.dtype}")
    tokens = tokens.reshape(-1)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"--data: {str(path)!r} holds token ids in [{tokens.min()}, {tokens.max()}], "
                         f"outside the model's vocabulary [0, {vocab_size})")
    return tokens


def split_tokens(tokens: np.ndarray, holdout: float, seq_len: int, source: str = "") -> TokenData:
    """Holds out the last ``ceil(holdout * N)`` tokens; both parts must fit a ``seq_len + 1`` window.

    Raises:
      ValueError: a part is shorter than ``seq_len + 2`` tokens (naming ``--holdout`` / ``--seq-len``).
    """
    held = math.ceil(tokens.size * holdout)
    train, heldout = tokens[:tokens.size - held], tokens[tokens.size - held:]
    for name, part in (("training", train), ("held-out", heldout)):
        if part.size < seq_len + 2:
            raise ValueError(f"the {name} split has {part.size} tokens, fewer than --seq-len + 2 = {seq_len + 2} "
                             f"({tokens.size} tokens in all, --holdout {holdout}): use more data, a smaller "
                             "--seq-len or another --holdout")
    return TokenData(train=train, heldout=heldout, source=source)


def load_data(config, *, vocab_size: int, seq_len: int) -> TokenData:
    """The :class:`TokenData` of a :class:`~train.config.TrainConfig`."""
    tokens, source = load_tokens(config.data, vocab_size=vocab_size, corpus_bytes=config.corpus_bytes,
                                 cache_dir=config.cache_dir)
    return split_tokens(tokens, config.holdout, seq_len, source)
