"""Prompts rendered with the model's chat template: every prompt opsd renders (student, teacher, memo,
evaluation) goes through `render_prompt`. What the teacher's user turn says: opsd/teacher/contexts.py.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def render_prompt(tokenizer: PreTrainedTokenizerBase, user_message: str) -> list[int]:
    """Token ids of a one-turn chat ending where the assistant starts answering."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]
