"""Generation with a chat model: the prompt as training rendered it, every token that ends a reply, and one
greedy or sampled reply.

The one generation path of fastsft: `fastsft generate` / `chat` answer with `generate_reply`, and the exact
match that `fastsft train` and `fastsft eval` report is scored on `generate_reply`'s greedy answers, so the
score and what a user sees cannot drift apart.
"""

from __future__ import annotations

import torch


def stop_token_ids(model, tokenizer, prompt: str, chat_template: str | None = None) -> list[int]:
    """Every id that ends a reply: the generation config's EOS ids, the tokenizer's EOS, the end-of-turn
    token the chat template puts after a reply (what fastsft.data trains the model to emit: <|eot_id|> for
    Llama 3, <end_of_turn> for Gemma, which a base model's EOS is not), and ChatML's <|im_end|> when the
    prompt is ChatML."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = [*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id]
    candidates.append(end_of_turn_id(tokenizer, chat_template))
    if "<|im_end|>" in prompt:
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            candidates.append(im_end)
    for value in candidates:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def end_of_turn_id(tokenizer, chat_template: str | None = None) -> int | None:
    """The special token the chat template writes right after an assistant reply (whitespace aside), or None
    when it writes plain text there. Found by rendering a one-turn chat around a sentinel reply."""
    from fastsft.data.templates import resolve_chat_template, special_token_ids

    sentinel = "fastsftreplysentinel"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}]
    try:
        template = resolve_chat_template(tokenizer, chat_template)
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    except Exception:  # a template that refuses this conversation: rely on the EOS ids
        return None
    at = text.rfind(sentinel)
    if at < 0:
        return None
    specials = special_token_ids(tokenizer)
    for token in tokenizer(text[at + len(sentinel) :], add_special_tokens=False)["input_ids"]:
        if token in specials:
            return int(token)
        if tokenizer.decode([token]).strip():  # text before any special token: no end-of-turn token
            return None
    return None


def render_prompt(tokenizer, messages: list[dict], chat_template: str | None = None) -> str:
    """The conversation rendered with the chat template the model was trained with, ending in the assistant's
    generation prompt: `chat_template` (the run's data.chat_template), else the tokenizer's, else ChatML."""
    from fastsft.data.templates import resolve_chat_template

    template = resolve_chat_template(tokenizer, chat_template)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)


@torch.no_grad()
def generate_reply(
    model,
    tokenizer,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chat_template: str | None = None,
) -> str:
    """The assistant's next reply to `messages` ([{"role", "content"}, ...], ending with a user turn).

    temperature 0 is greedy decoding (deterministic); > 0 samples with that temperature and nucleus `top_p`
    (seed torch for reproducible samples). The reply is decoded without special tokens and stops at EOS or
    after `max_new_tokens` tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    prompt = render_prompt(tokenizer, messages, chat_template)
    device = next(model.parameters()).device
    # The rendered template already carries its BOS: add_special_tokens=False keeps it from being doubled.
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    stop = stop_token_ids(model, tokenizer, prompt, chat_template)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    if not sampling:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # silence sampling warnings
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else None)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop or None,
        pad_token_id=pad,
        **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
