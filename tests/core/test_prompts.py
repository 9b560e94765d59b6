"""The `prompt` section (opsd/core/prompts.py) against Qwen3's real chat template (core/tiny.py
`thinking_tokenizer`): for a config written for Qwen3-8B, the student's, every teacher context's, the
memo's and the evaluation's prompts are exactly the strings expected, thinking on and off, with a system
prompt, with the instruction before and after the problem; with none of the keys set the render is the one
opsd always made."""

from __future__ import annotations

import pytest

from opsd.core.config import describe, dump_config, load_config
from opsd.core.data import Problem
from opsd.core.errors import UserError
from opsd.core.prompts import PromptConfig, render_prompt
from opsd.core.tiny import char_tokenizer, thinking_tokenizer
from opsd.stages.distill import DistillConfig, wording
from opsd.stages.eval import EvalConfig, eval_prompt, prompt_options
from opsd.stages.pipeline import PipelineConfig
from opsd.stages.rlvr import RLVRConfig
from opsd.stages.rlvr import prompt_options as rlvr_prompt_options
from opsd.stages.sft import SFTConfig, tokenize_pairs
from opsd.teacher.contexts import CONCISE_INSTRUCTION, CONTEXTS
from opsd.teacher.memo import memo_prompt, memo_teacher_message
from opsd.teacher.target import render_teacher_prompts

PROBLEM = Problem("p1", "What is 2+3?", "5", solution="2+3=5.")
SYSTEM = "You are a careful mathematician."
BOX = "Put your final answer within \\boxed{}."
# a config written for Qwen3-8B in thinking mode (its options written out, as a user would)
QWEN3_8B = f"""\
model:
  name_or_path: Qwen/Qwen3-8B
prompt:
  system_prompt: {SYSTEM}
  instruction: {BOX}
  instruction_position: after
  chat_template_kwargs: {{enable_thinking: true}}
"""
HEAD = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
THINK_OFF = "<think>\n\n</think>\n\n"


def text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def turn(user: str, thinking: bool = True, head: str = HEAD) -> str:
    """The whole prompt of a one-turn chat under Qwen3's template, written out by hand."""
    return f"{head}{user}<|im_end|>\n<|im_start|>assistant\n" + ("" if thinking else THINK_OFF)


@pytest.fixture(scope="module")
def tok():
    return thinking_tokenizer()


@pytest.fixture
def qwen3_8b(tmp_path):
    path = tmp_path / "qwen3-8b.yaml"
    path.write_text(QWEN3_8B)
    return path


def test_the_qwen3_template_renders_a_system_turn_and_thinking_off_as_qwen3_does(tok):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    on = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    # an earlier assistant turn loses its thinking block (Qwen3 keeps reasoning only after the last user turn)
    history = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nA"},
               {"role": "user", "content": "R"}]
    assert tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nR<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("</think>") in tok.all_special_ids


@pytest.mark.parametrize("thinking", [True, False])
def test_distill_renders_the_student_and_every_teacher_context_under_the_qwen3_config(tok, qwen3_8b, thinking):
    config = load_config(DistillConfig, qwen3_8b, [f"prompt.chat_template_kwargs.enable_thinking={str(thinking)}"])
    teacher_turns = {
        "reference": "What is 2+3?\n\nHere is a reference solution to this problem:\n2+3=5.\n\n"
                     "Having understood the reference solution, solve the problem in your own words.",
        "answer": "What is 2+3?\n\nThe correct final answer is 5. Solve the problem and reach this answer.",
        "concise": f"{CONCISE_INSTRUCTION}\n\nWhat is 2+3?",
        "template": "Problem: What is 2+3? (answer 5)",
        "memo": "What is 2+3?",
        "purified": "What is 2+3?\n\nHere is a reference solution to this problem:\n2+3=5.\n\n"
                    "Having understood the reference solution, solve the problem in your own words.",
    }
    assert set(teacher_turns) == set(CONTEXTS)
    for name, context in CONTEXTS.items():
        options = load_config(DistillConfig, qwen3_8b, [f"teacher.context={name}",
                                                        "teacher.template=Problem: {problem} (answer {answer})",
                                                        f"prompt.chat_template_kwargs.enable_thinking={thinking}"])
        prompts = render_teacher_prompts(tok, [PROBLEM], context, wording(options), options.prompt)
        assert text(tok, prompts.student[0]) == turn(f"What is 2+3?\n\n{BOX}", thinking), name
        assert text(tok, prompts.teacher[0]) == turn(f"{teacher_turns[name]}\n\n{BOX}", thinking), name
        if context.purified:
            assert text(tok, prompts.reference_only[0]) == turn(
                "Here is a reference solution to a problem:\n2+3=5.\n\nSolve the problem in your own words.\n\n"
                f"{BOX}", thinking)
    # the memo: the student's own turn, its attempt (thinking dropped by the template), the request
    asked = memo_prompt(tok, PROBLEM, "<think>\n2+3 is 5\n</think>\n\nAnswer: 5", True, "Write a memo.", config.prompt)
    assert text(tok, asked) == (
        f"{HEAD}What is 2+3?\n\n{BOX}<|im_end|>\n<|im_start|>assistant\nAnswer: 5<|im_end|>\n"
        "<|im_start|>user\nYour answer was correct. Write a memo.<|im_end|>\n<|im_start|>assistant\n"
        + ("" if thinking else THINK_OFF))
    memo_teacher = render_prompt(tok, memo_teacher_message(PROBLEM, "Add."), config.prompt)
    assert text(tok, memo_teacher) == turn(
        f"What is 2+3?\n\nA memo you wrote to yourself after an earlier attempt at this problem:\nAdd.\n\n{BOX}",
        thinking)


@pytest.mark.parametrize(("position", "user"), [("before", f"{BOX}\n\nWhat is 2+3?"),
                                                ("after", f"What is 2+3?\n\n{BOX}")])
@pytest.mark.parametrize("thinking", [True, False])
def test_eval_renders_the_instruction_before_or_after_with_thinking_on_or_off(tok, qwen3_8b, position, user,
                                                                              thinking):
    config = load_config(EvalConfig, qwen3_8b, [f"prompt.instruction_position={position}",
                                                f"prompt.chat_template_kwargs={{enable_thinking: {str(thinking)}}}"])
    assert text(tok, eval_prompt(tok, PROBLEM, prompt_options(config))) == turn(user, thinking)


def test_evals_older_instruction_key_keeps_rendering_as_before(tok):
    old = load_config(EvalConfig, None, ["instruction=Be concise."])
    assert text(tok, eval_prompt(tok, PROBLEM, prompt_options(old))) == turn("Be concise.\n\nWhat is 2+3?", head=(
        "<|im_start|>user\n"))
    after = load_config(EvalConfig, None, ["instruction=Be concise.", "prompt.instruction_position=after"])
    assert text(tok, eval_prompt(tok, PROBLEM, prompt_options(after))).startswith("<|im_start|>user\nWhat is 2+3?\n\n")
    with pytest.raises(UserError, match="instruction is the older spelling of prompt.instruction"):
        prompt_options(load_config(EvalConfig, None, ["instruction=a", "prompt.instruction=b"]))
    rlvr = load_config(RLVRConfig, None, ["data.instruction=Be concise."])
    assert rlvr_prompt_options(rlvr) == PromptConfig(instruction="Be concise.")


def test_sft_and_rlvr_render_with_their_prompt_sections(tok, qwen3_8b):
    sft = load_config(SFTConfig, qwen3_8b, ["prompt.chat_template_kwargs.enable_thinking=false"])
    (prompt, _), = tokenize_pairs([("What is 2+3?", "5")], tok, 512, sft.prompt)[0]
    assert text(tok, prompt) == turn(f"What is 2+3?\n\n{BOX}", thinking=False)
    rlvr = load_config(RLVRConfig, qwen3_8b, [])
    assert text(tok, render_prompt(tok, PROBLEM.problem, rlvr_prompt_options(rlvr))) == turn(f"What is 2+3?\n\n{BOX}")
    pipeline = load_config(PipelineConfig, None, ["eval.prompt.system_prompt=S"])
    assert pipeline.eval.prompt == PromptConfig(system_prompt="S")


def test_with_no_prompt_keys_set_the_render_is_the_one_opsd_always_made():
    tok = char_tokenizer()
    for command in (DistillConfig, EvalConfig, SFTConfig, RLVRConfig):
        assert command().prompt == PromptConfig()
    expected = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                       add_generation_prompt=True)
    assert expected == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    prompts = render_teacher_prompts(tok, [PROBLEM], CONTEXTS["concise"], wording(DistillConfig()), PromptConfig())
    assert text(tok, prompts.student[0]) == expected
    assert text(tok, eval_prompt(tok, PROBLEM, prompt_options(EvalConfig()))) == expected


def test_chat_template_kwargs_is_a_typed_mapping_in_files_overrides_help_and_dumps(tmp_path, qwen3_8b):
    config = load_config(DistillConfig, qwen3_8b, ["prompt.chat_template_kwargs.budget=3"])
    assert config.prompt.chat_template_kwargs == {"enable_thinking": True, "budget": 3}
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(DistillConfig, again, []) == config
    with pytest.raises(UserError, match="'prompt.chat_template_kwargs' must be a mapping"):
        load_config(DistillConfig, None, ["prompt.chat_template_kwargs=[enable_thinking]"])
    with pytest.raises(UserError, match="'prompt.instruction_position' must be one of 'before', 'after'"):
        load_config(EvalConfig, None, ["prompt.instruction_position=middle"])
    docs = {doc.key: doc for doc in describe(EvalConfig)}
    assert docs["prompt.chat_template_kwargs"].kind == "{KEY: VALUE,...}"
    assert "enable_thinking" in docs["prompt.chat_template_kwargs"].comment
    assert docs["prompt.system_prompt"].comment


def test_a_template_that_refuses_the_chat_or_a_reserved_option_is_one_sentence(tok):
    with pytest.raises(UserError, match="chat_template_kwargs may not set add_generation_prompt"):
        render_prompt(tok, "Q", PromptConfig(chat_template_kwargs={"add_generation_prompt": False}))
    no_system = char_tokenizer()
    no_system.chat_template = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
                               "{% endif %}{{ messages[0].content }}")
    assert text(no_system, render_prompt(no_system, "Q")) == "Q"
    with pytest.raises(UserError, match="the model's chat template refused .*System role not supported"):
        render_prompt(no_system, "Q", PromptConfig(system_prompt="S"))
