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


METHODS = ["locate", "prefix"]


def encode_one(tokenizer, row, **options):
    records, _ = load_records([row])
    masker = ResponseMasker(tokenizer, options=MaskOptions(**options))
    (result,) = masker.encode(records)
    if isinstance(result, DataError):
        raise result
    return result


def check_replies(style_name, tokenizer, ids, trained, replies):
    """Each trained run is one reply: decoding through the run's end gives the text before it plus exactly
    the expected reply text (so a missing or extra token at either edge shows), and the header precedes it."""
    style = STYLES[style_name]
    runs = trained_runs(trained)
    assert len(runs) == len(replies)
    for (a, b), reply in zip(runs, replies, strict=True):
        before = tokenizer.decode(ids[:a].tolist())
        assert before.endswith(style.reply_header)
        assert tokenizer.decode(ids[:b].tolist()) == before + style.reply_text(reply)


def assistant_contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("messages", [TURNS[:2], [SYSTEM, *TURNS]], ids=["one-turn", "system-multi-turn"])
def test_every_assistant_reply_and_its_end_of_turn_are_trained(style, messages, method):
    tokenizer = make_tokenizer(style)
    ids, trained = encode_one(tokenizer, {"messages": messages}, mask_method=method)
    # The record's tokens are exactly the template's rendering.
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    check_replies(style, tokenizer, ids, trained, assistant_contents(messages))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("style", ["llama3", "chatml", "gemma"])
def test_tool_turns_are_context_not_targets(style, method):
    tokenizer = make_tokenizer(style)
    ids, trained = encode_one(tokenizer, {"messages": [SYSTEM, *TOOL_TURNS]}, mask_method=method)
    check_replies(style, tokenizer, ids, trained, assistant_contents(TOOL_TURNS))
    assert "sunny and 21 degrees" in tokenizer.decode(ids[~trained].tolist())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("style", sorted(STYLES))
def test_only_the_last_turn(style, method):
    tokenizer = make_tokenizer(style)
    ids, trained = encode_one(tokenizer, {"messages": TURNS}, assistant_turns="last", mask_method=method)
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


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_prompt_completion_text(style, method):
    tokenizer = make_tokenizer(style)
    row = {"prompt": "Translate this sentence:", "completion": " hello world"}
    ids, trained = encode_one(tokenizer, row, mask_method=method)
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


REWRITING_TEMPLATE = (  # earlier replies are replaced once a later turn follows (as reasoning-stripping templates do)
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['role'] == 'assistant' and not loop.last %}(earlier reply){% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.mark.parametrize(
    "method,message",
    [("locate", "cannot locate this reply"), ("prefix", "renders this assistant turn differently")],
)
def test_a_reply_the_final_rendering_does_not_contain_fails_loudly(method, message):
    tokenizer = make_tokenizer("chatml", chat_template=REWRITING_TEMPLATE)
    with pytest.raises(DataError, match=rf"records\[0\].*messages\[1\].*{message}"):
        encode_one(tokenizer, {"messages": TURNS[:4]}, mask_method=method)
    ids, trained = encode_one(tokenizer, {"messages": TURNS[:4]}, assistant_turns="last", mask_method=method)
    (run,) = trained_runs(trained)
    assert tokenizer.decode(ids[run[0] : run[1]].tolist()) == TURNS[3]["content"] + "<|im_end|>"


# Mistral-v0.3-like: the system prompt is rendered only inside the LAST user turn (so at inference, never in
# a training rendering that ends with a reply), and a Qwen3-like think block that is dropped from earlier turns.
SYSTEM_IN_LAST_USER_TEMPLATE = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
    "{%- set loop_messages = messages[1:] if system is not none else messages %}"
    "{{- bos_token }}{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if loop.last and system is not none %}{{- '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
THINK_TEMPLATE = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['role'] == 'assistant' and '</think>' in m['content'] %}"
    "{%- set answer = m['content'].split('</think>')[-1].lstrip('\n') %}"
    "{%- if loop.index0 > ns.last_user %}{{ m['content'] }}{% else %}{{ answer }}{% endif %}"
    "{%- else %}{{ m['content'] }}{% endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_system_prompt_placed_by_what_follows_is_located():
    """The prefix method cannot mask this template (the system prompt moves); locating the replies in the
    final rendering can."""
    tokenizer = make_tokenizer("mistral", chat_template=SYSTEM_IN_LAST_USER_TEMPLATE)
    messages = [SYSTEM, *TURNS[:4]]
    with pytest.raises(DataError):
        encode_one(tokenizer, {"messages": messages}, mask_method="prefix")
    ids, trained = encode_one(tokenizer, {"messages": messages}, mask_method="locate")
    check_replies("mistral", tokenizer, ids, trained, [TURNS[1]["content"], TURNS[3]["content"]])


def test_reasoning_of_the_last_reply_is_trained_and_dropped_reasoning_is_not():
    tokenizer = make_tokenizer("chatml", chat_template=THINK_TEMPLATE)
    first = "<think>\nParis is the capital.\n</think>\n\nThe capital of France is Paris."
    last = "<think>\nsorted works.\n</think>\n\nsorted(xs)"
    messages = [TURNS[0], dict(TURNS[1], content=first), TURNS[2], dict(TURNS[3], content=last)]
    ids, trained = encode_one(tokenizer, {"messages": messages})
    decoded = [tokenizer.decode(ids[a:b].tolist()) for a, b in trained_runs(trained)]
    assert decoded == ["The capital of France is Paris.<|im_end|>", last + "<|im_end|>"]


def test_tool_calls_and_tool_schemas_are_rendered_and_the_call_is_trained():
    tokenizer = make_tokenizer("chatml", chat_template=None)
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    row = {
        "messages": [
            TURNS[0],
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ],
        "tools": tools,
    }
    with pytest.warns(UserWarning, match="no chat template"):
        ids, trained = encode_one(tokenizer, row)
    decoded = [tokenizer.decode(ids[a:b].tolist()) for a, b in trained_runs(trained)]
    assert decoded == [
        '\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is sunny.<|im_end|>",
    ]
    assert '"name": "weather", "parameters"' in tokenizer.decode(ids[~trained].tolist())  # schemas: context


def test_tool_call_the_template_ignores_is_an_error_not_an_empty_target():
    tokenizer = make_tokenizer("llama3")  # this test template renders content only
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    row = {"messages": [TURNS[0], {"role": "assistant", "content": "", "tool_calls": [call]}]}
    with pytest.raises(DataError, match=r"messages\[1\].*no tokens besides special tokens"):
        encode_one(tokenizer, row)


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


def test_generation_prompt_unlike_the_rendered_turn():
    """The prefix method diffs against the generation prompt, so it must refuse rather than train prompt
    tokens; the locate method never uses the generation prompt and trains just the reply."""
    template = (
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>bot\n{%- endif %}"
    )
    tokenizer = make_tokenizer("chatml", chat_template=template)
    records, _ = load_records([{"messages": TURNS[:2]}])
    (result,) = ResponseMasker(tokenizer, options=MaskOptions(mask_method="prefix")).encode(records)
    assert isinstance(result, DataError) and result.field == "messages[1]"
    assert "generation prompt does not match" in str(result)
    ids, trained = encode_one(tokenizer, {"messages": TURNS[:2]}, mask_method="locate")
    decoded = [tokenizer.decode(ids[a:b].tolist()) for a, b in trained_runs(trained)]
    assert decoded == [TURNS[1]["content"] + "<|im_end|>"]
