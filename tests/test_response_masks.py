"""Token-exact response masks through real chat templates (Llama-3, ChatML/Qwen, Mistral and Gemma styles).

The expected spans are stated independently of the masking code: each style says what a trained reply must
decode to (the reply plus its end-of-turn token) and which header text must end right before it.
"""

import numpy as np
import pytest
from _chat_tokenizers import STYLES, make_tokenizer

from fastsft.data.formats import DataError, load_records
from fastsft.data.templates import MaskOptions, ResponseMasker

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Write Python code to sort a list."},
    {"role": "assistant", "content": "sorted(xs)"},
    {"role": "user", "content": "thanks!"},
    {"role": "assistant", "content": "Sure - here you go."},
]
TOOL_TURNS = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": '{"city": "Paris"}'},
    {"role": "tool", "content": "sunny and 21 degrees"},
    {"role": "assistant", "content": "The weather tool says it is sunny and 21 degrees."},
]


def trained_runs(trained: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True."""
    padded = np.concatenate([[False], trained, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def encode_one(tokenizer, row, **options):
    records, _ = load_records([row])
    masker = ResponseMasker(tokenizer, options=MaskOptions(**options))
    (result,) = masker.encode(records)
    if isinstance(result, DataError):
        raise result
    return result


def check_replies(style_name, tokenizer, ids, trained, replies):
    style = STYLES[style_name]
    runs = trained_runs(trained)
    decoded = [tokenizer.decode(ids[a:b].tolist()) for a, b in runs]
    expected = [style.reply_text(r) for r in replies]
    if not style.byte_level:  # a metaspace decoder drops the leading space of a decoded piece
        decoded, expected = [d.lstrip() for d in decoded], [e.lstrip() for e in expected]
    assert decoded == expected
    for a, _ in runs:
        assert tokenizer.decode(ids[:a].tolist()).endswith(style.reply_header)


def assistant_contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("messages", [TURNS[:2], [SYSTEM, *TURNS]], ids=["one-turn", "system-multi-turn"])
def test_every_assistant_reply_and_its_end_of_turn_are_trained(style, messages):
    tokenizer = make_tokenizer(style)
    ids, trained = encode_one(tokenizer, {"messages": messages})
    # The record's tokens are exactly the template's rendering.
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    check_replies(style, tokenizer, ids, trained, assistant_contents(messages))


@pytest.mark.parametrize("style", ["llama3", "chatml", "gemma"])
def test_tool_turns_are_context_not_targets(style):
    tokenizer = make_tokenizer(style)
    ids, trained = encode_one(tokenizer, {"messages": [SYSTEM, *TOOL_TURNS]})
    check_replies(style, tokenizer, ids, trained, assistant_contents(TOOL_TURNS))
    assert "sunny and 21 degrees" in tokenizer.decode(ids[~trained].tolist())


@pytest.mark.parametrize("style", sorted(STYLES))
def test_only_the_last_turn(style):
    tokenizer = make_tokenizer(style)
    ids, trained = encode_one(tokenizer, {"messages": TURNS}, assistant_turns="last")
    check_replies(style, tokenizer, ids, trained, [TURNS[-1]["content"]])


@pytest.mark.parametrize("style", ["llama3", "mistral"])
def test_train_on_inputs_trains_every_token(style):
    tokenizer = make_tokenizer(style)
    ids, trained = encode_one(tokenizer, {"messages": TURNS}, train_on_inputs=True)
    assert trained.all() and len(ids) > 20


def test_prompt_messages_assistant_turns_are_context():
    tokenizer = make_tokenizer("chatml")
    row = {"prompt": TURNS[:3], "completion": [TURNS[3]]}
    ids, trained = encode_one(tokenizer, row)
    check_replies("chatml", tokenizer, ids, trained, [TURNS[3]["content"]])


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_prompt_completion_text(style):
    tokenizer = make_tokenizer(style)
    ids, trained = encode_one(tokenizer, {"prompt": "Translate this sentence:", "completion": " hello world"})
    (run,) = trained_runs(trained)
    assert run[1] == len(ids)  # the completion runs to the end, EOS included
    assert tokenizer.decode(ids[run[0] : run[1]].tolist()) == " hello world" + tokenizer.eos_token
    assert (ids[0] == tokenizer.bos_token_id) == STYLES[style].add_bos_to_text


def test_plain_text_trains_everything_and_ends_with_eos():
    tokenizer = make_tokenizer("llama3")
    ids, trained = encode_one(tokenizer, {"text": "hello world"})
    assert trained.all()
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1].tolist()) == "hello world"


def test_pretokenized_labels_give_the_mask():
    tokenizer = make_tokenizer("llama3")
    ids, trained = encode_one(tokenizer, {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]})
    assert ids.tolist() == [5, 6, 7, 8] and trained.tolist() == [False, False, True, True]


def test_template_that_rewrites_earlier_turns_fails_loudly_and_last_turn_still_works():
    # Earlier replies are shortened once a later turn follows (as reasoning-stripping templates do).
    template = (
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{%- if m['role'] == 'assistant' and not loop.last %}(earlier reply){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    tokenizer = make_tokenizer("chatml", chat_template=template)
    with pytest.raises(DataError, match=r"records\[0\].*messages\[1\].*renders this assistant turn differently"):
        encode_one(tokenizer, {"messages": TURNS[:4]})
    ids, trained = encode_one(tokenizer, {"messages": TURNS[:4]}, assistant_turns="last")
    (run,) = trained_runs(trained)
    assert tokenizer.decode(ids[run[0] : run[1]].tolist()) == TURNS[3]["content"] + "<|im_end|>"


def test_template_exception_names_the_record():
    tokenizer = make_tokenizer("mistral")  # its template insists on user/assistant alternation
    bad = {"messages": [TURNS[0], TURNS[0], TURNS[1]]}
    with pytest.raises(DataError, match=r"records\[0\].*must alternate"):
        encode_one(tokenizer, bad)


def test_tokenizer_without_template_falls_back_to_chatml():
    tokenizer = make_tokenizer("chatml", chat_template=None)
    with pytest.warns(UserWarning, match="no chat template"):
        masker = ResponseMasker(tokenizer)
    records, _ = load_records([{"messages": TURNS[:4]}])
    ((ids, trained),) = masker.encode(records)
    decoded = [tokenizer.decode(ids[a:b].tolist()) for a, b in trained_runs(trained)]
    assert decoded == [TURNS[1]["content"] + "<|im_end|>", TURNS[3]["content"] + "<|im_end|>"]


def test_batched_encoding_matches_one_by_one():
    tokenizer = make_tokenizer("gemma")
    sources = [
        [{"messages": TURNS[: 2 * k]} for k in (1, 2, 3)],
        [{"text": "hello"}],
        [{"prompt": "a", "completion": "b"}],
    ]
    records = [record for rows in sources for record in load_records(rows)[0]]
    masker = ResponseMasker(tokenizer)
    together = masker.encode(records)
    alone = [masker.encode([r])[0] for r in records]
    for (ids_a, tr_a), (ids_b, tr_b) in zip(together, alone, strict=True):
        assert ids_a.tolist() == ids_b.tolist() and tr_a.tolist() == tr_b.tolist()


def test_generation_prompt_unlike_the_rendered_turn_fails_instead_of_training_the_prompt():
    # The generation prompt says "bot" but turns are rendered as "assistant": the token diff would start
    # inside the context, so the masker must refuse rather than train prompt tokens.
    template = (
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>bot\n{%- endif %}"
    )
    tokenizer = make_tokenizer("chatml", chat_template=template)
    masker = ResponseMasker(tokenizer)
    records, _ = load_records([{"messages": TURNS[:2]}])
    (result,) = masker.encode(records)
    assert isinstance(result, DataError) and result.field == "messages[1]"
    assert "generation prompt does not match" in str(result)
