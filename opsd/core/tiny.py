"""A tiny model and a character-level tokenizer made locally, for tests and the offline example.

Nothing is downloaded: the tokenizer is built with `tokenizers` (one token per printable character
plus ChatML-style special tokens and a chat template) and the model is a small Llama initialised
from a seed. `opsd tiny-model DIR` writes them as a Hugging Face folder.

`thinking_tokenizer` is the same characters under a thinking model's chat template: Qwen3's, written out
here from its public form (system turn, reasoning kept only after the last user turn, `enable_thinking`),
with <think> and </think> as added special tokens, so tests render and grade what users of Qwen3 load.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer(alphabet: str = string.printable) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`; unknown characters map to <unk>."""
    return _characters(SPECIAL_TOKENS, "<pad>", ["<|im_start|>"], CHAT_TEMPLATE, alphabet)


def _characters(specials: list[str], pad: str, added: list[str], template: str,
                alphabet: str) -> PreTrainedTokenizerFast:
    """A tokenizer of one token per character of `alphabet` after `specials` (<unk> for what it lacks),
    ending responses with <|im_end|>, with `added` as added special tokens and the chat `template`."""
    vocab = {token: i for i, token in enumerate(specials)}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=added)
    tokenizer.chat_template = template
    return tokenizer


# Qwen3's chat template for chats without tools (the public template's tool-call branches left out); with
# enable_thinking=false the generation prompt ends with an empty thinking block, as Qwen3's does
QWEN3_CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' -%}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
{%- endif -%}
{%- set ns = namespace(last_query_index=messages|length - 1) -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}{%- set ns.last_query_index = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{%- set content = message.content -%}
{%- set reasoning_content = '' -%}
{%- if message.reasoning_content is defined and message.reasoning_content is not none -%}
{%- set reasoning_content = message.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) -%}
{{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
{%- else -%}
{{- '<|im_start|>assistant\n' + content -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
"""
THINKING_SPECIAL_TOKENS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def thinking_tokenizer(alphabet: str = string.printable) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet` under Qwen3's chat template; <think> and </think> are added
    special tokens (dropped by `decode(..., skip_special_tokens=True)`), <|im_end|> ends a response."""
    return _characters(THINKING_SPECIAL_TOKENS, "<|endoftext|>", ["<|im_start|>", "<think>", "</think>"],
                       QWEN3_CHAT_TEMPLATE, alphabet)


def tiny_model(
    vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, intermediate_size: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama with tied embeddings (intermediate size 2×hidden unless given)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size, hidden_size, num_layers, intermediate_size))


def tiny_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, intermediate_size: int = 0) -> LlamaConfig:
    """The tiny model's architecture (its config.json)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        bos_token_id=None,
    )


def build_tiny(hidden_size: int = 64, num_layers: int = 2, seed: int = 0, alphabet: str = string.printable,
               intermediate_size: int = 0):
    """(model, tokenizer) pair, in memory."""
    tokenizer = char_tokenizer(alphabet)
    return tiny_model(len(tokenizer), hidden_size, num_layers, seed, intermediate_size), tokenizer


def save_tiny(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
              alphabet: str = string.printable, intermediate_size: int = 0) -> Path:
    """Write a tiny model + tokenizer as a folder that `from_pretrained` loads."""
    model, tokenizer = build_tiny(hidden_size, num_layers, seed, alphabet, intermediate_size)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
