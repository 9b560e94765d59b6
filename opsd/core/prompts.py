"""Prompts rendered with the model's chat template: every prompt opsd renders (student, teacher, memo,
evaluation, sft, rlvr) goes through `render_prompt` (or `render_chat` for the memo's several turns), with
the command's `prompt` section (`PromptConfig`) applied alike everywhere:

  system_prompt          a system turn before the chat (none when empty: the template's own default);
  instruction            text put with the problem in its user turn, a blank line between, `before` or
                         `after` it (`instruction_position`); the teacher's user turn (problem plus its
                         privileged context) and the memo chat's first turn get it the same way;
  chat_template_kwargs   passed to `apply_chat_template`, e.g. {enable_thinking: false} for Qwen3.

With none of them set the render is what it always was: one user turn, no system turn, no options.
What the teacher's user turn says: opsd/teacher/contexts.py.

`response_text` decodes a response for grading: special tokens are dropped except the thinking delimiters
(<think>, </think>), which a tokenizer may hold as special or added tokens; the graders read only the text
after the last </think> (opsd/verifiers/answer.py), so decoding them away would hand the grader the thinking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from opsd.core.errors import UserError

THINKING_DELIMITERS = ("<think>", "</think>")
# apply_chat_template's own arguments, which opsd sets: not options of the template
RENDER_ARGUMENTS = frozenset({"conversation", "tokenize", "add_generation_prompt", "continue_final_message",
                              "return_tensors", "return_dict", "return_assistant_tokens_mask", "padding",
                              "truncation", "max_length", "tokenizer_kwargs", "chat_template", "tools", "documents"})


@dataclass(frozen=True)
class PromptConfig:
    """How a problem becomes a chat: the same for the student, the teacher, the memo and the evaluation."""

    system_prompt: str = ""  # a system turn before every chat (empty: none, the chat template's default)
    instruction: str = ""  # text put with every problem in its user turn, a blank line between (empty: none)
    instruction_position: Literal["before", "after"] = "before"  # the instruction before or after the problem
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # options of the model's chat template,
    #   e.g. {enable_thinking: false} (Qwen3: no thinking block)


PLAIN = PromptConfig()


def with_instruction(prompt: PromptConfig, instruction: str, option: str) -> PromptConfig:
    """`prompt` with the instruction given by an older key (`option`: eval's `instruction`, rlvr's
    `data.instruction`), which keeps working; both set is refused."""
    if not instruction:
        return prompt
    if prompt.instruction:
        raise UserError(f"option {option} is the older spelling of prompt.instruction: set one of them, not both")
    return PromptConfig(prompt.system_prompt, instruction, prompt.instruction_position, prompt.chat_template_kwargs)


def user_turn(message: str, prompt: PromptConfig = PLAIN) -> str:
    """The user turn of a problem's message (the problem, or the teacher's problem plus context) with the
    instruction before or after it."""
    if not prompt.instruction:
        return message
    if prompt.instruction_position == "after":
        return f"{message}\n\n{prompt.instruction}"
    return f"{prompt.instruction}\n\n{message}"


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                prompt: PromptConfig = PLAIN) -> list[int]:
    """Token ids of a chat (the system prompt put first) ending where the assistant starts answering."""
    taken = sorted(set(prompt.chat_template_kwargs) & RENDER_ARGUMENTS)
    if taken:
        raise UserError(f"prompt.chat_template_kwargs may not set {taken[0]}: opsd sets it when rendering")
    from jinja2 import TemplateError  # what a template's raise_exception raises (transformers renders with jinja2)

    system = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
    try:
        text = tokenizer.apply_chat_template(system + messages, tokenize=False, add_generation_prompt=True,
                                             **prompt.chat_template_kwargs)
    except TemplateError as err:  # e.g. a template without a system role, refusing prompt.system_prompt
        raise UserError(f"the model's chat template refused the prompt section's chat ({err})") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer: PreTrainedTokenizerBase, user_message: str, prompt: PromptConfig = PLAIN) -> list[int]:
    """Token ids of a one-turn chat ending where the assistant starts answering."""
    return render_chat(tokenizer, [{"role": "user", "content": user_turn(user_message, prompt)}], prompt)


def response_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """A response as text for grading and saving: special tokens (EOS, padding, the template's markers)
    dropped, the thinking delimiters kept whether or not the tokenizer holds them as special tokens."""
    return response_texts(tokenizer, [ids])[0]


def response_texts(tokenizer: PreTrainedTokenizerBase, ids_B: list[list[int]]) -> list[str]:
    drop = _dropped_ids(tokenizer)
    return tokenizer.batch_decode([[i for i in ids if i not in drop] for ids in ids_B], skip_special_tokens=False)


def _dropped_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids `skip_special_tokens=True` would drop (the named special tokens and the added tokens marked
    special), less the thinking delimiters."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False)}
    vocab = tokenizer.get_vocab()
    return special - {vocab[token] for token in THINKING_DELIMITERS if token in vocab}
