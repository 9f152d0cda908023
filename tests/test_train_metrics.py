"""fastsft.train.metrics: model FLOPs against hand counts, the peak-FLOP/s table, the metrics.jsonl /
TensorBoard writer, and the loss-curve plot."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fastsft.patch.families import family_of, sliding_window
from fastsft.train import metrics as M

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def tiny_llama_config(**overrides):
    base = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        vocab_size=10,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**(base | overrides))


def linear_weights(model, *, trainable=None):
    """Independent count: numel of every nn.Linear weight reached by named_modules (lm_head included)."""
    return sum(
        module.weight.numel()
        for _, module in model.named_modules()
        if isinstance(module, nn.Linear) and (trainable is None or module.weight.requires_grad == trainable)
    )


def brute_pairs(doc_lengths, window=None):
    """Independent count of attended (query, key) pairs: walk every query of every document."""
    pairs = 0
    for length in doc_lengths:
        for position in range(length):
            pairs += position + 1 if window is None else min(position + 1, window)
    return pairs


# --- model FLOPs ----------------------------------------------------------------------------------------------


def test_flops_llama_by_hand():
    # hidden 16, 4 heads x head_dim 4, 2 kv heads, intermediate 32, vocab 10, 2 layers:
    # per layer q 16*16 + k 16*8 + v 16*8 + o 16*16 = 768, MLP 3*16*32 = 1536 -> 2304; x2 = 4608; lm_head 160.
    # N = 4768. Documents [3, 5]: T = 8 -> 6 * 4768 * 8 = 228_864.
    # Attention: pairs 3*4/2 + 5*6/2 = 21 (not 8*9/2 = 36) -> 12 * 2 layers * (4 * 4) * 21 = 8_064.
    config = tiny_llama_config()
    assert M.config_matmul_params(config) == 4768
    assert M.FlopCounter.from_config(config)([3, 5]) == 228_864 + 8_064
    with torch.device("meta"):  # shapes only
        model = LlamaForCausalLM(config)
    assert M.FlopCounter.from_model(model)([3, 5]) == 228_864 + 8_064


@pytest.mark.parametrize("doc_lengths", [[1], [7], [3, 5, 1, 16], [9, 9]])
def test_flops_match_independent_count(doc_lengths):
    config = tiny_llama_config(num_hidden_layers=3, head_dim=8, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    n = linear_weights(model)
    tokens = sum(doc_lengths)
    expected = 6 * n * tokens + 12 * 3 * (2 * 8) * brute_pairs(doc_lengths)
    counter = M.FlopCounter.from_model(model)
    assert counter(doc_lengths) == expected
    assert M.FlopCounter.from_config(config)(doc_lengths) == expected
    # documents attend within themselves: one document of the same total length costs more attention
    if len(doc_lengths) > 1:
        assert counter([tokens]) > expected


def test_doc_lengths_accepts_list_numpy_and_tensor():
    counter = M.FlopCounter.from_config(tiny_llama_config())
    cu_seqlens = torch.tensor([0, 3, 8, 20], dtype=torch.int32)
    expected = counter([3, 5, 12])
    assert counter(np.array([3, 5, 12])) == expected
    assert counter(cu_seqlens.diff()) == expected
    assert counter([]) == 0
    with pytest.raises(ValueError, match=">= 0"):
        counter([3, -1])


def test_attention_pairs_sliding_window():
    # window 3, documents [2, 6]: 1+2 = 3, and 1+2+3+3+3+3 = 15
    assert M.attention_pairs([2, 6], 3) == 18
    assert M.attention_pairs([2, 6]) == 3 + 21
    for lengths in ([1], [4, 4, 4], [10, 1, 7, 3]):
        for window in (None, 1, 2, 3, 5, 100):
            assert M.attention_pairs(lengths, window) == brute_pairs(lengths, window), (lengths, window)


def test_sliding_window_mistral_every_layer():
    config = MistralConfig(**SMALL, head_dim=8, vocab_size=50, sliding_window=3)
    model = MistralForCausalLM(config)
    doc_lengths = [2, 6, 11]
    assert M.layer_windows(config) == (3, 3, 3, 3)
    expected = 6 * linear_weights(model) * sum(doc_lengths) + 12 * 4 * (4 * 8) * brute_pairs(doc_lengths, 3)
    assert M.FlopCounter.from_model(model)(doc_lengths) == expected


def test_sliding_window_gemma2_per_layer_types():
    config = Gemma2Config(**SMALL, head_dim=24, vocab_size=50, sliding_window=4)  # sliding, full, sliding, full
    model = Gemma2ForCausalLM(config)
    doc_lengths = [3, 9, 12]
    per_layer = [brute_pairs(doc_lengths, 4), brute_pairs(doc_lengths), brute_pairs(doc_lengths, 4)]
    per_layer.append(brute_pairs(doc_lengths))
    expected = 6 * linear_weights(model) * sum(doc_lengths) + 12 * (4 * 24) * sum(per_layer)
    assert M.FlopCounter.from_model(model)(doc_lengths) == expected
    assert M.FlopCounter.from_config(config)(doc_lengths) == expected


def _family_models():
    yield LlamaForCausalLM(tiny_llama_config())
    yield LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True, attention_bias=True, mlp_bias=True))
    # qwen2: q/k/v biases, no head_dim attribute (hidden / heads), windows on the upper layers only
    yield Qwen2ForCausalLM(
        Qwen2Config(**SMALL, vocab_size=50, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    )
    yield Qwen2ForCausalLM(Qwen2Config(**SMALL, vocab_size=50, tie_word_embeddings=True))
    # gemma2: head_dim decoupled from hidden / heads, tied lm_head, alternating windows
    yield Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=24, vocab_size=50, sliding_window=4))
    yield MistralForCausalLM(MistralConfig(**SMALL, head_dim=8, vocab_size=50, sliding_window=3))


@pytest.mark.parametrize("model", list(_family_models()), ids=lambda m: m.config.model_type)
def test_config_count_equals_model_count(model):
    assert M.config_matmul_params(model.config) == M.matmul_params(model).total == linear_weights(model)
    assert M.FlopCounter.from_config(model.config) == M.FlopCounter.from_model(model)
    # the config-derived windows are the ones the attention modules use
    _, family = family_of(model.config)
    assert M.layer_windows(model.config) == tuple(
        sliding_window(family, layer.self_attn) for layer in model.model.layers
    )


def test_patched_model_counts_the_same():
    import fastsft

    model = LlamaForCausalLM(tiny_llama_config())
    before = M.FlopCounter.from_model(model)
    fastsft.patch(model)
    try:
        assert M.FlopCounter.from_model(model) == before
    finally:
        fastsft.unpatch(model)


def test_lm_head_tokens_counts_only_supervised_rows():
    config = tiny_llama_config()
    head = config.vocab_size * config.hidden_size
    with torch.device("meta"):  # shapes only
        counter = M.FlopCounter.from_model(LlamaForCausalLM(config))
    all_rows = counter([3, 5])
    assert counter([3, 5], lm_head_tokens=8) == all_rows
    assert counter([3, 5], lm_head_tokens=2) == all_rows - 6 * head * 6
    with pytest.raises(ValueError, match="lm_head_tokens"):
        counter([3, 5], lm_head_tokens=9)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
def test_lora_frozen_weights_cost_four_n():
    peft = pytest.importorskip("peft")
    config = tiny_llama_config()
    model = peft.get_peft_model(
        LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    frozen, trainable = linear_weights(model, trainable=False), linear_weights(model, trainable=True)
    assert frozen == M.config_matmul_params(config)  # the base layers, lm_head included
    assert trainable == 2 * ((16 * 2 + 2 * 16) + (16 * 2 + 2 * 8))  # lora_A + lora_B of q_proj and v_proj x 2
    params = M.matmul_params(model)
    assert (params.trunk_trainable, params.head_frozen) == (trainable, 160)
    attention = 12 * 2 * 16 * 21
    counter = M.FlopCounter.from_model(model)
    assert counter([3, 5], full_backward=False) == (4 * frozen + 6 * trainable) * 8 + attention
    assert counter([3, 5]) == 6 * (frozen + trainable) * 8 + attention


def test_moe_config_is_rejected():
    config = tiny_llama_config()
    config.num_local_experts = 8
    with pytest.raises(ValueError, match="mixture-of-experts"):
        M.config_matmul_params(config)


def test_model_flops_utilization():
    assert M.model_flops_utilization(4.5e14, 1.0, 1e15) == pytest.approx(0.45)
    assert M.model_flops_utilization(1e14, 1.0, None) is None
    assert M.model_flops_utilization(1e14, 0.0, 1e15) is None


# --- peak FLOP/s ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_peak_env(monkeypatch):
    monkeypatch.delenv(M.PEAK_TFLOPS_ENV, raising=False)


@pytest.fixture
def tf32_matmuls():
    """Set torch.backends.cuda.matmul.allow_tf32 for the test; the process's setting is restored after."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision  # allow_tf32 = False would leave "ieee" where it was "none"

    def set_tf32(enabled):
        matmul.allow_tf32 = enabled

    set_tf32(False)
    yield set_tf32
    matmul.fp32_precision = saved


@pytest.fixture
def gpu_named(monkeypatch, no_peak_env, tf32_matmuls):
    def set_name(name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return set_name


def test_peak_flops_none_on_cpu(no_peak_env):
    assert M.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert M.peak_flops("cpu", torch.float32) is None


def test_peak_flops_env_override(monkeypatch):
    monkeypatch.setenv(M.PEAK_TFLOPS_ENV, "123.5")
    assert M.peak_flops("cpu", torch.bfloat16) == pytest.approx(123.5e12)
    monkeypatch.setenv(M.PEAK_TFLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=M.PEAK_TFLOPS_ENV):
        M.peak_flops("cpu", torch.bfloat16)


@pytest.mark.parametrize(
    "name, dtype, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA H100 NVL", torch.float16, 835.5),
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA H800", torch.bfloat16, 989.4),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100 80GB PCIe", torch.float32, 19.5),
        ("NVIDIA A10G", torch.bfloat16, 125.0),
        ("NVIDIA L4", torch.bfloat16, 121.0),
        ("NVIDIA L40S", torch.bfloat16, 362.05),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2),
        ("Tesla V100-SXM2-16GB", torch.float16, 125.0),
    ],
)
def test_peak_flops_table(gpu_named, name, dtype, tflops):
    gpu_named(name)
    assert M.peak_flops(torch.device("cuda"), dtype) == pytest.approx(tflops * 1e12)


def test_peak_flops_tf32_and_unknowns(gpu_named, tf32_matmuls, monkeypatch):
    gpu_named("NVIDIA H100 80GB HBM3")
    assert M.peak_flops("cuda", torch.float32) == pytest.approx(66.9e12)
    tf32_matmuls(True)
    assert M.peak_flops("cuda:0", torch.float32) == pytest.approx(494.7e12)
    gpu_named("Tesla T4")  # no TF32: fp32 stays plain; no bf16 tensor cores: None
    assert M.peak_flops(0, torch.float32) == pytest.approx(8.1e12)
    assert M.peak_flops(0, torch.bfloat16) is None
    gpu_named("Some Future GPU 9000")
    assert M.peak_flops("cuda", torch.bfloat16) is None
    monkeypatch.setenv(M.PEAK_TFLOPS_ENV, "2250")
    assert M.peak_flops("cuda", torch.bfloat16) == pytest.approx(2250e12)


# --- MetricsLogger --------------------------------------------------------------------------------------------

TRAIN = {"step": 10, "loss": 1.25, "lr": 1e-3, "grad_norm": 0.5, "peak_memory_gib": None, "skipped_steps": 0}


def jsonl_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_logger_appends_jsonl(tmp_path):
    run_dir = tmp_path / "run"
    with M.MetricsLogger(run_dir, jsonl=True, tensorboard=False) as log:
        log.write(TRAIN)
        assert jsonl_records(run_dir) == [TRAIN]  # flushed at once
        log.write({"step": 10, "eval_loss": np.float32(0.5)})  # numpy scalars become plain numbers
    with M.MetricsLogger(run_dir, jsonl=True, tensorboard=False) as log:  # a resumed run appends
        log.write({"step": 20, "exact_match": 0.7})
    assert jsonl_records(run_dir) == [TRAIN, {"step": 10, "eval_loss": 0.5}, {"step": 20, "exact_match": 0.7}]
    assert not (run_dir / "tensorboard").exists()
    with pytest.raises(ValueError, match="step"), M.MetricsLogger(run_dir, tensorboard=False) as log:
        log.write({"loss": 1.0})


def test_logger_disabled_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with M.MetricsLogger(run_dir, jsonl=True, tensorboard="auto", enabled=False) as log:
        log.write(TRAIN)
    assert not run_dir.exists()


def test_logger_closes_a_torn_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(TRAIN) + '\n{"step": 11, "lo')
    with M.MetricsLogger(tmp_path, tensorboard=False) as log:
        log.write({"step": 11, "loss": 1.0})
    assert M.read_metrics(tmp_path / "metrics.jsonl") == [TRAIN, {"step": 11, "loss": 1.0}]


def test_tensorboard_required_but_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import now fails
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        M.MetricsLogger(tmp_path, tensorboard=True)
    with pytest.raises(RuntimeError, match="pip install tensorboard"):  # every rank fails alike
        M.MetricsLogger(tmp_path, tensorboard=True, enabled=False)
    with M.MetricsLogger(tmp_path, tensorboard="auto") as log:
        assert not log.tensorboard_enabled
        log.write(TRAIN)
    assert jsonl_records(tmp_path) == [TRAIN]


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags}


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_scalars(tmp_path):
    with M.MetricsLogger(tmp_path, jsonl=False, tensorboard=True) as log:
        assert log.tensorboard_enabled
        log.write(TRAIN)
        log.write({"step": 20, "loss": 0.75, "lr": 5e-4, "grad_norm": 0.25, "skipped_steps": 1})
        log.write({"step": 20, "eval_loss": 0.5})
        log.write({"step": 20, "exact_match": 0.7})
    assert not (tmp_path / "metrics.jsonl").exists()
    scalars = read_scalars(tmp_path / "tensorboard")
    train_tags = {"train/loss", "train/lr", "train/grad_norm", "train/skipped_steps"}
    assert set(scalars) == train_tags | {"eval/eval_loss", "eval/exact_match"}
    assert scalars["train/loss"] == [(10, 1.25), (20, 0.75)]
    assert scalars["train/skipped_steps"] == [(10, 0.0), (20, 1.0)]
    assert [step for step, _ in scalars["train/lr"]] == [10, 20]
    assert scalars["train/lr"][1][1] == pytest.approx(5e-4)
    assert scalars["eval/eval_loss"] == [(20, 0.5)]
    assert scalars["eval/exact_match"][0][1] == pytest.approx(0.7)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_resume_hides_the_abandoned_steps(tmp_path):
    with M.MetricsLogger(tmp_path, tensorboard=True) as log:
        for step in (1, 2, 3, 4):  # checkpoint at 2, crash after 4
            log.write({"step": step, "loss": float(step)})
    with M.MetricsLogger(tmp_path, tensorboard=True, resume_step=2) as log:
        for step in (3, 4, 5):
            log.write({"step": step, "loss": 10.0 * step})
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    steps, values = M.metric_series(M.read_metrics(tmp_path / "metrics.jsonl"))["loss"]
    assert (steps, values) == ([1, 2, 3, 4, 5], [1.0, 2.0, 30.0, 40.0, 50.0])


# --- metrics.jsonl reading and the plot -----------------------------------------------------------------------


def write_run(path, *, torn=True):
    lines = []
    for step in range(1, 61):  # first run: steps 1..60, checkpoint at 50
        lines.append({"step": step, "loss": 3.0 - step / 40, "lr": 1e-3 * min(1.0, step / 10)})
        if step % 25 == 0:
            lines.append({"step": step, "eval_loss": 3.1 - step / 40})
    for step in range(51, 101):  # resumed from step 50: 51..60 logged twice
        lines.append({"step": step, "loss": 2.0 - step / 100, "lr": 1e-3 * (1 - step / 100)})
        if step % 25 == 0:
            lines.append({"step": step, "eval_loss": 2.1 - step / 100})
    lines.append({"step": 100, "exact_match": 0.7})
    text = "".join(json.dumps(record) + "\n" for record in lines)
    path.write_text(text + ('{"step": 101, "loss": 0.9' if torn else ""))


def test_metric_series_keeps_the_last_record_per_step(tmp_path):
    write_run(tmp_path / "metrics.jsonl")
    series = M.metric_series(M.read_metrics(tmp_path / "metrics.jsonl"))
    steps, losses = series["loss"]
    assert steps == list(range(1, 101))
    assert losses[54] == pytest.approx(2.0 - 55 / 100)  # step 55: the resumed run's value
    assert losses[9] == pytest.approx(3.0 - 10 / 40)
    assert series["eval_loss"][0] == [25, 50, 75, 100]
    assert series["exact_match"] == ([100], [0.7])
    assert set(series) == {"loss", "lr", "eval_loss", "exact_match"}


def png_checks(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 500
    assert float(np.asarray(image).std()) > 0.01  # something was drawn


def test_plot_loss_curves(tmp_path):
    pytest.importorskip("matplotlib")
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    write_run(tmp_path / "metrics.jsonl")
    out = M.plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png", required=True)
    assert out == tmp_path / "plots" / "loss.png"
    png_checks(out)
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["loss.png"]  # no temporary file left behind
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded  # never goes through pyplot


def test_plot_loss_curves_few_points_without_lr(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 2, "eval_loss": 1.7}\n')
    png_checks(M.plot_loss_curves(path, tmp_path / "loss.png"))


def test_plot_loss_curves_nothing_to_draw(tmp_path):
    pytest.importorskip("matplotlib")
    assert M.plot_loss_curves(tmp_path / "missing.jsonl", tmp_path / "loss.png") is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "exact_match": 0.5}\n{"step": 2, "lo')
    assert M.plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_plot_loss_curves_without_matplotlib(tmp_path, monkeypatch):
    write_run(tmp_path / "metrics.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the import now fails
    assert M.plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png") is None
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        M.plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png", required=True)
    assert not (tmp_path / "loss.png").exists()
