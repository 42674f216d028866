"""The chat command (vlm_jax/cli/chat.py) over vlm_jax/inference.py's Assistant: a trained workdir answers with its
own config, tokenizer and image preprocessing; answers stream as they decode and equal the library's; batches,
multi-turn chats, sampling seeds and stop strings behave as a user expects; bad input is one error line."""

import io
import json
import sys

import pytest
from PIL import Image, ImageDraw

from vlm_jax.cli import chat
from vlm_jax.data.conversation import GPT, HUMAN
from vlm_jax.inference import Assistant
from vlm_jax.sampling import Sampling

NEW = 6
pytestmark = pytest.mark.usefixtures("loaded_once")


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> tuple[str, str, str]:
    """(a workdir trained 2 steps, a non-square image file, a second one)."""
    root = tmp_path_factory.mktemp("chat")
    paths = []
    for n, (size, colour) in enumerate([((80, 48), (220, 40, 40)), ((40, 64), (30, 90, 210))]):
        image = Image.new("RGB", size, (250, 250, 250))
        ImageDraw.Draw(image).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=colour)
        paths.append(str(root / f"image{n}.png"))
        image.save(paths[-1])
    return tiny_run, *paths


def _chat(argv: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    chat.main(argv)
    return capsys.readouterr().out


def _expected(workdir: str, prompts: list[tuple[list, list[str]]], **kw) -> list:
    assistant = Assistant.load(workdir)
    return assistant.generate([assistant.prompt(turns, [Image.open(p).convert("RGB") for p in images])
                               for turns, images in prompts], max_new_tokens=NEW, **kw)


def test_a_question_is_answered_as_the_library_answers_it_and_streams_the_same_text(run, capsys):
    workdir, image, _ = run
    [want] = _expected(workdir, [([(HUMAN, "What is in the image?")], [image])])
    assert 0 < len(want.tokens) <= NEW
    argv = ["--workdir", workdir, "--image", image, "--max_new_tokens", str(NEW), "What is in the image?"]
    line = json.loads(_chat(argv + ["--json"], capsys))
    assert line == dict(tokens=want.tokens, text=want.text)
    assert _chat(argv, capsys) == want.text + "\n"  # streamed piece by piece, the same text in the end
    step = json.loads(_chat(["--workdir", f"{workdir}@2"] + argv[2:] + ["--json"], capsys))
    assert step == line


def test_a_batch_from_a_jsonl_file_equals_its_prompts_asked_alone(run, capsys, tmp_path):
    workdir, image, other = run
    prompts = [([(HUMAN, "Describe the image.")], [image]),
               ([(HUMAN, "What colour is it?"), (GPT, "red"), (HUMAN, "And its shape?")], [other]),
               ([(HUMAN, "Say hi.")], [])]
    file = tmp_path / "prompts.jsonl"
    file.write_text("\n".join(json.dumps(dict(turns=t, images=p)) if p else json.dumps(dict(question=t[0][1]))
                              for t, p in prompts) + "\n")
    alone = [_expected(workdir, [p])[0] for p in prompts]
    out = _chat(["--workdir", workdir, "--prompts", str(file), "--json", "--max_new_tokens", str(NEW)], capsys)
    assert [json.loads(line) for line in out.splitlines()] == [dict(tokens=c.tokens, text=c.text) for c in alone]


def test_an_interactive_chat_keeps_the_conversation_and_its_image(run, capsys, monkeypatch):
    workdir, image, _ = run
    out = _chat(["--workdir", workdir, "--image", image, "--max_new_tokens", str(NEW)], capsys,
                "What is it?\nWhat colour?\n\n", monkeypatch)
    [first] = _expected(workdir, [([(HUMAN, "What is it?")], [image])])
    [second] = _expected(workdir, [([(HUMAN, "What is it?"), (GPT, first.text), (HUMAN, "What colour?")], [image])])
    assert out == f"{first.text}\n{second.text}\n"


def test_sampling_repeats_with_its_seed_and_a_stop_string_ends_the_answer(run, capsys):
    workdir, image, _ = run
    question = [([(HUMAN, "Describe it.")], [image])]
    sampling = Sampling(temperature=1.5, top_k=50)
    a, b, c = (_expected(workdir, question, sampling=sampling, seed=s)[0] for s in (3, 3, 4))
    assert a == b and a.tokens != c.tokens
    argv = ["--workdir", workdir, "--image", image, "--max_new_tokens", str(NEW), "--json", "Describe it."]
    assert json.loads(_chat(argv + ["--temperature", "1.5", "--top_k", "50", "--seed", "3"], capsys)) == dict(
        tokens=a.tokens, text=a.text)
    [greedy] = _expected(workdir, question)
    assert len(greedy.text) > 2
    stop = greedy.text[1:3]
    cut = json.loads(_chat(argv + ["--stop", stop], capsys))
    assert cut["text"] == greedy.text.split(stop)[0].strip() and stop not in cut["text"]


def test_bad_input_is_one_error_line(run, capsys, tmp_path):
    workdir, image, _ = run
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(question="fine")) + "\n{not json\n")
    for argv, message in [
            (["--image", str(tmp_path / "missing.png"), "hi"], "image file not found"),
            (["--prompts", str(bad)], f"{bad} line 2: JSONDecodeError"),
            (["--image", image, "--image", image, "<image> one marker"], "1 <image> markers for 2 images")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            chat.main(["--workdir", workdir, *argv])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert done.value.code == 1 and last.startswith("error: ") and message in last and "Traceback" not in err, err
    with pytest.raises(SystemExit) as done:
        chat.main(["--workdir", f"{workdir}@7", "hi"])
    assert done.value.code == 1 and "has no checkpoint 7 (have [2])" in capsys.readouterr().err
