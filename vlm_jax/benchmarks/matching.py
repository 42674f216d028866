"""Scoring one prediction: VLMEvalKit's rule-based option matching, and VQAv2's answer normalisation and soft
accuracy (docs/benchmarks.md)."""

import re

# VLMEvalKit's can_infer_option (vlmeval/utils/matching_util.py): a reply holding one of these is a refusal, wrong
# whatever else it says.
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_LETTER_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
# VLMEvalKit's rule as released: case-blind and with no word boundary, so "the answer is a dog" names option A.
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def extract_option(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text reply names, by VLMEvalKit's `can_infer` (no LLM judge): exactly one option
    letter among the reply's words (split at spaces and .()[],:;!*#{}) and among its last four words; else "answer
    is X"; else exactly one option text inside the reply (case-blind, for a reply at most twice as long as all the
    option texts together). None when nothing matches, the reply is a refusal, or it names no option but says "Z"
    (VLMEvalKit's own answer for "none of them")."""
    if any(refusal in prediction for refusal in _REFUSALS):
        return None
    words = prediction.translate(_LETTER_SEPARATORS).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and "Z" in words:
        return None
    said = _ANSWER_IS.search(prediction)
    if said and said.group(1).upper() in options:
        return said.group(1).upper()
    text = prediction.lower()
    if len(text) > 2 * sum(len(v) for v in options.values()):
        return None
    found = [letter for letter, option in options.items() if option.lower() in text]
    return found[0] if len(found) == 1 else None


# The official VQA evaluation (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py), also VLMEvalKit's
# process_answer (vlmeval/dataset/utils/vqa_eval.py).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" means a look-behind but is a look-ahead that always holds, so a full stop
# after a digit ("2.") goes too; VLMEvalKit's corrected pattern keeps that one. Here the official behaviour.
_FULL_STOP = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The official table maps each of these written with any one apostrophe left out back to it ("dont" -> "don't",
# "couldnt've" and "couldn'tve" -> "couldn't've"). Its capitalised keys ("Im") never match the lower-cased words and
# its identities ("let's") change nothing, so they are not here.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've").split()
_CONTRACTIONS = {word[:i] + word[i + 1:]: word for word in _CONTRACTED for i, c in enumerate(word) if c == "'"}
# The official table has this one backwards; kept, so that answers normalise as they do there.
_CONTRACTIONS["somebody'd"] = "somebodyd"


def normalize_vqa_answer(text: str) -> str:
    """An answer in the official VQA evaluation's normal form: newlines and tabs as spaces, punctuation removed (or
    made a space between words), full stops not before a digit removed, lower case, number words as digits,
    articles dropped, contractions written with their apostrophes."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if glued or p + " " in text or " " + p in text else " ")
    words = [_NUMBER_WORDS.get(w, w) for w in _FULL_STOP.sub("", out).lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2's soft accuracy: for each reference answer left out in turn, min(1, (how many of the others equal the
    prediction) / 3), averaged over the leave-one-out subsets; prediction and answers both normalised by
    `normalize_vqa_answer`. Of VQAv2's 10 answers, 4 or more matching score 1, 3 score 0.9, 2 score 0.6, 1 scores
    0.3."""
    if len(answers) < 2:
        raise ValueError(f"VQA soft accuracy needs several reference answers (VQAv2 has 10), got {len(answers)}")
    said = normalize_vqa_answer(prediction)
    same = [normalize_vqa_answer(a) == said for a in answers]
    return sum(min(1.0, (sum(same) - hit) / 3) for hit in same) / len(same)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the prediction equals any reference answer, both normalised by `normalize_vqa_answer`, else 0.0."""
    said = normalize_vqa_answer(prediction)
    return float(any(normalize_vqa_answer(a) == said for a in answers))
