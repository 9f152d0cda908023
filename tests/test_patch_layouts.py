"""RoPE layouts and fused gated MLPs that fastsft.patch measures on a model's own functions.

* probe_rope_layout on rotations written here from the math (which head dims turn together, and which table
  column gives each dim its angle), the families' styles and rotations none of them matches;
* the permuted q/k that fastsft rotates give the same attention scores as the model's rotation;
* a rotation no layout matches is left to the model's own apply_rotary_pos_emb: same loss and gradients;
* fused gate_up_proj MLPs (Phi-3) run fastsft's fused activation only when they compute act(gate) * up.
"""

import copy
import importlib

import pytest
import torch
from test_patch import VOCAB, assert_same_grads
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

import fastsft
import fastsft.patch.attention as patch_attention
from fastsft.ops import apply_rope
from fastsft.patch.attention import RopeLayout, probe_rope_layout
from fastsft.patch.modules import fused_gated_mlp_forward, is_fused_gated_mlp, probe_fused_mlp

# --------------------------------------------------------------------------------------------------
# Rotations written from the math. q, k [B, H, S, D], cos / sin [B, S, W], as HF's apply_rotary_pos_emb.
# --------------------------------------------------------------------------------------------------


def rotation(pairs, entry):
    """The rotation turning each pair (a, b) of head dims, dim d by the angle in table column entry[d]:
    out[a] = x[a] cos[entry[a]] - x[b] sin[entry[a]],  out[b] = x[b] cos[entry[b]] + x[a] sin[entry[b]].
    Dims in no pair pass through."""

    def apply_rotary_pos_emb(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, W]: the same table for every head

        def rotate(x):
            out = list(x.unbind(-1))
            for a, b in pairs:
                out[a] = x[..., a] * c[..., entry[a]] - x[..., b] * s[..., entry[a]]
                out[b] = x[..., b] * c[..., entry[b]] + x[..., a] * s[..., entry[b]]
            return torch.stack(out, dim=-1)

        return rotate(q), rotate(k)

    return apply_rotary_pos_emb


def llama_style(width):
    """Dims i and i + W/2 turn together, dim d by column d (full rotary when W = D; Phi-3 partial when W < D)."""
    half = width // 2
    return rotation([(i, i + half) for i in range(half)], {d: d for d in range(width)})


def gpt_oss_style(width):
    """A half-width table: dims i and i + W turn together, both by column i (W = D / 2)."""
    return rotation(
        [(i, i + width) for i in range(width)], {**{i: i for i in range(width)}, **{i + width: i for i in range(width)}}
    )


def glm_style(width):
    """Dims 2i and 2i + 1 turn together, both by column i < W/2 (the table's second half is unused)."""
    pairs = [(2 * i, 2 * i + 1) for i in range(width // 2)]
    return rotation(pairs, {d: d // 2 for d in range(width)})


def cohere_style(width):
    """Dims 2i and 2i + 1 turn together, dim d by column d."""
    pairs = [(2 * i, 2 * i + 1) for i in range(width // 2)]
    return rotation(pairs, {d: d for d in range(width)})


def angles(positions, count, base=10000.0):
    """[T, count] angles position * base^(-j / count), as a rotary embedding computes them."""
    inv_freq = base ** (-torch.arange(count, dtype=torch.float32) / count)
    return positions[:, None].float() * inv_freq[None]


# name: (rotation, table width W, head dim D, expected layout, the family's table from its angles)
STYLES = {
    "llama": (llama_style(16), 16, 16, RopeLayout("as_is", False), lambda p: angles(p, 8).repeat(1, 2)),
    "phi3_partial": (llama_style(10), 10, 16, RopeLayout("as_is", False), lambda p: angles(p, 5).repeat(1, 2)),
    "gpt_oss": (gpt_oss_style(8), 8, 16, RopeLayout("doubled", False), lambda p: angles(p, 8)),
    "glm_partial": (glm_style(8), 8, 16, RopeLayout("first_half", True), lambda p: angles(p, 4).repeat(1, 2)),
    "glm_full": (glm_style(16), 16, 16, RopeLayout("first_half", True), lambda p: angles(p, 8).repeat(1, 2)),
    "cohere": (
        cohere_style(16),
        16,
        16,
        RopeLayout("pairs", True),
        lambda p: angles(p, 8).repeat_interleave(2, dim=-1),
    ),
}


@pytest.mark.parametrize("name", sorted(STYLES))
def test_probe_finds_each_familys_layout(name):
    function, width, head_dim, expected, _ = STYLES[name]
    assert probe_rope_layout(function, width, head_dim) == expected


def _llama(q, k, cos, sin):
    return llama_style(cos.shape[-1])(q, k, cos, sin)


def _raises(q, k, cos, sin):
    raise RuntimeError("this rotation takes other shapes")


UNMATCHED = {
    "opposite_sign": lambda q, k, cos, sin: _llama(q, k, cos, -sin),
    "plus_a_constant": lambda q, k, cos, sin: tuple(t + 0.5 for t in _llama(q, k, cos, sin)),
    "q_scaled": lambda q, k, cos, sin: (_llama(q, k, cos, sin)[0] * 1.1, _llama(q, k, cos, sin)[1]),
    "k_not_rotated": lambda q, k, cos, sin: (_llama(q, k, cos, sin)[0], k),
    # Interleaved pairs, both dims of pair i by column 2i + 1: neither GLM's columns (i) nor Cohere's (2i, 2i + 1).
    "interleaved_odd_columns": lambda q, k, cos, sin: rotation(
        [(2 * i, 2 * i + 1) for i in range(cos.shape[-1] // 2)], {d: d | 1 for d in range(cos.shape[-1])}
    )(q, k, cos, sin),
    "raises": _raises,
}


@pytest.mark.parametrize("name", sorted(UNMATCHED))
@pytest.mark.parametrize(("width", "head_dim"), [(16, 16), (8, 16)])
def test_probe_returns_none_for_a_rotation_no_layout_matches(name, width, head_dim):
    assert probe_rope_layout(UNMATCHED[name], width, head_dim) is None


# The families' own functions stand for the styles above: the layouts are those of real models.
HF_FUNCTIONS = {
    "llama": "llama",
    "phi3_partial": "phi3",
    "gpt_oss": "gpt_oss",
    "glm_partial": "glm4",
    "glm_full": "glm4",
    "cohere": "cohere",
}


@pytest.mark.parametrize("name", sorted(HF_FUNCTIONS))
def test_the_styles_are_the_families_own_rotations(name):
    family = HF_FUNCTIONS[name]
    try:
        modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        pytest.skip(f"transformers has no {family}")
    function, width, head_dim, expected, _ = STYLES[name]
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 6, head_dim, generator=g), torch.randn(2, 2, 6, head_dim, generator=g)
    cos, sin = torch.randn(2, 6, width, generator=g), torch.randn(2, 6, width, generator=g)
    for ours, theirs in zip(function(q, k, cos, sin), modeling.apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert probe_rope_layout(modeling.apply_rotary_pos_emb, width, head_dim) == expected


# --------------------------------------------------------------------------------------------------
# fastsft's rotation of the permuted q, k gives the model's attention scores.
# --------------------------------------------------------------------------------------------------


def scores(q, k):
    """q [H, T, D], k [Hk, T, D] -> [H, T, T] (each query head against its GQA key head)."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return torch.einsum("hsd,htd->hst", q, k)


@pytest.mark.parametrize("tables", ["angles", "random"])
@pytest.mark.parametrize("name", sorted(STYLES))
@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
def test_apply_rope_on_permuted_q_k_gives_the_models_scores(name, tables, backend, request):
    request.getfixturevalue(backend)
    function, width, head_dim, _, table = STYLES[name]
    layout = probe_rope_layout(function, width, head_dim)
    assert layout is not None
    g = torch.Generator().manual_seed(4)
    positions = torch.cat([torch.arange(5), torch.arange(7)])  # two packed documents
    tokens = positions.numel()
    q, k = torch.randn(tokens, 4, head_dim, generator=g), torch.randn(tokens, 2, head_dim, generator=g)
    if tables == "angles":
        theta = table(positions)
        cos, sin = theta.cos(), theta.sin()
    else:
        cos, sin = torch.randn(tokens, width, generator=g), torch.randn(tokens, width, generator=g)
    assert cos.shape == (tokens, width)

    # The model: [1, H, T, D] and [1, T, W].
    as_bhsd = lambda t: t.transpose(0, 1)[None]
    ref_q, ref_k = function(as_bhsd(q), as_bhsd(k), cos[None], sin[None])
    expected = scores(ref_q[0], ref_k[0])

    # fastsft: [T, H, D] permuted, the table converted.
    perm = layout.permutation(width, head_dim, q.device)
    if perm is not None:
        assert sorted(perm.tolist()) == list(range(head_dim))
        q, k = q[..., perm], k[..., perm]
    c, s = layout.convert(cos), layout.convert(sin)
    assert c.shape == (tokens, layout.rotary_dim(width))
    out_q, out_k = apply_rope(q, k, c, s)
    torch.testing.assert_close(scores(out_q.transpose(0, 1), out_k.transpose(0, 1)), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Models: the fallback to the model's own rotation, fused gate_up_proj MLPs.
# --------------------------------------------------------------------------------------------------

LENGTHS = (5, 7)
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,  # attention scores of O(1), so a wrong rotation shows in the loss
    attention_dropout=0.0,
)


def packed_row(lengths=LENGTHS, seed=5):
    """ids, position_ids restarting per document, labels = ids with no target across a document boundary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[position_ids == 0] = -100
    return ids, position_ids, labels


def per_document_loss(model, ids, labels, lengths=LENGTHS):
    """The unpatched model on each document alone: the token losses summed over the documents, divided by all
    the targets (the packed row's mean loss)."""
    targets = torch.tensor(sum(n - 1 for n in lengths))
    total, start = 0.0, 0
    for n in lengths:
        doc = slice(start, start + n)
        out = model(input_ids=ids[:, doc], labels=labels[:, doc], num_items_in_batch=targets, use_cache=False)
        total, start = total + out.loss, start + n
    return total


def patched_loss(model, ids, position_ids, labels):
    return model(input_ids=ids, position_ids=position_ids, labels=labels).loss


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(**TINY)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).float()


def rope_states(model):
    return [m._fastsft for m in model.modules() if "_fastsft" in m.__dict__]


def rotate_back(q, k, cos, sin, unsqueeze_dim=1):
    """A valid position encoding that no layout matches: rotate_half RoPE turning the other way."""
    return llama_style(cos.shape[-1])(q, k, cos, -sin)


def rotate_and_scale(q, k, cos, sin, unsqueeze_dim=1):
    """Another: rotate_half RoPE that also scales the queries."""
    q, k = llama_style(cos.shape[-1])(q, k, cos, sin)
    return q * 1.1, k


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("custom", [rotate_back, rotate_and_scale])
def test_a_rotation_no_layout_matches_runs_the_models_own_function(monkeypatch, custom, attention):
    import transformers.models.llama.modeling_llama as modeling_llama

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", custom)
    ref = tiny_llama()
    head_dim = ref.config.hidden_size // ref.config.num_attention_heads
    patched = fastsft.patch(copy.deepcopy(ref), attention=attention)
    assert patched.fastsft_report.patched["rope"] == ref.config.num_hidden_layers
    ids, position_ids, labels = packed_row()

    loss_ref = per_document_loss(ref, ids, labels)
    loss = patched_loss(patched, ids, position_ids, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss_ref.backward()
    loss.backward()
    assert_same_grads(ref, patched, rtol=1e-5, atol=1e-6)

    states = rope_states(patched)
    assert len(states) == ref.config.num_hidden_layers
    for state in states:
        assert state.rope_layouts == {head_dim: None}  # measured once, nothing matched

    # The control: fastsft's rotation forced on this model ("as_is", as for Llama's own) changes the loss, so
    # the comparison above tells the fallback from no fallback.
    monkeypatch.setattr(patch_attention, "probe_rope_layout", lambda *args: RopeLayout("as_is", False))
    forced = fastsft.patch(copy.deepcopy(ref), attention=attention)
    with torch.no_grad():
        wrong = patched_loss(forced, ids, position_ids, labels)
    assert rope_states(forced)[0].rope_layouts == {head_dim: RopeLayout("as_is", False)}
    assert (wrong - loss_ref).abs() > 1e-3


def test_llamas_own_rotation_runs_fastsfts_kernel_with_the_measured_layout(monkeypatch):
    ref = tiny_llama()
    head_dim = ref.config.hidden_size // ref.config.num_attention_heads
    patched = fastsft.patch(copy.deepcopy(ref))
    calls = []
    apply_rope_kernel = patch_attention.apply_rope
    monkeypatch.setattr(patch_attention, "apply_rope", lambda *args: calls.append(1) or apply_rope_kernel(*args))
    ids, position_ids, labels = packed_row()
    loss_ref = per_document_loss(ref, ids, labels)
    loss = patched_loss(patched, ids, position_ids, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert len(calls) == ref.config.num_hidden_layers
    assert {id(s.rope_layouts) for s in rope_states(patched)} == {id(rope_states(patched)[0].rope_layouts)}
    assert rope_states(patched)[0].rope_layouts == {head_dim: RopeLayout("as_is", False)}


def tiny_phi3(**overrides):
    torch.manual_seed(0)
    config = Phi3Config(**TINY, pad_token_id=0, **overrides)
    config._attn_implementation = "eager"
    return Phi3ForCausalLM(config).float()


def mlps(model):
    return [m for m in model.modules() if is_fused_gated_mlp(m)]


def test_phi3_fused_gate_up_mlp_runs_fastsfts_activation():
    ref = tiny_phi3(partial_rotary_factor=0.75)
    layers = ref.config.num_hidden_layers
    assert len(mlps(ref)) == layers
    patched = fastsft.patch(copy.deepcopy(ref))
    assert patched.fastsft_report.patched["swiglu"] == layers
    for mlp in mlps(patched):
        assert mlp.__dict__["forward"].function is fused_gated_mlp_forward
        assert mlp._fastsft_activation == "silu"
    ids, position_ids, labels = packed_row()
    loss_ref = per_document_loss(ref, ids, labels)
    loss = patched_loss(patched, ids, position_ids, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss_ref.backward()
    loss.backward()
    assert_same_grads(ref, patched, rtol=1e-5, atol=1e-6)
    head_dim = ref.config.hidden_size // ref.config.num_attention_heads
    rotary = int(0.75 * head_dim)
    assert rotary < head_dim and rope_states(patched)[0].rope_layouts == {rotary: RopeLayout("as_is", False)}


def test_a_fused_mlp_with_its_halves_swapped_is_left_to_its_own_forward(monkeypatch):
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    original = tiny_phi3()
    ids, position_ids, labels = packed_row()
    with torch.no_grad():
        loss_original = per_document_loss(original, ids, labels)

    def swapped(self, hidden_states):
        up, gate = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))

    monkeypatch.setattr(Phi3MLP, "forward", swapped)
    ref = tiny_phi3()
    assert len(mlps(ref)) == ref.config.num_hidden_layers
    for mlp in mlps(ref):
        with pytest.raises(TypeError, match="Phi3MLP"):
            probe_fused_mlp(mlp)
    patched = fastsft.patch(copy.deepcopy(ref))
    assert patched.fastsft_report.patched["swiglu"] == 0
    assert all("forward" not in mlp.__dict__ for mlp in mlps(patched))

    loss_ref = per_document_loss(ref, ids, labels)
    assert (loss_ref - loss_original).abs() > 1e-3  # the swap matters: fastsft's fused forward would be wrong
    loss = patched_loss(patched, ids, position_ids, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss_ref.backward()
    loss.backward()
    assert_same_grads(ref, patched, rtol=1e-5, atol=1e-6)


def test_an_mlp_on_the_meta_device_is_checked_through_a_cpu_copy(monkeypatch):
    """Sharded initialisation builds the model on the meta device: the form check still runs (on a CPU copy with
    random weights), so a swapped fused MLP is refused there too, and a normal one is accepted."""
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    config = tiny_phi3().config
    with torch.device("meta"):
        mlp = Phi3MLP(config)
    assert probe_fused_mlp(mlp) == "silu"
    assert mlp.gate_up_proj.weight.device.type == "meta"  # the module itself is untouched

    def swapped(self, hidden_states):
        up, gate = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))

    monkeypatch.setattr(Phi3MLP, "forward", swapped)
    with pytest.raises(TypeError, match="Phi3MLP"):
        probe_fused_mlp(mlp)


INTERLEAVED_MODELS = {
    # GLM-4 turns dims (2i, 2i + 1) of the first half of each head by angle i; Cohere every head dim, the table
    # interleaved (angle i in columns 2i and 2i + 1).
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=16), RopeLayout("first_half", True), 8),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}, RopeLayout("pairs", True), 8),
}


@pytest.mark.parametrize("family", sorted(INTERLEAVED_MODELS))
def test_interleaved_rotary_models_run_fastsfts_kernel_exactly(family):
    """fastsft permutes q and k, converts the table and rotates with its kernel: the model's loss and gradients."""
    import transformers

    config_name, model_name, extra, layout, width = INTERLEAVED_MODELS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**TINY, **extra, pad_token_id=0)
    config._attn_implementation = "eager"
    ref = getattr(transformers, model_name)(config).float()
    patched = fastsft.patch(copy.deepcopy(ref))
    assert patched.fastsft_report.patched["rope"] == config.num_hidden_layers
    ids, position_ids, labels = packed_row()
    loss_ref = per_document_loss(ref, ids, labels)
    loss = patched_loss(patched, ids, position_ids, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss_ref.backward()
    loss.backward()
    assert_same_grads(ref, patched, rtol=1e-5, atol=1e-6)
    assert rope_states(patched)[0].rope_layouts == {width: layout}
