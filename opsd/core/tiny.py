"""A tiny model and a character-level tokenizer made locally, for tests and the offline example.

Nothing is downloaded: the tokenizer is built with `tokenizers` (one token per printable character
plus ChatML-style special tokens and a chat template) and the model is a small Llama initialised
from a seed. `opsd tiny-model DIR` writes them as a Hugging Face folder.
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
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


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
