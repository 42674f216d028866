"""The questions asked of a model for a benchmark's rows: circular rotations of multiple-choice options and the
prompt texts (docs/benchmarks.md)."""

import dataclasses
import re

from vlm_jax.benchmarks.tsv import BenchmarkRow
from vlm_jax.errors import InputError

# MMBench's released files hold each circular copy of question i as index i + k * 1e6 (VLMEvalKit's
# mcq_circular_eval groups rows by index % 1e6 unless the file has a g_index column).
CIRCULAR_OFFSET = 1_000_000

# LLaVA's instructions (llava/eval/model_vqa_mmbench.py with --single-pred-prompt, as its MMBench script runs it;
# the VQAv2 / GQA / TextVQA question files of its evaluation for the open one).
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
VQA_INSTRUCTION = "Answer the question using a single word or phrase."


def mc_prompt(row: BenchmarkRow) -> str:
    """The multiple-choice question as LLaVA's MMBench evaluation words it: the hint (when there is one) on the line
    before the question, one "A. text" line per option, then MC_INSTRUCTION. The caller adds the image marker."""
    if not row.options:
        raise InputError(f"{row.where}: a multiple-choice prompt needs options (columns A, B, ...); this row has none")
    lines = [row.hint] if row.hint else []
    return "\n".join(lines + [row.question] + [f"{k}. {v}" for k, v in row.options.items()] + [MC_INSTRUCTION])


def vqa_prompt(row: BenchmarkRow) -> str:
    """The open question as LLaVA's VQAv2 / GQA / TextVQA evaluation words it: the question, then VQA_INSTRUCTION on
    its own line (a hint, when the file has one, on the line before the question)."""
    lines = [row.hint] if row.hint else []
    return "\n".join(lines + [row.question, VQA_INSTRUCTION])


def circular_rotations(row: BenchmarkRow) -> list[BenchmarkRow]:
    """The row asked once per rotation of its options, as VLMEvalKit's CIRCULAR tool makes MMBench's copies:
    rotation k puts the option texts k letters earlier (A gets B's text, ..., the last letter A's) and moves the
    answer letter with its text. A row whose options name other options' letters ("Both A and B", or an option that is
    a bare letter) is left as one question, as VLMEvalKit leaves it: rotating it would change its meaning."""
    if not row.options:
        raise InputError(f"{row.where}: circular evaluation needs options (columns A, B, ...); this row has none")
    letters, texts = list(row.options), list(row.options.values())
    if _names_letters(row.options):
        return [dataclasses.replace(row, group=row.index)]
    rotated = []
    for k in range(len(letters)):
        options = {letter: texts[(j + k) % len(letters)] for j, letter in enumerate(letters)}
        answers = tuple(letters[(letters.index(a) - k) % len(letters)] for a in row.answers)
        rotated.append(dataclasses.replace(row, options=options, answers=answers, group=row.index, rotation=k))
    return rotated


def _names_letters(options: dict[str, str]) -> bool:
    """VLMEvalKit's `abnormal_entry`: an option that is a bare option letter, or whose words (split at anything but
    letters) name two option letters or more."""
    for text in options.values():
        if text in options:
            return True
        if len({w for w in re.sub(r"[^A-Za-z ]", " ", text).split() if w in options}) > 1:
            return True
    return False


def questions(rows: list[BenchmarkRow], circular: bool) -> list[BenchmarkRow]:
    """The questions to ask for `rows`, each with `group` (the original question's index) and `rotation` set.
    Without `circular`, every row once. With it, a file that already holds circular copies (MMBench's released
    TSVs: a g_index column, or copies at index + k * CIRCULAR_OFFSET) is asked as it is, a copy's rotation being its
    place in its group; a file without copies is asked once per rotation of each row's options
    (`circular_rotations`)."""
    if not circular:
        return [dataclasses.replace(r, group=r.index, rotation=0) for r in rows]
    groups: dict[int | str, list[BenchmarkRow]] = {}
    for r in rows:
        groups.setdefault(_group_of(r), []).append(r)
    if all(len(g) == 1 for g in groups.values()):
        return [q for r in rows for q in circular_rotations(r)]
    rotation = {}
    for key, members in groups.items():
        main = [r for r in members if r.index == key]
        if not main:
            raise InputError(f"{members[0].where}: index {members[0].index} is a circular copy of index {key}, "
                             f"which no row has")
        copies = sorted((r for r in members if r.index != key), key=lambda r: (isinstance(r.index, str), r.index))
        rotation.update({r.where: k for k, r in enumerate(main + copies)})
    return [dataclasses.replace(r, group=_group_of(r), rotation=rotation[r.where]) for r in rows]


def _group_of(row: BenchmarkRow) -> int | str:
    if row.group is not None:
        return row.group
    return row.index % CIRCULAR_OFFSET if isinstance(row.index, int) else row.index
