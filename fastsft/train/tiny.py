"""The built-in tiny model of the default job: a character-level tokenizer with a ChatML template, built offline,
and a small randomly initialised Llama that learns fastsft.train.synthetic's tasks on a CPU in minutes.

    tokenizer = tiny_tokenizer()                 # a fresh PreTrainedTokenizerFast; no download, same ids every call
    model = tiny_model(seed=0)                   # LlamaForCausalLM, 382k parameters, float32, sdpa attention
    data = prepare_dataset(synthetic_records(8000, seed=0), tokenizer, max_seq_len=128)

Tokenizer: one token per character of printable ASCII (plus "\\n"), no merges, and five special tokens with
fixed ids (below). Character-level because the tasks are about characters (reversing a word, sorting digits,
adding column by column): with one token per character a tiny model sees exactly what it must manipulate, and
decode(encode(text)) == text for any printable-ASCII text. Anything else maps to <|unk|>.

Chat template (ChatML, with BOS): <|bos|> then for each message
"<|im_start|>{role}\\n{content}<|im_end|>\\n", and with add_generation_prompt "<|im_start|>assistant\\n".
EOS is <|im_end|>, so generation stops at the end of a reply and fastsft.data trains exactly
reply + <|im_end|> in every assistant turn.
"""

from __future__ import annotations

import string
from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, IM_START, IM_END, UNK = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, BOS, IM_START, IM_END, UNK)  # ids 0-4, in this order
PAD_ID, BOS_ID, IM_START_ID, IM_END_ID, UNK_ID = range(len(SPECIAL_TOKENS))
# Printable ASCII without the rarely meaningful whitespace (\t \r \x0b \x0c), plus the newline ChatML needs.
CHARACTERS = tuple(sorted(set(string.printable) - set("\t\r\x0b\x0c")))  # 96 characters, "\n" included
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)  # 101

TINY_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@cache
def _backend_json() -> str:
    """The tokenizers-library tokenizer, serialized: built once per process (a few ms), identical every time."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # A BPE with no merges is a character-level model; no pre-tokenizer, so spaces and newlines are tokens.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.decoder = decoders.Fuse()  # concatenate characters (the default decoder joins tokens with spaces)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A new character-level tokenizer with the ChatML template (module docstring). The backend is built once
    and cached as its serialized form; every call returns a fresh object, so callers may mutate theirs."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,  # "a ." must decode to "a .", not "a."
        model_max_length=4096,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_model_config(vocab_size: int = VOCAB_SIZE) -> LlamaConfig:
    """A 2-layer Llama of 382,208 parameters (with the 101-token vocabulary) sized for the synthetic tasks.

    Why this shape: the tasks need two steps of attention (find the operand or word at the end of the
    question, then the digit or letter to output next) and little else, which is what two layers give. On
    2 CPU cores compute is the budget: this model trains at ~17-21k tokens/s; with 4 layers, at half the
    speed, the same 2 minutes left reversal and arithmetic unlearned (held-out exact match ~0.4-0.6 overall),
    with 2 layers every family is learned (~0.9). Hidden 128 as 4 heads of 32 (head_dim >= 32 keeps RoPE's
    frequencies distinct over ~128 positions); GQA with 2 KV heads, so that the default job runs the grouped
    path real models use; intermediate 352 (Llama's 8/3 of hidden, rounded to a multiple of 32); tied
    embeddings (the vocabulary is tiny, and small Llamas ship that way).
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=BOS_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
    )


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = VOCAB_SIZE) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM of `tiny_model_config`, the same weights for the same seed
    (the global torch RNG is left as it was). Generation stops at <|im_end|> and pads with <|pad|>."""
    config = tiny_model_config(vocab_size)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    return model
