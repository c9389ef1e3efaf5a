"""Synthetic long-context tasks as byte tokens: passkey retrieval, multi-query associative recall, needle in a
haystack, and copying.

Every task is a frozen dataclass with three pure methods:

- ``example(length, rng) -> Example``: one sequence of exactly ``length`` byte tokens (vocab 256,
  ASCII text) that ends with its answer;
- ``solve(prompt) -> answer``: the reference solver, which parses the prompt text in Python; it
  solves every example, which is what shows that the tasks are solvable from the prompt alone;
- ``answer_len`` / ``min_length``: tokens per answer, shortest sequence the task fits in.

:func:`make_batch` stacks seeded examples into a :class:`TaskBatch`, :func:`mixture_batch` mixes
tasks row by row for training, and :func:`exact_match` scores predicted answers.

Sources: passkey retrieval as in Mohtashami & Jaggi 2023 ("Landmark Attention", the filler text
and the "What is the pass key?" question); multi-query associative recall (MQAR) as in Arora et
al. 2023 ("Zoology": key-value pairs, then queries of keys answered by their values); needle in a
haystack as in Kamradt 2023 and RULER (Hsieh et al. 2024: a fact at a chosen depth of a haystack,
with distractor facts of other keys); copying as in Jelassi et al. 2024 ("Repeat After Me").
"""

from __future__ import annotations

import dataclasses
import re
import string

import numpy as np

PASSKEY_FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
                  "There and back again. ")
HAYSTACK_SENTENCES = ("A red fox runs far. ", "Old trees grow tall. ", "The river meets the sea. ",
                      "Birds sing at dawn. ", "Snow falls on the hills. ", "A ship sails west. ",
                      "The wind is cold. ", "Bread bakes in the oven. ", "Stars shine at night. ",
                      "The cat sleeps here. ", "Rain taps the roof. ", "A lamp lights the room. ")
MQAR_SEPARATOR = "| "
COPY_ALPHABET = string.ascii_lowercase + string.digits


@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
    """One task sequence.

    Attributes:
      tokens: int32 ``[T]`` byte tokens; the answer is ``tokens[answer_start:answer_start + len(answer)]``.
      answer_start: where the answer (the last tokens of the sequence) begins.
      answer: int32 ``[A]``, the answer's tokens.
      supervised: bool ``[T]``: the answer tokens of the sequence (for MQAR also the values of the
        queries before the last one), the tokens an answer-only loss trains on.
    """

    tokens: np.ndarray
    answer_start: int
    answer: np.ndarray
    supervised: np.ndarray

    @property
    def prompt(self) -> np.ndarray:
        """int32 ``[answer_start]``: everything before the answer."""
        return self.tokens[:self.answer_start]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskBatch:
    """``N`` examples of one task, all of the same length.

    Attributes:
      task: the task's name.
      tokens: int32 ``[N, T]``.
      answer_start: int32 ``[N]``.
      answer_len: ``A``, tokens per answer.
      answers: int32 ``[N, A]``.
      supervised: bool ``[N, T]`` (see :class:`Example`).
    """

    task: str
    tokens: np.ndarray
    answer_start: np.ndarray
    answer_len: int
    answers: np.ndarray
    supervised: np.ndarray


def encode(text: str) -> np.ndarray:
    """int32 byte tokens of ASCII ``text``."""
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """The text of byte tokens (bytes past 127 become ``U+FFFD``)."""
    return bytes(int(token) for token in np.asarray(tokens).reshape(-1)).decode("ascii", errors="replace")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_depth(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0.0 <= value <= 1.0):
        raise ValueError(f"depth must be None or a number in [0, 1], got {value!r}")


def _digits(rng: np.random.Generator, count: int) -> str:
    """A random decimal number of exactly ``count`` digits (no leading zero)."""
    first = str(rng.integers(1, 10))
    return first + "".join(str(digit) for digit in rng.integers(0, 10, size=count - 1))


def _letters(rng: np.random.Generator, count: int) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), size=count))


def _filler(sentences: tuple[str, ...], size: int, rng: np.random.Generator, *, cycle: bool) -> str:
    """``size`` characters of filler sentences, cut from a random offset of a long enough stream.

    With ``cycle`` the sentences repeat in order (the passkey filler); otherwise each one is drawn
    at random.
    """
    longest = max(len(sentence) for sentence in sentences)
    count = (size + longest) // min(len(sentence) for sentence in sentences) + 1
    if cycle:
        first = int(rng.integers(0, len(sentences)))
        order = [sentences[(first + i) % len(sentences)] for i in range(count)]
    else:
        order = [sentences[i] for i in rng.integers(0, len(sentences), size=count)]
    stream = "".join(order)
    offset = int(rng.integers(0, longest))
    return stream[offset:offset + size]


def _insert(text: str, pieces: list[str], depths: list[float]) -> str:
    """``text`` with each piece inserted at the sentence boundary nearest to its depth.

    A boundary is the start of the text, its end, or a position right after ``". "``. Depth 0
    puts the piece first, depth 1 last; pieces keep their order when they share a boundary.
    """
    boundaries = [0] + [match.end() for match in re.finditer(r"\. ", text)] + [len(text)]
    boundaries = sorted(set(boundaries))
    chosen = [min(boundaries, key=lambda position: (abs(position - depth * len(text)), position)) for depth in depths]
    out, last = [], 0
    for position, piece in sorted(zip(chosen, pieces), key=lambda pair: pair[0]):
        out += [text[last:position], piece]
        last = position
    return "".join(out) + text[last:]


def _example(prompt: str, answer: str, supervised_spans: list[tuple[int, int]], length: int) -> Example:
    text = prompt + answer
    if len(text) != length:
        raise AssertionError(f"built {len(text)} tokens for length {length}")
    supervised = np.zeros(length, dtype=bool)
    for start, stop in supervised_spans + [(len(prompt), length)]:
        supervised[start:stop] = True
    return Example(tokens=encode(text), answer_start=len(prompt), answer=encode(answer), supervised=supervised)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PasskeyTask:
    """Passkey retrieval: ``The pass key is 68079. `` hidden in repeated filler, asked at the end.

    The sequence is filler (the five sentences of Mohtashami & Jaggi, repeating, cut at a random
    offset) with the needle at a sentence boundary near ``depth``, then ``What is the pass key?
    The pass key is `` and the digits.

    Attributes:
      digits: digits of the pass key (the answer length), >= 1.
      depth: where the needle sits in the filler, in [0, 1] (0: first); None draws it uniformly.
    """

    digits: int = 5
    depth: float | None = None

    name = "passkey"
    question = "What is the pass key? The pass key is "

    def __post_init__(self):
        _check_int("digits", self.digits, 1)
        _check_depth(self.depth)

    @property
    def answer_len(self) -> int:
        return self.digits

    @property
    def min_length(self) -> int:
        return len(self._needle("0" * self.digits)) + len(self.question) + self.digits

    @staticmethod
    def _needle(key: str) -> str:
        return f"The pass key is {key}. "

    def example(self, length: int, rng: np.random.Generator) -> Example:
        """One example of exactly ``length`` tokens (see :func:`make_batch`)."""
        key = _digits(rng, self.digits)
        needle = self._needle(key)
        depth = float(rng.uniform()) if self.depth is None else self.depth
        filler = _filler(PASSKEY_FILLER, length - self.min_length, rng, cycle=True)
        return _example(_insert(filler, [needle], [depth]) + self.question, key, [], length)

    def solve(self, prompt) -> np.ndarray:
        """The digits that follow the first ``The pass key is `` of the prompt."""
        match = re.search(r"The pass key is (\d+)\. ", decode(prompt))
        return encode(match.group(1)[:self.digits])


@dataclasses.dataclass(frozen=True, kw_only=True)
class MQARTask:
    """Multi-query associative recall: key-value pairs, then queries of their keys.

    ``ab42 kq07 zx93 ... | kq07 ab42 zx`` + ``93``: ``num_pairs`` records ``key value `` (distinct
    keys of ``key_len`` lowercase letters, values of ``value_len`` digits), spaces up to the
    separator ``| ``, then ``num_queries`` distinct keys of the context, each followed by its value.
    The last query's value is the answer; the values of the earlier queries are supervised too
    (Zoology trains on every query), and sit in the prompt at evaluation.

    Attributes:
      num_queries: queries per sequence, >= 1.
      num_pairs: key-value pairs; None fits as many as the length allows (at least ``num_queries``).
      key_len: letters per key, >= 1.
      value_len: digits per value (the answer length), >= 1.
    """

    num_queries: int = 4
    num_pairs: int | None = None
    key_len: int = 2
    value_len: int = 2

    name = "mqar"

    def __post_init__(self):
        _check_int("num_queries", self.num_queries, 1)
        _check_int("key_len", self.key_len, 1)
        _check_int("value_len", self.value_len, 1)
        if self.num_pairs is not None:
            _check_int("num_pairs", self.num_pairs, self.num_queries)
            if self.num_pairs > 26 ** self.key_len:
                raise ValueError(f"num_pairs must be at most 26 ** key_len = {26 ** self.key_len}, "
                                 f"got {self.num_pairs}")

    @property
    def answer_len(self) -> int:
        return self.value_len

    @property
    def _record(self) -> int:
        return self.key_len + self.value_len + 1

    @property
    def min_length(self) -> int:
        pairs = self.num_queries if self.num_pairs is None else self.num_pairs
        return (pairs + self.num_queries) * self._record + len(MQAR_SEPARATOR) - 1

    def pairs_for(self, length: int) -> int:
        """The key-value pairs of a sequence of ``length`` tokens."""
        if self.num_pairs is not None:
            return self.num_pairs
        fit = (length - len(MQAR_SEPARATOR) + 1) // self._record - self.num_queries
        return min(fit, 26 ** self.key_len)

    def example(self, length: int, rng: np.random.Generator) -> Example:
        """One example of exactly ``length`` tokens (see :func:`make_batch`)."""
        pairs = self.pairs_for(length)
        codes = rng.choice(26 ** self.key_len, size=pairs, replace=False)
        keys = ["".join(string.ascii_lowercase[code // 26 ** i % 26] for i in range(self.key_len)) for code in codes]
        values = ["".join(str(digit) for digit in rng.integers(0, 10, size=self.value_len)) for _ in keys]
        context = "".join(f"{key}{value} " for key, value in zip(keys, values))
        gap = length - (pairs + self.num_queries) * self._record - len(MQAR_SEPARATOR) + 1
        prompt = context + " " * gap + MQAR_SEPARATOR
        spans = []
        asked = rng.choice(pairs, size=self.num_queries, replace=False)
        for index in asked[:-1]:
            prompt += keys[index]
            spans.append((len(prompt), len(prompt) + self.value_len))
            prompt += values[index] + " "
        prompt += keys[asked[-1]]
        return _example(prompt, values[asked[-1]], spans, length)

    def solve(self, prompt) -> np.ndarray:
        """The value that the context gives the prompt's last key."""
        text = decode(prompt)
        context, _, queries = text.partition(MQAR_SEPARATOR)
        table = dict(re.findall(rf"([a-z]{{{self.key_len}}})(\d{{{self.value_len}}}) ", context))
        return encode(table[queries[-self.key_len:]])


@dataclasses.dataclass(frozen=True, kw_only=True)
class NeedleTask:
    """Needle in a haystack: ``The code of kqz is 4821. `` among varied sentences and distractor codes.

    The haystack draws sentences at random from :data:`HAYSTACK_SENTENCES` (cut at a random
    offset); the needle sits at a sentence boundary near ``depth``, ``distractors`` facts of other
    keys at random depths; the question is ``What is the code of kqz? The code of kqz is ``.

    Attributes:
      digits: digits of the code (the answer length), >= 1.
      key_len: letters of the key word, >= 1.
      distractors: needles of other keys, >= 0.
      depth: the needle's depth in [0, 1]; None draws it uniformly.
    """

    digits: int = 4
    key_len: int = 3
    distractors: int = 1
    depth: float | None = None

    name = "needle"

    def __post_init__(self):
        _check_int("digits", self.digits, 1)
        _check_int("key_len", self.key_len, 1)
        _check_int("distractors", self.distractors, 0)
        _check_depth(self.depth)
        if self.distractors >= 26 ** self.key_len:
            raise ValueError(f"distractors must be below 26 ** key_len = {26 ** self.key_len}, got {self.distractors}")

    @property
    def answer_len(self) -> int:
        return self.digits

    @property
    def min_length(self) -> int:
        key, code = "a" * self.key_len, "0" * self.digits
        return (1 + self.distractors) * len(self._needle(key, code)) + len(self._question(key)) + self.digits

    @staticmethod
    def _needle(key: str, code: str) -> str:
        return f"The code of {key} is {code}. "

    @staticmethod
    def _question(key: str) -> str:
        return f"What is the code of {key}? The code of {key} is "

    def example(self, length: int, rng: np.random.Generator) -> Example:
        """One example of exactly ``length`` tokens (see :func:`make_batch`)."""
        keys = []
        while len(keys) < 1 + self.distractors:
            key = _letters(rng, self.key_len)
            if key not in keys:
                keys.append(key)
        codes = [_digits(rng, self.digits) for _ in keys]
        depth = float(rng.uniform()) if self.depth is None else self.depth
        depths = [depth] + [float(value) for value in rng.uniform(size=self.distractors)]
        haystack = _filler(HAYSTACK_SENTENCES, length - self.min_length, rng, cycle=False)
        text = _insert(haystack, [self._needle(key, code) for key, code in zip(keys, codes)], depths)
        return _example(text + self._question(keys[0]), codes[0], [], length)

    def solve(self, prompt) -> np.ndarray:
        """The code the haystack gives the key that the question asks about."""
        text = decode(prompt)
        key = re.search(r"What is the code of ([a-z]+)\? The code of \1 is $", text).group(1)
        return encode(re.search(rf"The code of {key} is (\d+)\. ", text).group(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyTask:
    """Copying: a random string of letters and digits and ``|``, repeated with period ``distance``.

    ``qh3kwpz8|qh3kwpz8|qh3kw`` + ``pz``: every token after the first period repeats the token
    ``distance`` positions before it, and all of them are supervised. A tiny model learns it within
    a few hundred steps, most likely with a relative-position head (the distance is fixed), so
    the task measures whether a sparse layout or a KV selection keeps the one far key that head
    reads; the retrieval tasks need content-based induction (find the key, copy what follows),
    which takes far longer to learn.

    Attributes:
      answer_tokens: tokens of the answer (the end of the sequence), >= 1.
      distance: the period (the string's length + 1), at least ``answer_tokens + 1``; None: ``3/4``
        of the sequence (beyond a window of half of it).
    """

    answer_tokens: int = 5
    distance: int | None = None

    name = "copy"

    def __post_init__(self):
        _check_int("answer_tokens", self.answer_tokens, 1)
        if self.distance is not None:
            _check_int("distance", self.distance, self.answer_tokens + 1)

    @property
    def answer_len(self) -> int:
        return self.answer_tokens

    @property
    def min_length(self) -> int:
        return (self.answer_tokens + 1 if self.distance is None else self.distance) + self.answer_tokens

    def distance_for(self, length: int) -> int:
        """The copy distance in a sequence of ``length`` tokens."""
        if self.distance is not None:
            return self.distance
        return max(self.answer_tokens + 1, min(length - self.answer_tokens, 3 * length // 4))

    def example(self, length: int, rng: np.random.Generator) -> Example:
        """One example of exactly ``length`` tokens (see :func:`make_batch`)."""
        distance = self.distance_for(length)
        period = "".join(rng.choice(list(COPY_ALPHABET), size=distance - 1)) + "|"
        text = (period * -(-length // distance))[:length]
        return _example(text[:-self.answer_tokens], text[-self.answer_tokens:], [(distance, length)], length)

    def solve(self, prompt) -> np.ndarray:
        """The continuation of the period that the prompt's first ``|`` closes."""
        text = decode(prompt)
        period = text.partition("|")[0] + "|"
        return encode("".join(period[(len(text) + i) % len(period)] for i in range(self.answer_tokens)))


Task = PasskeyTask | MQARTask | NeedleTask | CopyTask
TASKS = {"passkey": PasskeyTask, "mqar": MQARTask, "needle": NeedleTask, "copy": CopyTask}


def default_tasks() -> tuple[Task, ...]:
    """Passkey (5 digits), MQAR (2-letter keys, 2-digit values, 4 queries), needle (4 digits, 1 distractor),
    copy (5 tokens, distance 3/4 of the sequence)."""
    return (PasskeyTask(), MQARTask(), NeedleTask(), CopyTask())


def _check_length(task: Task, length) -> None:
    _check_int("length", length, 1)
    if length < task.min_length:
        raise ValueError(f"length must be >= {task.min_length} for {task!r}, got {length}")


def make_batch(task: Task, num_examples: int, length: int, seed: int) -> TaskBatch:
    """``num_examples`` examples of ``task``, each of ``length`` tokens, a pure function of its arguments.

    Example ``i`` is drawn with ``np.random.default_rng([seed, i])``, so a batch is the prefix of
    any larger batch of the same seed.

    Raises:
      ValueError: ``num_examples`` < 1, ``length`` below ``task.min_length`` (both named).
    """
    _check_int("num_examples", num_examples, 1)
    _check_length(task, length)
    examples = [task.example(length, np.random.default_rng([seed, index])) for index in range(num_examples)]
    return TaskBatch(task=task.name, tokens=np.stack([example.tokens for example in examples]),
                     answer_start=np.array([example.answer_start for example in examples], dtype=np.int32),
                     answer_len=task.answer_len, answers=np.stack([example.answer for example in examples]),
                     supervised=np.stack([example.supervised for example in examples]))


def mixture_batch(tasks: tuple[Task, ...], batch_size: int, length: int, seed: int, step: int):
    """A training batch mixing ``tasks`` row by row (row ``i`` holds task ``(i + step) % len(tasks)``).

    Row ``i`` is drawn with ``np.random.default_rng([seed, step, i])``: the batch of a step is a
    pure function of ``(tasks, batch_size, length, seed, step)``.

    Returns:
      ``(tokens int32 [B, T], supervised bool [B, T], task_index int32 [B])``: ``task_index`` is each
      row's position in ``tasks``.

    Raises:
      ValueError: an empty ``tasks``, ``batch_size`` < 1, ``length`` too short for a task.
    """
    if not tasks:
        raise ValueError("tasks must name at least one task, got none")
    _check_int("batch_size", batch_size, 1)
    for task in tasks:
        _check_length(task, length)
    task_index = (np.arange(batch_size, dtype=np.int32) + step) % len(tasks)
    rows = [tasks[index].example(length, np.random.default_rng([seed, step, row]))
            for row, index in enumerate(task_index)]
    return np.stack([row.tokens for row in rows]), np.stack([row.supervised for row in rows]), task_index


def reference_answers(task: Task, batch: TaskBatch) -> np.ndarray:
    """int32 ``[N, A]``: the reference solver's answer to each prompt of ``batch``."""
    return np.stack([task.solve(tokens[:start]) for tokens, start in zip(batch.tokens, batch.answer_start)])


def exact_match(predicted, answers) -> np.ndarray:
    """bool ``[N]``: whether each predicted answer equals the true one token for token.

    Args:
      predicted: int ``[N, A']`` with ``A' >= A`` (only the first ``A`` tokens count).
      answers: int ``[N, A]``.

    Raises:
      ValueError: not both rank 2, different ``N``, or fewer predicted tokens than ``A``.
    """
    predicted, answers = np.asarray(predicted), np.asarray(answers)
    if predicted.ndim != 2 or answers.ndim != 2 or predicted.shape[0] != answers.shape[0]:
        raise ValueError(f"predicted [N, A'] and answers [N, A] must share N, got shapes {predicted.shape} and "
                         f"{answers.shape}")
    if predicted.shape[1] < answers.shape[1]:
        raise ValueError(f"predicted must hold at least A={answers.shape[1]} tokens per row, got {predicted.shape[1]}")
    return np.all(predicted[:, :answers.shape[1]] == answers, axis=1)
