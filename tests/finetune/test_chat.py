"""`python -m finetune.chat`: piped, it answers each line with a tiny base + adapter and reports the speed; the loop
keeps the conversation (the next prompt holds the last answer), forgets it on /reset and drops an answer abandoned
with Ctrl-C; answers print canvas by canvas, cut where evaluation cuts them; bad input is one line and exit 2."""

import os
import re
import socket
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT, assert_one_line_error, make_model

SPEED = re.compile(r"^\[(\d+) tokens \| [\d.]+ tokens/s \| (\d+) canvases \| ([\d.]+|-) steps/canvas", re.M)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tokenizer):
    """A tiny base saved as any hub model is, and a stock peft adapter (random non-zero LoRA) that names it."""
    from peft import LoraConfig, get_peft_model
    from transformers import DiffusionGemmaForBlockDiffusion

    from finetune.tiny import generation_config

    tmp = tmp_path_factory.mktemp("chat")
    base = make_model(tokenizer)
    base.generation_config = generation_config(tokenizer, base.config.canvas_length)
    base.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    base = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp / "base")  # so the adapter names it
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                                 target_modules=r"model\.decoder\.layers\.\d+\.self_attn\.(q|v)_proj"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp / "adapter")
    return tmp / "adapter"


def run_chat(*args, stdin=""):
    # one thread: a tiny model's generation is thousands of small ops, and spinning thread barriers on a shared
    # 2-core machine make it many times slower (conftest's one_thread)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE": "/nonexistent-cache-should-not-be-used",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "finetune.chat", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def piped(tiny_adapter):
    return run_chat(f"adapter={tiny_adapter}", "recipe=tiny", "eval.generation.max_denoising_steps=8",
                    stdin="reverse: hello\n/quit\nnever asked\n")


def test_piped_chat_prints_the_answer_and_its_speed_then_quits(piped):
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert piped.stdout.strip() and piped.stdout.endswith("\n")
    speeds = SPEED.findall(piped.stderr)
    assert len(speeds) == 1, piped.stderr  # one answer: nothing after /quit is read
    tokens, canvases, _ = speeds[0]
    assert int(tokens) > 0 and int(canvases) > 0


def test_piped_output_holds_only_the_answers(piped):
    """Prompt, banner and speed line stay off stdout, so a script reads the answers alone."""
    assert not piped.stdout.startswith(">") and "model:" not in piped.stdout and "tokens/s" not in piped.stdout
    assert "adapter" in piped.stderr and "model:" in piped.stderr


class Recorder:
    """A stand-in for the model: records the rendered prompts it is given and answers ANSWER-<n>."""

    def __init__(self, interrupt_at: int | None = None):
        self.prompts, self.interrupt_at = [], interrupt_at

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if len(self.prompts) == self.interrupt_at:
            raise KeyboardInterrupt
        return f"ANSWER-{len(self.prompts)}"


@pytest.fixture
def conversation(tokenizer):
    from finetune.chat import Conversation
    from finetune.config import DataSettings
    from finetune.data import Renderer

    return Conversation(Renderer(tokenizer, DataSettings()))


def test_the_next_prompt_holds_the_conversation_so_far(conversation):
    from finetune.chat import talk

    reply = Recorder()
    assert talk(["first question", "second question"], conversation, reply) == 0
    assert "first question" in reply.prompts[1] and "ANSWER-1" in reply.prompts[1]
    assert reply.prompts[1].index("ANSWER-1") < reply.prompts[1].index("second question")


def test_reset_forgets_every_earlier_turn(conversation):
    from finetune.chat import talk

    reply = Recorder()
    talk(["first question", "/reset", "second question"], conversation, reply)
    assert "first question" not in reply.prompts[1] and "ANSWER-1" not in reply.prompts[1]
    assert reply.prompts[1] == conversation.renderer.prompt_text([{"role": "user", "content": "second question"}])


def test_ctrl_c_abandons_that_answer_and_the_chat_goes_on(conversation, capsys):
    from finetune.chat import talk

    reply = Recorder(interrupt_at=1)
    assert talk(["lost question", "next question", "/quit", "never asked"], conversation, reply) == 0
    assert len(reply.prompts) == 2 and "lost question" not in reply.prompts[1]
    assert [m["content"] for m in conversation.messages] == ["next question", "ANSWER-2"]
    assert "abandoned" in capsys.readouterr().err


def test_the_prompt_is_rendered_as_evaluation_renders_it(tokenizer):
    """The chat's rendering is eval_prompts' for a row holding the same conversation, system prompt included."""
    from finetune.chat import Conversation, talk
    from finetune.config import DataSettings
    from finetune.data import Renderer, eval_prompts

    data = DataSettings(system_prompt="Answer in one word.")
    conversation, reply = Conversation(Renderer(tokenizer, data), data.system_prompt), Recorder()
    talk(["first question", "second question"], conversation, reply)
    row = {"messages": [*conversation.messages[:3], {"role": "assistant", "content": "reference"}]}
    assert reply.prompts[1] == eval_prompts([row], tokenizer, data)[0][0]
    assert "Answer in one word." in reply.prompts[1]


def test_max_new_tokens_when_unset_holds_the_longest_answer_training_kept():
    from finetune.chat import chat_generation
    from finetune.config import GenerationSettings

    assert chat_generation(GenerationSettings(), canvas_length=8, max_response_canvases=3).max_new_tokens == 24
    assert chat_generation(GenerationSettings(max_new_tokens=40), 8, 3).max_new_tokens == 40


def test_answers_print_canvas_by_canvas_and_stop_at_the_end_of_turn(tokenizer):
    """generate() puts the prompt, then each canvas: each canvas's text is written as it comes (a possible start of
    an end-of-turn marker waits for the next canvas), nothing after the end of turn is, and what was written is the
    answer kept."""
    from finetune.chat import CanvasPrinter

    written = []
    printer = CanvasPrinter(tokenizer, (tokenizer.eos_token, "<end_of_turn>"), written.append)

    def canvas(text):
        return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])

    printer.put(canvas("the prompt"))
    printer.put(canvas("abc <"))
    printer.put(canvas("de<end_of_turn>xyz"))
    printer.end()
    assert written == ["abc", " <de"] and printer.text == "abc <de" == "".join(written)


def in_process(capsys, *args):
    """`python -m finetune.chat ARGS` in this process, as a CompletedProcess-like result."""
    from finetune.chat import main

    code = main(list(args))
    captured = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def test_a_missing_adapter_is_one_line_exit_2(capsys, tmp_path):
    assert_one_line_error(in_process(capsys, f"adapter={tmp_path / 'nope'}"), "does not exist")


def test_a_directory_that_is_no_adapter_is_one_line_exit_2(capsys, tmp_path):
    assert_one_line_error(in_process(capsys, f"adapter={tmp_path}"), "holds no adapter_config.json")


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from finetune import runlock
runlock.acquire({run!r})
print("locked", flush=True)
time.sleep(600)
"""


def test_the_adapter_of_a_run_still_training_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, run=str(run))], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        (run / "adapter").mkdir()
        result = in_process(capsys, f"adapter={run / 'adapter'}")
    finally:
        proc.kill()
        proc.wait()
    assert_one_line_error(result, f"is still training (pid {proc.pid} on {socket.gethostname()})")


@pytest.mark.slow
def test_the_default_runs_adapter_answers_its_task_in_the_chat(default_run):
    """The README's piped chat on the adapter the default run trained: it renders the prompt as training and the
    evaluation do, so the adapter does its task here too (shift each letter by one). The base scores 0% on it and a
    mis-rendered prompt would too; the run's own evaluation is ~100%, so 3 of 4 leaves room for a CPU's rounding."""
    tmp, env, _ = default_run
    words = ["hello", "world", "adapt", "quick"]
    lines = "".join(f"shift: {w}\n/reset\n" for w in words) + "/quit\n"
    result = subprocess.run([sys.executable, "-m", "finetune.chat", f"adapter={tmp / 'run' / 'adapter'}"], cwd=ROOT,
                            env={**env, "OMP_NUM_THREADS": "1"}, input=lines, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    shifted = ["".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w) for w in words]  # the task, computed here
    answers = result.stdout.split()
    assert len(answers) == len(words), result.stdout
    assert sum(a == b for a, b in zip(answers, shifted)) >= 3, (answers, shifted)
    assert len(SPEED.findall(result.stderr)) == len(words)
