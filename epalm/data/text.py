"""Text formats of eP-ALM (docs/model.md, "Loss and text"): QA and caption strings, tokenisation and label masks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from epalm.locations import looks_local

ANSWER_TOKEN = "</a>"
IGNORE_INDEX = -100  # torch's cross_entropy ignore_index default (the model's loss skips these labels)


def build_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the OPT tokenizer (hub id or local dir) and add the `</a>` answer separator.

    As in the original, `</a>` is an extra special token whose id falls inside OPT's padded
    embedding matrix (50265 < 50272), so the embedding is never resized.
    """
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        # from_pretrained would say "Repo id must be in the form 'repo_name'...", which hides the cause
        raise FileNotFoundError(f"tokenizer directory not found: {name_or_path}")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": [ANSWER_TOKEN]})
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no pad token; OPT's uses <pad>")
    return tokenizer


def format_qa(question: str, answer: str | None, eos_token: str, double_question_mark: bool = False) -> str:
    """`question</a>answer</s>` for training, `question</a>` for generation (answer=None).

    The original appended "?" to questions that already end in "?" ("...??</a>"); set
    `double_question_mark` to reproduce that for parity with its released checkpoints.
    """
    question = question.strip()
    if double_question_mark:
        question = question + "?"
    if answer is None:
        return question + ANSWER_TOKEN
    return question + ANSWER_TOKEN + answer.strip() + eos_token


def format_caption(caption: str | None, eos_token: str) -> str:
    """`caption</s>` for training; the empty string (BOS only) for generation."""
    return "" if caption is None else caption.strip() + eos_token


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise with BOS prepended (OPT's tokenizer does it), padded to the longest, no truncation.

    Training pads right as the original; batched generation must pad left.
    """
    enc = tokenizer(texts, padding="longest", return_tensors="pt", padding_side=padding_side)
    return enc["input_ids"], enc["attention_mask"]


def build_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_token_id: int | None = None,
    answer_only: bool = False,
) -> torch.Tensor:
    """Labels for the causal-LM loss: input ids with padding set to IGNORE_INDEX.

    With `answer_only`, every token up to and including `</a>` is ignored too, so only the
    answer and EOS are learnt (the original trains on the question as well).
    """
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if answer_only:
        if answer_token_id is None:
            raise ValueError("answer_only needs the id of the </a> token")
        is_sep = input_ids == answer_token_id
        if not bool(is_sep.any(dim=1).all()):
            raise ValueError("answer_only: some sequences have no </a> separator")
        # positions at or before the first </a>
        before = is_sep.long().cumsum(dim=1) == 0
        labels = labels.masked_fill(before | is_sep, IGNORE_INDEX)
    return labels
