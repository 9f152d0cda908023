"""Chat templates and token-exact response masks.

A record becomes `input_ids` plus a boolean `trained` mask over the same tokens: `trained[t]` says token t is
a response token, i.e. a target the loss supervises (the batch builder turns that into shifted labels).

How the mask is found without `{% generation %}` markers: render growing prefixes of the conversation with
the tokenizer's own chat template and diff the token ids. For the assistant turn at message i:

    before = tokens(render(messages[:i], add_generation_prompt=True))   # ... <assistant header>
    upto   = tokens(render(messages[:i + 1]))                            # ... <assistant header> reply <eot>
    full   = tokens(render(messages))

`upto` must be a prefix of `full` (the template renders a turn the same way whatever follows it), and the
response is `upto[lcp(before, upto):]`: everything the model has to produce after the prompt, including the
end-of-turn token (so it learns to stop). Template whitespace after that end-of-turn token (ChatML's and
Gemma's "\\n") is not part of the reply and is not trained. When the last tokens of `before` merge with the
reply's first characters (a BPE merge across the boundary), the merged token is trained: it is what the model
must produce there. Beyond that one merged token, `before` must be a prefix of `upto`: a generation
prompt that differs from how the template renders the turn's header fails loudly instead of training
prompt tokens. A template that renders a turn differently once later
turns follow (e.g. one that drops earlier reasoning) fails loudly, naming the record and the turn;
`assistant_turns="last"` then still works.

Every render is tokenized in one batched tokenizer call per chunk of records (fast tokenizers run that in
parallel), with `add_special_tokens=False`: a chat template writes its own BOS, as in HF's
`apply_chat_template(tokenize=True)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .formats import DataError, Record

# ChatML, used when the tokenizer has no chat template of its own (a base model) and the user passes none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ASSISTANT_TURNS = ("all", "last")


@dataclass(frozen=True)
class MaskOptions:
    """What the loss sees. `train_on_inputs`: every token is a target (prompt included);
    `assistant_turns`: "all" trains every assistant reply of a conversation (from `first_trainable` on),
    "last" only the final one (earlier replies are context)."""

    train_on_inputs: bool = False
    assistant_turns: str = "all"

    def __post_init__(self):
        if self.assistant_turns not in ASSISTANT_TURNS:
            raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, got {self.assistant_turns!r}")


def resolve_chat_template(tokenizer, chat_template: str | None) -> str:
    """The template to render conversations with: the user's, else the tokenizer's own, else ChatML (with a
    warning, since a base model's tokenizer may lack ChatML's special tokens and then spells them as text)."""
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ValueError("chat_template must be a non-empty Jinja string")
        return chat_template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: HF uses "default"
        own = own.get("default")
    if isinstance(own, str) and own.strip():
        return own
    warnings.warn(
        f"{type(tokenizer).__name__} has no chat template; rendering conversations as ChatML "
        "(pass chat_template=... to choose another)",
        stacklevel=3,
    )
    return CHATML_TEMPLATE


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (BOS/EOS and added special tokens such as <|eot_id|>)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return frozenset(ids)


@dataclass
class _Plan:
    """The renders one record needs and how to turn their token ids into (ids, trained)."""

    record: Record
    texts: list[str]
    turns: list[tuple[int, int, int]]  # (message index, index of `before` in texts, index of `upto`)
    # Chat renders carry their own BOS (as in HF's apply_chat_template(tokenize=True)); plain text gets the
    # tokenizer's default special tokens (e.g. Llama's BOS).
    add_special_tokens: bool = False


class ResponseMasker:
    """Turns Records into (input_ids, trained) with one tokenizer and one template.

    `encode(records)` -> list of (ids int64 [n], trained bool [n]) or a DataError per bad record (the caller
    decides to raise or skip). Records of kind "messages" go through the chat template; "prompt_completion"
    and "text" are plain text (BOS per the tokenizer's own setting, EOS appended and trained so the model
    learns to stop); "tokens" are taken as given.
    """

    def __init__(self, tokenizer, *, chat_template: str | None = None, options: MaskOptions | None = None):
        self.tokenizer = tokenizer
        self.options = options or MaskOptions()
        self.chat_template = resolve_chat_template(tokenizer, chat_template)
        self.special_ids = special_token_ids(tokenizer)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self._whitespace_cache: dict[int, bool] = {}

    # -- rendering ------------------------------------------------------------------------------------------

    def _render(self, record: Record, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja2 errors, the template's own raise_exception(...)
            raise DataError(
                record.location, "messages", f"the chat template failed to render it: {exc}", "chat template error"
            ) from exc

    def _plan(self, record: Record) -> _Plan:
        if record.kind != "messages":
            return _Plan(record, [], [])
        messages = record.messages
        texts = [self._render(record, messages, add_generation_prompt=False)]
        turns: list[tuple[int, int, int]] = []
        if not self.options.train_on_inputs:
            assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= record.first_trainable]
            if self.options.assistant_turns == "last":
                assistant = assistant[-1:]
            for i in assistant:
                texts.append(self._render(record, messages[:i], add_generation_prompt=True))
                texts.append(self._render(record, messages[: i + 1], add_generation_prompt=False))
                turns.append((i, len(texts) - 2, len(texts) - 1))
        return _Plan(record, texts, turns)

    # -- masks ----------------------------------------------------------------------------------------------

    def _is_whitespace(self, token_id: int) -> bool:
        hit = self._whitespace_cache.get(token_id)
        if hit is None:
            hit = self.tokenizer.decode([token_id]).strip() == ""
            self._whitespace_cache[token_id] = hit
        return hit

    def _reply_end(self, ids: Sequence[int], start: int, end: int) -> int:
        """End of the reply within ids[start:end]: drop template whitespace after the last special token
        (the end-of-turn token stays)."""
        last_special = max((t for t in range(start, end) if ids[t] in self.special_ids), default=None)
        if last_special is None:
            return end
        if all(self._is_whitespace(ids[t]) for t in range(last_special + 1, end)):
            return last_special + 1
        return end

    def _messages_mask(self, plan: _Plan, tokens: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        full = tokens[0]
        trained = np.zeros(len(full), dtype=bool)
        if self.options.train_on_inputs:
            trained[:] = True
        for message_index, before_at, upto_at in plan.turns:
            before, upto = tokens[before_at], tokens[upto_at]
            if len(upto) > len(full) or full[: len(upto)] != upto:
                raise DataError(
                    plan.record.location,
                    f"messages[{message_index}]",
                    "the chat template renders this assistant turn differently once later turns follow it, so "
                    "its response tokens cannot be located token-exactly; use assistant_turns='last' or pass a "
                    "chat_template that renders every turn the same way",
                    "template renders turns inconsistently",
                )
            start = _common_prefix_length(before, upto)
            # The prompt and generation prompt stay untrained; at most their last token may merge with the
            # reply's first characters (a BPE merge across the boundary).
            if start < len(before) - 1:
                raise DataError(
                    plan.record.location,
                    f"messages[{message_index}]",
                    "the chat template's generation prompt does not match how it renders this assistant turn, "
                    "so the reply cannot be told apart from the prompt; pass a consistent chat_template",
                    "template renders turns inconsistently",
                )
            end = self._reply_end(upto, start, len(upto))
            if end <= start:
                raise DataError(
                    plan.record.location,
                    f"messages[{message_index}]",
                    "the assistant turn renders to no tokens after the prompt (empty reply?)",
                    "empty reply",
                )
            trained[start:end] = True
        return np.asarray(full, dtype=np.int64), trained

    def _text_mask(self, record: Record, tokens: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        if record.kind == "text":
            ids = self._with_eos(tokens[0])
            return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)
        prompt, whole = tokens
        ids = self._with_eos(whole)
        trained = np.zeros(len(ids), dtype=bool)
        trained[_common_prefix_length(prompt, whole) :] = True
        if self.options.train_on_inputs:
            trained[:] = True
        return np.asarray(ids, dtype=np.int64), trained

    def _with_eos(self, ids: list[int]) -> list[int]:
        if self.eos_id is None or (ids and ids[-1] == self.eos_id):
            return ids
        return [*ids, self.eos_id]

    @staticmethod
    def _tokens_mask(record: Record) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(record.input_ids, dtype=np.int64)
        if record.labels is None:
            return ids, np.ones(len(ids), dtype=bool)
        return ids, np.asarray(record.labels, dtype=np.int64) != -100

    # -- batched entry point --------------------------------------------------------------------------------

    def encode(self, records: Sequence[Record]) -> list[tuple[np.ndarray, np.ndarray] | DataError]:
        """Encode a chunk of records with one batched tokenizer call."""
        plans: list[_Plan | DataError] = []
        texts: dict[bool, list[str]] = {False: [], True: []}  # keyed by add_special_tokens
        spans: list[tuple[int, int]] = []
        for record in records:
            try:
                if record.kind == "messages":
                    plan = self._plan(record)
                elif record.kind == "prompt_completion":
                    plan = _Plan(record, [record.prompt, record.prompt + record.completion], [], True)
                elif record.kind == "text":
                    plan = _Plan(record, [record.text], [], True)
                else:
                    plan = _Plan(record, [], [])
            except DataError as err:
                plans.append(err)
                spans.append((0, 0))
                continue
            plans.append(plan)
            group = texts[plan.add_special_tokens]
            spans.append((len(group), len(group) + len(plan.texts)))
            group.extend(plan.texts)

        token_lists = {flag: self._tokenize(group, flag) for flag, group in texts.items()}
        out: list[tuple[np.ndarray, np.ndarray] | DataError] = []
        for plan, (lo, hi) in zip(plans, spans, strict=True):
            if isinstance(plan, DataError):
                out.append(plan)
                continue
            record, tokens = plan.record, token_lists[plan.add_special_tokens][lo:hi]
            try:
                if record.kind == "messages":
                    out.append(self._messages_mask(plan, tokens))
                elif record.kind == "tokens":
                    out.append(self._tokens_mask(record))
                else:
                    out.append(self._text_mask(record, tokens))
            except DataError as err:
                out.append(err)
        return out

    def _tokenize(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return [list(ids) for ids in encoded]


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
