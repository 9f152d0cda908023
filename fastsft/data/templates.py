"""Chat templates and token-exact response masks.

A record becomes `input_ids` plus a boolean `trained` mask over the same tokens: `trained[t]` says token t is
a response token, i.e. a target the loss supervises (the batch builder turns that into shifted labels).
The tokens are exactly the tokenizer's encoding of the template's rendering of the whole conversation (as
`apply_chat_template(tokenize=True)` gives them). No `{% generation %}` markers are needed; two ways to find
the replies in them:

"locate" (default with a fast tokenizer). For each trained assistant turn i, render the conversation once
more with that reply's content replaced by a sentinel character; the two renders differ exactly where the
template put the reply (after whatever it did to it: trimming, a think block). The reply's tokens are those
overlapping that span, through the first special token after it (the end-of-turn token, trained so the model
learns to stop), all within the turn (`render(messages[:i + 1])` bounds it when the template renders turns
independently of what follows). Tool calls the template renders inside the turn are trained with it.
Template whitespace after the end-of-turn token (ChatML's and Gemma's "\n") is not. One tokenization per
record (with character offsets), and templates that render a turn depending on what follows it (a system
prompt placed in the last user turn, reasoning dropped from earlier turns) work: each reply is located in the
final rendering itself.

"prefix" (slow tokenizers, which have no character offsets). Render growing prefixes and diff token ids:
`before = tokens(render(messages[:i], add_generation_prompt=True))`, `upto = tokens(render(messages[:i + 1]))`;
`upto` must be a prefix of the full tokens and the reply is `upto[lcp(before, upto):]` up to its end-of-turn
token. A template that renders a turn differently once later turns follow fails loudly for this method.

Either way an assistant turn whose located reply holds no real token (only special tokens or whitespace)
is an error, never a silently empty target.
"""

from __future__ import annotations

import warnings
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .formats import DataError, Record

# ChatML, used when the tokenizer has no chat template of its own (a base model) and the user passes none.
# Tool schemas go in the system turn and an assistant's tool calls follow its content, one JSON object per
# <tool_call> block (the layout Qwen's ChatML templates use), so tool-calling replies are trained in full.
CHATML_TEMPLATE = (
    "{%- set system_first = messages and messages[0]['role'] == 'system' %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}{% if system_first %}{{- messages[0]['content'] + '\n\n' }}{% endif %}"
    '{{- \'# Tools\n\nCall a function by replying with <tool_call>{"name": ..., "arguments": ...}</tool_call>.'
    " Functions:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and system_first) %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{{- '\n<tool_call>\n' + ({'name': call['name'], 'arguments': call['arguments']} | tojson) + '\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

ASSISTANT_TURNS = ("all", "last")
MASK_METHODS = ("auto", "locate", "prefix")


@dataclass(frozen=True)
class MaskOptions:
    """What the loss sees. `train_on_inputs`: every token is a target (prompt included);
    `assistant_turns`: "all" trains every assistant reply of a conversation (from `first_trainable` on),
    "last" only the final one (earlier replies are context)."""

    train_on_inputs: bool = False
    assistant_turns: str = "all"
    mask_method: str = "auto"  # "locate" with a fast tokenizer, else "prefix" (module docstring)

    def __post_init__(self):
        if self.assistant_turns not in ASSISTANT_TURNS:
            raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, got {self.assistant_turns!r}")
        if self.mask_method not in MASK_METHODS:
            raise ValueError(f"mask_method must be one of {MASK_METHODS}, got {self.mask_method!r}")


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


# Sentinels for "locate": private-use characters, one that the record's own text does not contain is used.
_SENTINELS = tuple(chr(c) for c in range(0xE000, 0xE040))


@dataclass
class _Turn:
    """Where one trained assistant reply sits in the full rendering (method "locate": character offsets;
    "prefix": indices of its `before` / `upto` renders in the plan's texts)."""

    message_index: int
    start: int = 0
    end: int = 0
    bound: int | None = None  # end of the turn's own rendering, when the template renders turns independently


@dataclass
class _Plan:
    """The renders one record needs and how to turn their tokens into (ids, trained)."""

    record: Record
    texts: list[str]
    turns: list[_Turn]
    # Chat renders carry their own BOS (as in HF's apply_chat_template(tokenize=True)); plain text gets the
    # tokenizer's default special tokens (e.g. Llama's BOS).
    add_special_tokens: bool = False


@dataclass
class _Encoded:
    ids: list[int]
    offsets: list[tuple[int, int]] | None  # character span of each token in its text (fast tokenizers)


class ResponseMasker:
    """Turns Records into (input_ids, trained) with one tokenizer and one template.

    `encode(records)` -> list of (ids int64 [n], trained bool [n]) or a DataError per bad record (the caller
    decides to raise or skip). Records of kind "messages" go through the chat template; "prompt_completion"
    and "text" are plain text (BOS per the tokenizer's own setting, EOS appended and trained so the model
    learns to stop); "tokens" are taken as given.
    """

    def __init__(
        self,
        tokenizer,
        *,
        chat_template: str | None = None,
        options: MaskOptions | None = None,
        chat_template_kwargs: dict | None = None,
    ):
        self.tokenizer = tokenizer
        # Extra variables for the template (e.g. Qwen3's enable_thinking=False).
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.options = options or MaskOptions()
        self.chat_template = resolve_chat_template(tokenizer, chat_template)
        self.special_ids = special_token_ids(tokenizer)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self._whitespace_cache: dict[int, bool] = {}
        fast = bool(getattr(tokenizer, "is_fast", False))
        method = self.options.mask_method
        if method == "locate" and not fast:
            raise ValueError(f"mask_method='locate' needs a fast tokenizer; {type(tokenizer).__name__} is not one")
        self.method = ("locate" if fast else "prefix") if method == "auto" else method
        if self.chat_template == CHATML_TEMPLATE and "<|im_end|>" not in tokenizer.get_vocab():
            warnings.warn(
                "the ChatML fallback's <|im_end|> is not a token of this tokenizer, so replies end in plain text "
                "and the model does not learn a real end-of-turn token; add it as a special token (and resize "
                "the embeddings) or pass chat_template=",
                stacklevel=3,
            )

    # -- rendering ------------------------------------------------------------------------------------------

    def _render(self, record: Record, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                tools=record.tools,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **self.chat_template_kwargs,
            )
        except Exception as exc:  # jinja2 errors, the template's own raise_exception(...)
            raise DataError(
                record.location, "messages", f"the chat template failed to render it: {exc}", "chat template error"
            ) from exc

    def _trained_turns(self, record: Record) -> list[int]:
        if self.options.train_on_inputs:
            return []
        turns = [i for i, m in enumerate(record.messages) if m["role"] == "assistant" and i >= record.first_trainable]
        return turns[-1:] if self.options.assistant_turns == "last" else turns

    def _plan(self, record: Record) -> _Plan:
        messages = record.messages
        full = self._render(record, messages)
        turns: list[_Turn] = []
        if self.method == "prefix":
            texts = [full]
            for i in self._trained_turns(record):
                texts.append(self._render(record, messages[:i], add_generation_prompt=True))
                texts.append(self._render(record, messages[: i + 1]))
                turns.append(_Turn(i, len(texts) - 2, len(texts) - 1))
            return _Plan(record, texts, turns)
        used = "".join(m.get("content") or "" for m in messages)
        sentinel = next((c for c in _SENTINELS if c not in used), None)
        for i in self._trained_turns(record):
            if sentinel is None:
                raise DataError(record.location, f"messages[{i}]", "no free sentinel character", "template error")
            variant = [dict(m, content=sentinel) if j == i else m for j, m in enumerate(messages)]
            marked = self._render(record, variant)
            start = _common_prefix_length(full, marked)
            suffix = _common_prefix_length(full[start:][::-1], marked[start:][::-1])
            end = len(full) - suffix
            if sentinel not in marked[start : len(marked) - suffix]:
                raise DataError(
                    record.location,
                    f"messages[{i}]",
                    "cannot locate this reply in the chat template's rendering (the template does not render the "
                    "message content where it renders the turn)",
                    "template does not render the reply",
                )
            upto = self._render(record, messages[: i + 1])
            bound = len(upto) if full.startswith(upto) and len(upto) >= end else None
            turns.append(_Turn(i, start, end, bound))
        return _Plan(record, [full], turns)

    # -- masks ----------------------------------------------------------------------------------------------

    def _is_whitespace(self, token_id: int) -> bool:
        hit = self._whitespace_cache.get(token_id)
        if hit is None:
            hit = self.tokenizer.decode([token_id]).strip() == ""
            self._whitespace_cache[token_id] = hit
        return hit

    def _reply_end(self, ids: Sequence[int], start: int, end: int) -> int:
        """End of the reply within ids[start:end]: the first special token at or after `start` (the
        end-of-turn token) is the last one trained; without one, trailing whitespace tokens are dropped."""
        for t in range(start, end):
            if ids[t] in self.special_ids:
                return t + 1
        while end > start and self._is_whitespace(ids[end - 1]):
            end -= 1
        return end

    def _check_reply(self, record: Record, message_index: int, ids: Sequence[int], start: int, end: int) -> None:
        real = any(ids[t] not in self.special_ids and not self._is_whitespace(ids[t]) for t in range(start, end))
        if not real:
            raise DataError(
                record.location,
                f"messages[{message_index}]",
                "the assistant reply renders to no tokens besides special tokens or whitespace (an empty reply, or "
                "tool_calls the chat template does not render)",
                "empty reply",
            )

    def _located_mask(self, plan: _Plan, encoded: _Encoded) -> np.ndarray:
        ids, offsets = encoded.ids, encoded.offsets
        starts = [a for a, _ in offsets]
        trained = np.zeros(len(ids), dtype=bool)
        for turn in plan.turns:
            # First token overlapping the reply (a token merged across its start belongs to the reply).
            first = next((t for t, (_, b) in enumerate(offsets) if b > turn.start), len(ids))
            content_end = bisect_left(starts, turn.end) if turn.end > turn.start else first
            limit = bisect_left(starts, turn.bound) if turn.bound is not None else len(ids)
            last = self._reply_end(ids, max(content_end, first), limit)
            if turn.bound is None and (last == limit or ids[last - 1] not in self.special_ids):
                raise DataError(
                    plan.record.location,
                    f"messages[{turn.message_index}]",
                    "no end-of-turn token follows this reply in the chat template's rendering",
                    "template renders turns inconsistently",
                )
            self._check_reply(plan.record, turn.message_index, ids, first, last)
            trained[first:last] = True
        return trained

    def _prefix_mask(self, plan: _Plan, tokens: list[_Encoded]) -> np.ndarray:
        full = tokens[0].ids
        trained = np.zeros(len(full), dtype=bool)
        for turn in plan.turns:
            before, upto = tokens[turn.start].ids, tokens[turn.end].ids
            where = f"messages[{turn.message_index}]"
            if len(upto) > len(full) or full[: len(upto)] != upto:
                raise DataError(
                    plan.record.location,
                    where,
                    "the chat template renders this assistant turn differently once later turns follow it, so "
                    "growing prefixes cannot locate it (a fast tokenizer can: mask_method='locate'); or use "
                    "assistant_turns='last'",
                    "template renders turns inconsistently",
                )
            start = _common_prefix_length(before, upto)
            # The prompt stays untrained; at most its last token may merge with the reply's first characters.
            if start < len(before) - 1:
                raise DataError(
                    plan.record.location,
                    where,
                    "the chat template's generation prompt does not match how it renders this assistant turn, "
                    "so the reply cannot be told apart from the prompt; pass a consistent chat_template",
                    "template renders turns inconsistently",
                )
            end = self._reply_end(upto, start, len(upto))
            self._check_reply(plan.record, turn.message_index, upto, start, end)
            trained[start:end] = True
        return trained

    def _messages_mask(self, plan: _Plan, tokens: list[_Encoded]) -> tuple[np.ndarray, np.ndarray]:
        ids = tokens[0].ids
        if self.options.train_on_inputs:
            trained = np.ones(len(ids), dtype=bool)
        elif self.method == "locate":
            trained = self._located_mask(plan, tokens[0])
        else:
            trained = self._prefix_mask(plan, tokens)
        return np.asarray(ids, dtype=np.int64), trained

    def _text_mask(self, record: Record, tokens: list[_Encoded]) -> tuple[np.ndarray, np.ndarray]:
        if record.kind == "text":
            ids = self._with_eos(tokens[0].ids)
            return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)
        whole = tokens[-1]
        ids = self._with_eos(whole.ids)
        trained = np.zeros(len(ids), dtype=bool)
        if self.options.train_on_inputs:
            trained[:] = True
        elif whole.offsets is not None:  # tokens overlapping the completion's characters (and the EOS)
            boundary = len(record.prompt)
            first = next((t for t, (a, b) in enumerate(whole.offsets) if b > boundary and b > a), len(whole.ids))
            trained[first:] = True
        else:
            trained[_common_prefix_length(tokens[0].ids, whole.ids) :] = True
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

    def _plan_any(self, record: Record) -> _Plan:
        if record.kind == "messages":
            return self._plan(record)
        if record.kind == "prompt_completion":
            texts = [record.prompt + record.completion]
            if self.method == "prefix":
                texts.insert(0, record.prompt)
            return _Plan(record, texts, [], True)
        if record.kind == "text":
            return _Plan(record, [record.text], [], True)
        return _Plan(record, [], [])

    def encode(self, records: Sequence[Record]) -> list[tuple[np.ndarray, np.ndarray] | DataError]:
        """Encode a chunk of records with one batched tokenizer call (per special-tokens setting)."""
        plans: list[_Plan | DataError] = []
        texts: dict[bool, list[str]] = {False: [], True: []}  # keyed by add_special_tokens
        spans: list[tuple[int, int]] = []
        for record in records:
            try:
                plan = self._plan_any(record)
            except DataError as err:
                plans.append(err)
                spans.append((0, 0))
                continue
            plans.append(plan)
            group = texts[plan.add_special_tokens]
            spans.append((len(group), len(group) + len(plan.texts)))
            group.extend(plan.texts)

        encoded = {flag: self._tokenize(group, flag) for flag, group in texts.items()}
        out: list[tuple[np.ndarray, np.ndarray] | DataError] = []
        for plan, (lo, hi) in zip(plans, spans, strict=True):
            if isinstance(plan, DataError):
                out.append(plan)
                continue
            record, tokens = plan.record, encoded[plan.add_special_tokens][lo:hi]
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

    def _tokenize(self, texts: list[str], add_special_tokens: bool) -> list[_Encoded]:
        if not texts:
            return []
        if self.method == "locate":
            batch = self.tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            return [
                _Encoded(list(ids), [tuple(o) for o in offsets])
                for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"], strict=True)
            ]
        batch = self.tokenizer(texts, add_special_tokens=add_special_tokens)
        return [_Encoded(list(ids), None) for ids in batch["input_ids"]]


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
