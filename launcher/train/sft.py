"""Supervised fine-tuning data: JSONL records -> token ids with the prompt masked -> padded or packed rows.

Two record shapes are accepted, per line:
  Alpaca  {"instruction": ..., "input": ... (optional), "output": ...}
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}

Only the response tokens are learned: everything the model is *given* (instruction, input, system and user
turns, the assistant header) gets label -100, so the loss measures what the model must produce.

Texts are tokenized segment by segment (prompt, then response) rather than as one string, so the prompt
tokens at training time are exactly the tokens `format_prompt` gives `llaunch generate` at inference time.

Chat records use the tokenizer's own chat template when it has one. Without one, the fallback template is
documented in FALLBACK_CHAT_TEMPLATE: every turn is "<|role|>\\n{content}\\n", and an assistant turn's
content is followed by the tokenizer's EOS token, which is what the model learns to stop with.

Packing concatenates whole examples into rows of `max_length` tokens and restarts `position_ids` at 0 for
every example, with no attention_mask: transformers then builds a block-diagonal causal mask (SDPA/eager)
or uses varlen kernels (flash-attention 2), so examples in one row never attend to each other.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.errors import LaunchError

IGNORE_INDEX = -100  # the label torch's cross_entropy (and HF models) skip

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FALLBACK_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"  # assistant content ends with EOS before the newline
CHAT_ROLES = ("system", "user", "assistant")
SFT_FORMATS = ("auto", "alpaca", "chat")
ON_BAD_LINE = ("fail", "skip")

log = logging.getLogger(__name__)


@dataclass
class SFTExample:
    """One tokenized record: labels equal input_ids on response tokens and IGNORE_INDEX elsewhere."""

    input_ids: list[int]
    labels: list[int]


class BadRecord(ValueError):
    """A line that is valid JSON but not a usable SFT record; the message says why."""


def format_prompt(instruction: str, input: str = "") -> str:
    """The text a model fine-tuned on Alpaca records expects before its answer (used by generate/eval too)."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def record_segments(record: dict, tokenizer, fmt: str = "auto") -> list[tuple[str, bool]]:
    """(text, learned?) pieces of one record, in order; raises BadRecord with the reason."""
    if not isinstance(record, dict):
        raise BadRecord("the line is not a JSON object")
    if fmt == "auto":
        fmt = "chat" if "messages" in record else "alpaca"
    if fmt == "alpaca":
        return _alpaca_segments(record, tokenizer)
    if fmt == "chat":
        return _chat_segments(record, tokenizer)
    raise LaunchError(f"SFT format {fmt!r} is not one of {', '.join(SFT_FORMATS)}.")


def _alpaca_segments(record: dict, tokenizer) -> list[tuple[str, bool]]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise BadRecord(f"an Alpaca record needs a string '{key}' (keys found: {', '.join(record) or 'none'})")
    extra = record.get("input", "")
    if not isinstance(extra, str):
        raise BadRecord("'input' must be a string")
    prompt = format_prompt(record["instruction"], extra)
    return [(prompt, False), (record["output"] + _eos(tokenizer), True)]


def _chat_segments(record: dict, tokenizer) -> list[tuple[str, bool]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("a chat record needs a non-empty list 'messages'")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadRecord(f"message {i} needs a string 'content'")
        if message.get("role") not in CHAT_ROLES:
            raise BadRecord(f"message {i} has role {message.get('role')!r}, not one of {', '.join(CHAT_ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("a chat record needs at least one assistant message to learn from")
    if getattr(tokenizer, "chat_template", None):
        return _template_segments(messages, tokenizer)
    segments = []
    for m in messages:
        if m["role"] == "assistant":
            segments.append(("<|assistant|>\n", False))
            segments.append((m["content"] + _eos(tokenizer), True))
            segments.append(("\n", False))
        else:
            segments.append((FALLBACK_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]), False))
    return segments


def _template_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split the template's rendering at turn boundaries: the text each assistant turn adds is learned.

    Rendering the prefix with add_generation_prompt=True puts the assistant header on the prompt side.
    """
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            if not header.startswith(done):
                raise BadRecord("the tokenizer's chat template does not render turns as a growing prefix")
            segments.append((header[len(done):], False))
            done = header
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not full.startswith(done):
            raise BadRecord("the tokenizer's chat template does not render turns as a growing prefix")
        segments.append((full[len(done):], message["role"] == "assistant"))
        done = full
    return [(text, learned) for text, learned in segments if text]


def _eos(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise LaunchError("the tokenizer has no eos_token; SFT needs one so the model learns where answers end.")
    return tokenizer.eos_token


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer, max_length: int) -> SFTExample:
    """Token ids and labels; the first segment gets the tokenizer's special prefix (e.g. BOS), if any.

    Examples longer than max_length are cut at max_length (the end of the response is lost, never the prompt
    boundary), which the caller reports.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, learned) in enumerate(segments):
        ids = tokenizer(text, add_special_tokens=(i == 0))["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if learned else [IGNORE_INDEX] * len(ids))
    return SFTExample(input_ids[:max_length], labels[:max_length])


def load_sft_examples(path: str | Path, tokenizer, max_length: int, fmt: str = "auto",
                      on_bad_line: str = "fail") -> list[SFTExample]:
    """Read one JSONL file; a bad line names file:line and fails or is skipped (with a warning) as configured."""
    if on_bad_line not in ON_BAD_LINE:
        raise LaunchError(f"data.on_bad_line {on_bad_line!r} is not one of {', '.join(ON_BAD_LINE)}.")
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"SFT data file {path} does not exist; fix data.train_files.")
    examples, skipped, truncated = [], 0, 0
    with path.open("rb") as handle:  # lines end at b"\n" only; each is decoded on its own, so one bad byte is one bad line
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise BadRecord(f"not UTF-8 text (byte {err.start + 1} of the line)") from None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BadRecord(f"invalid JSON ({err.msg} at column {err.colno})") from None
                example = tokenize_segments(record_segments(record, tokenizer, fmt), tokenizer, max_length)
                if all(label == IGNORE_INDEX for label in example.labels[1:]):
                    raise BadRecord(f"no response token fits in max_length={max_length}")
            except BadRecord as err:
                if on_bad_line == "fail":
                    raise LaunchError(f"{path}:{lineno}: {err}; fix the line or set data.on_bad_line: skip.") from None
                log.warning("%s:%d: %s; line skipped", path, lineno, err)
                skipped += 1
                continue
            full_length = len(example.input_ids)
            truncated += full_length == max_length
            examples.append(example)
    if truncated:
        log.warning("%s: %d examples reached max_length=%d and may be cut short", path, truncated, max_length)
    if not examples:
        raise LaunchError(f"{path} holds no usable SFT record ({skipped} bad lines); see the format in the docs.")
    return examples


def pack_examples(examples: list[SFTExample], max_length: int, order: np.ndarray | None = None) -> list[list[int]]:
    """Greedy first-fit-in-order packing: lists of example indices whose lengths sum to <= max_length."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in (range(len(examples)) if order is None else order):
        n = len(examples[int(index)].input_ids)
        if current and used + n > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(int(index))
        used += n
    if current:
        rows.append(current)
    return rows


def collate_packed(examples: list[list[SFTExample]], max_length: int, pad_token_id: int) -> dict:
    """Rows of concatenated examples: position_ids restart per example and no attention_mask is returned,
    so transformers masks attention block-diagonally (it does so only without a KV cache, i.e. with
    config.use_cache=False as in training; flash-attention 2 uses the position_ids as varlen boundaries). Each example's first label is IGNORE_INDEX, so no
    token is trained to predict the start of the next, unrelated example."""
    import torch

    batch = len(examples)
    input_ids = torch.full((batch, max_length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, max_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, max_length), dtype=torch.long)
    for row, row_examples in enumerate(examples):
        start = 0
        for ex in row_examples:
            n = len(ex.input_ids)
            input_ids[row, start:start + n] = torch.tensor(ex.input_ids)
            labels[row, start:start + n] = torch.tensor(ex.labels)
            labels[row, start] = IGNORE_INDEX
            position_ids[row, start:start + n] = torch.arange(n)
            start += n
        # The padding tail is its own "sequence" (positions from 0), so it never joins the last example.
        position_ids[row, start:] = torch.arange(max_length - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def length_grouped_order(lengths: list[int], group_size: int, seed: int, epoch: int) -> np.ndarray:
    """group_by_length as HF's LengthGroupedSampler does it: a seeded shuffle, cut into mega-batches of
    50 batches, each sorted longest first, so a batch holds similar lengths (little padding) while the
    order across mega-batches stays random."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    megabatch = max(1, group_size * 50)
    chunks = [perm[i:i + megabatch] for i in range(0, len(perm), megabatch)]
    return np.concatenate([sorted(c, key=lambda i: -lengths[i]) for c in chunks]).astype(np.int64)


class SFTDataset:
    """Examples of one or more JSONL files, served as rows: packed (fixed max_length) or one example each."""

    def __init__(self, examples: list[SFTExample], max_length: int, pad_token_id: int, packing: bool,
                 seed: int = 0):
        self.examples = examples
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.packing = packing
        # Packing order is a seeded shuffle, so rows mix examples from across the file.
        order = np.random.default_rng(seed).permutation(len(examples))
        self.rows = pack_examples(examples, max_length, order) if packing else [[i] for i in range(len(examples))]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        return [sum(len(self.examples[i].input_ids) for i in row) for row in self.rows]

    @property
    def num_label_tokens(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in ex.labels) for ex in self.examples)


ROW_FIELDS = ("input_ids", "labels", "position_ids")


def row_array(examples: list[SFTExample], length: int, pad_token_id: int) -> np.ndarray:
    """One training row as a (3, length) int64 array: input_ids, labels, position_ids (see collate_packed).

    Unpacked rows are the one-example case: the padding tail restarts its positions, so no attention_mask
    is needed either way."""
    batch = collate_packed([examples], length, pad_token_id)
    return np.stack([batch[k][0].numpy() for k in ROW_FIELDS])


class SFTCorpus:
    """SFT data as the loop takes it (launcher/train/training_data.py): train/eval rows addressed by index,
    label counts for the loss normaliser, the tokenizer, and the length-grouped order on request."""

    def __init__(self, train: SFTDataset, eval: SFTDataset | None, tokenizer, tokenizer_dir: Path):
        self.train, self.eval = train, eval
        self._tokenizer = tokenizer
        self.tokenizer_dir = Path(tokenizer_dir)
        self.block_size = train.max_length

    @classmethod
    def from_config(cls, data, model_dir: str | Path | None, seq_len: int, seed: int) -> "SFTCorpus":
        from transformers import AutoTokenizer

        source = data.tokenizer_name_or_path or model_dir
        if not source or not Path(source).is_dir():
            raise LaunchError("SFT data needs a tokenizer: fine-tune a local pretrained model directory, "
                              "or set data.tokenizer_name_or_path to a local tokenizer directory.")
        tokenizer = AutoTokenizer.from_pretrained(source)
        fmt = "auto" if data.dataset_format == "jsonl" else data.dataset_format
        examples = []
        for path in data.train_files:
            examples.extend(load_sft_examples(path, tokenizer, seq_len, fmt, data.on_bad_line))
        eval_examples = []
        for path in data.eval_files:
            eval_examples.extend(load_sft_examples(path, tokenizer, seq_len, fmt, data.on_bad_line))
        if not data.eval_files and data.validation_split_percentage > 0 and len(examples) > 1:
            order = np.random.default_rng(seed).permutation(len(examples))
            n_eval = max(1, round(len(examples) * data.validation_split_percentage / 100))
            held = set(order[:n_eval].tolist())
            eval_examples = [ex for i, ex in enumerate(examples) if i in held]
            examples = [ex for i, ex in enumerate(examples) if i not in held]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train = SFTDataset(examples, seq_len, pad, data.packing, seed)
        evaluation = SFTDataset(eval_examples, seq_len, pad, data.packing, seed) if eval_examples else None
        return cls(train, evaluation, tokenizer, source)

    def tokenizer(self):
        return self._tokenizer

    def tokens(self) -> np.ndarray:
        """Every train token id in row order: what the run's data fingerprint digests."""
        return np.concatenate([self._row(self.train, i)[:2].ravel() for i in range(self.num_train)])

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_eval(self) -> int:
        return len(self.eval) if self.eval is not None else 0

    def check(self, global_batch: int) -> None:
        if self.num_train < max(1, global_batch):
            raise LaunchError(f"the SFT data gives {self.num_train} training rows, fewer than one global batch of "
                              f"{global_batch}; add records or lower the batch size.")

    def batch(self, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of ROW_FIELDS, cut after the last learned column (trim_rows)."""
        dataset = self.train if split == "train" else self.eval
        rows = trim_rows(np.stack([self._row(dataset, int(i)) for i in indices]))
        return {field: rows[:, j] for j, field in enumerate(ROW_FIELDS)}

    def label_count(self, split: str, indices: np.ndarray) -> int:
        """Tokens these rows' loss averages over (response tokens after the shift)."""
        dataset = self.train if split == "train" else self.eval
        return sum(int((self._row(dataset, int(i))[1][1:] != IGNORE_INDEX).sum()) for i in indices)

    def epoch_order(self, global_batch: int, seed: int, group_by_length: bool):
        if not group_by_length:
            return None
        lengths = self.train.lengths
        return lambda epoch: length_grouped_order(lengths, global_batch, seed, epoch)

    @staticmethod
    def _row(dataset: SFTDataset, index: int) -> np.ndarray:
        return row_array([dataset.examples[i] for i in dataset.rows[index]], dataset.max_length, dataset.pad_token_id)


def trim_rows(rows: np.ndarray, multiple_of: int = 8) -> np.ndarray:
    """Cut a (batch, 3, length) stack of rows after the last column any row learns from (rounded up).

    Loss-exact: every example ends in a learned token (its answer's EOS), and with causal attention nothing
    before a column depends on it. With group_by_length, this is what turns similar lengths into less
    padding; packed rows are full and stay as they are."""
    learned = np.flatnonzero((rows[:, 1] != IGNORE_INDEX).any(axis=0))
    if learned.size == 0:
        return rows
    keep = min(rows.shape[-1], -(-(int(learned[-1]) + 1) // multiple_of) * multiple_of)
    return np.ascontiguousarray(rows[..., :keep])
