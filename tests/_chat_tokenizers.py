"""Tiny tokenizers with chat templates in the styles of Llama-3, ChatML/Qwen, Mistral and Gemma, built
offline with the `tokenizers` library (no download): a BPE trained in milliseconds on a small corpus, the
family's special tokens, and a chat template written for these tests in that family's layout.

Each style also states, independently of fastsft's masking code, what a trained assistant reply must look
like in it (`reply_text`) and the header that must precede it (`reply_header`): the tests compare the
decoded trained spans against these.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "You are a helpful assistant. What is the capital of France? The capital of France is Paris.",
    "Summarize this paragraph. Translate this sentence into Spanish. Explain gradient descent simply.",
    "Write Python code to sort a list: sorted(xs). The weather tool says it is sunny and 21 degrees.",
    'hello world, thanks! Sure - here you go. 1 2 3 4 5 6 7 8 9 10 {"city": "Paris"} <tool_response>',
    string.printable,
]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen2.5-like ChatML: a default system prompt, tool results wrapped in a user turn.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Mistral-like [INST] layout: the system prompt folded into the first user turn, strict alternation, no
# generation prompt (the reply follows "[/INST]" directly), EOS closing each reply.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + '[/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Gemma-like turns: "model" for the assistant, the system prompt folded into the first user turn.
GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ChatStyle:
    name: str
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    byte_level: bool  # GPT-2 style byte-level BPE (Llama-3, Qwen) vs sentencepiece-like metaspace BPE
    add_bos_to_text: bool  # the tokenizer's post-processor prepends BOS to plain text (Llama-3, Mistral, Gemma)
    reply_header: str  # the rendered text that must end right before a trained reply
    end_of_turn: str  # the token that closes a reply (trained)

    def reply_text(self, content: str) -> str:
        """The text a trained reply must decode to."""
        if self.name in ("llama3", "gemma"):
            content = content.strip()  # these templates trim message content
        if self.name == "mistral":
            content = " " + content
        return content + self.end_of_turn


STYLES = {
    "llama3": ChatStyle(
        "llama3",
        LLAMA3_TEMPLATE,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        byte_level=True,
        add_bos_to_text=True,
        reply_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
    ),
    "chatml": ChatStyle(
        "chatml",
        CHATML_TEMPLATE,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        byte_level=True,
        add_bos_to_text=False,
        reply_header="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
    ),
    "mistral": ChatStyle(
        "mistral",
        MISTRAL_TEMPLATE,
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        bos="<s>",
        eos="</s>",
        byte_level=False,
        add_bos_to_text=True,
        reply_header="[/INST]",
        end_of_turn="</s>",
    ),
    "gemma": ChatStyle(
        "gemma",
        GEMMA_TEMPLATE,
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<end_of_turn>",
        byte_level=False,
        add_bos_to_text=True,
        reply_header="<start_of_turn>model\n",
        end_of_turn="<end_of_turn>",
    ),
}


@cache
def _backend(style_name: str) -> str:
    style = STYLES[style_name]
    if style.byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        scheme = "never" if style_name == "gemma" else "first"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
        alphabet = list(string.printable) + ["\u2581"]
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + 200, special_tokens=list(style.specials), initial_alphabet=alphabet
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if style.add_bos_to_text:
        bos_id = tok.token_to_id(style.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A", pair=f"{style.bos} $A {style.bos} $B", special_tokens=[(style.bos, bos_id)]
        )
    return tok.to_str()


def make_tokenizer(style_name: str, *, chat_template: str | None = "default") -> PreTrainedTokenizerFast:
    """A fresh HF tokenizer of the given style (`chat_template=None`: a base model's tokenizer with none)."""
    style = STYLES[style_name]
    template = style.template if chat_template == "default" else chat_template
    kwargs = {"bos_token": style.bos} if style.bos else {}
    if "<unk>" in style.specials:
        kwargs["unk_token"] = "<unk>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend(style_name)),
        eos_token=style.eos,
        additional_special_tokens=[t for t in style.specials if t not in (style.bos, style.eos, "<unk>")],
        **kwargs,
    )
    tokenizer.chat_template = template
    return tokenizer
