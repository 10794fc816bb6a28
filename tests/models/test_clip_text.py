"""CLIPTextEncoder, its loader, tokenizer and contrastive loss: open_clip's text tower, an independent
float64 reference of CLIP's text transformer, backends, bad inputs.

Tests that need open_clip (``open_clip_torch``, an optional extra) skip without it.
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKEND_DEVICES, assert_close, randomize_

import diffusion_fast
from diffusion_fast.models import (
    CLIPTextEncoder,
    ContrastiveHead,
    clip_loss,
    clip_text_from_open_clip,
    clip_tokenize,
    clip_tokenizer,
)

# (backend, device) pairs that must give the same network (see test_ddpm_unet.py). The Triton
# interpreter runs only the tiny fp32 comparison.
MODEL_BACKENDS = [p for p in BACKEND_DEVICES if p.id != "triton-interp"]
TINY = dict(vocab_size=1000, width=64, heads=4, layers=2, embed_dim=32)


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


def open_clip_tiny(open_clip, quick_gelu=True):
    """An open_clip CLIP whose text tower has CLIPTextEncoder.tiny()'s sizes (and a minimal image tower)."""
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=TINY["vocab_size"], width=TINY["width"],
                                       heads=TINY["heads"], layers=TINY["layers"])
    return randomize_(open_clip.model.CLIP(TINY["embed_dim"], vision, text, quick_gelu=quick_gelu)).eval()


def random_tokens(lengths, vocab=TINY["vocab_size"], context=77, dtype=torch.int64):
    """Rows <sot> ids <eot> 0...: sot = vocab - 2, eot = vocab - 1 (the largest id, as in CLIP)."""
    out = torch.zeros(len(lengths), context, dtype=dtype)
    for i, n in enumerate(lengths):
        out[i, 0], out[i, n + 1] = vocab - 2, vocab - 1
        out[i, 1:n + 1] = torch.randint(1, vocab - 2, (n,))
    return out


LENGTHS = [5, 75, 0]  # short, no padding at all (77 ids), empty text


# ---------------------------------------------------------------------------
# Independent reference: CLIP's text transformer (OpenAI clip/model.py) written out with plain
# ops on the state dict, explicit additive causal mask and softmax; no diffusion_fast code.
# ---------------------------------------------------------------------------
def reference_text(sd, heads, tokens, quick_gelu=True, dtype=torch.float64):
    sd = {k: v.to(dtype) for k, v in sd.items()}
    b, seq = tokens.shape
    width = sd["token_embedding.weight"].shape[1]
    d = width // heads

    def ln(h, name):
        return F.layer_norm(h, (width,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def dense(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    mask = torch.full((seq, seq), float("-inf"), dtype=dtype).triu(1)
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:seq]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
        q, k, v = (t.reshape(b, seq, heads, d) for t in h.chunk(3, dim=-1))
        w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + mask, dim=-1)
        x = x + dense(torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, seq, width), p + "attn.out_proj")
        h = dense(ln(x, p + "ln_2"), p + "mlp.c_fc")
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
        x = x + dense(h, p + "mlp.c_proj")
    x = ln(x, "ln_final")
    return x[torch.arange(b), tokens.argmax(dim=-1)] @ sd["text_projection"]


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------
def test_configs_have_clips_parameter_counts():
    with torch.device("meta"):
        b32, l14 = CLIPTextEncoder.vit_b_32(), CLIPTextEncoder.vit_l_14()
    # 63.4M: CLIP's "63M-parameter 12-layer 512-wide model with 8 attention heads" (Sec. 2.4)
    assert sum(p.numel() for p in b32.parameters()) == 63_428_096
    assert sum(p.numel() for p in l14.parameters()) == 123_650_304
    sizes = ("width", "heads", "layers", "embed_dim")
    assert [b32.config[k] for k in sizes] == [512, 8, 12, 512] and [l14.config[k] for k in sizes] == [768, 12, 12, 768]
    assert b32.config["vocab_size"] == 49408 and b32.config["context_length"] == 77 and b32.config["quick_gelu"]


def test_initialisation_follows_clip():
    model = CLIPTextEncoder.tiny(layers=4)
    width, layers = 64, 4
    block = model.transformer.resblocks[0]
    for t, std in ((model.token_embedding.weight, 0.02), (model.positional_embedding, 0.01),
                   (block.attn.in_proj_weight, width ** -0.5), (block.mlp.c_fc.weight, (2 * width) ** -0.5),
                   (block.mlp.c_proj.weight, width ** -0.5 * (2 * layers) ** -0.5),
                   (model.text_projection, width ** -0.5)):
        assert abs(t.std().item() / std - 1) < 0.1, (tuple(t.shape), t.std().item(), std)
    assert block.attn.in_proj_bias.abs().max() == 0 and block.attn.out_proj.bias.abs().max() == 0
    assert torch.equal(block.ln_1.weight, torch.ones(width)) and block.ln_1.eps == 1e-5


def test_state_dict_has_open_clips_text_keys(open_clip):
    theirs = open_clip_tiny(open_clip).state_dict()
    text_keys = {k: v.shape for k, v in theirs.items() if not k.startswith("visual.") and k != "logit_scale"}
    ours = {k: v.shape for k, v in CLIPTextEncoder.tiny().state_dict().items()}
    assert ours == text_keys


# ---------------------------------------------------------------------------
# Forward: against open_clip's encode_text and the float64 reference, on every backend
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quickgelu", "gelu"])
def test_matches_open_clip_tiny(open_clip, backend, device, quick_gelu):
    theirs = open_clip_tiny(open_clip, quick_gelu)
    ours = clip_text_from_open_clip(theirs).to(device)
    assert ours.config["quick_gelu"] == quick_gelu and ours.config["heads"] == TINY["heads"]
    tokens = random_tokens(LENGTHS)
    with torch.no_grad():
        expected = theirs.double().encode_text(tokens)
        baseline = theirs.float().encode_text(tokens)  # PyTorch's own fp32 error
        out = ours(tokens.to(device), backend=backend)
    assert_close(out, expected, torch.float32, f"tiny {backend}", baseline=baseline)
    with torch.no_grad():
        assert_close(ours.double()(tokens.to(device), backend=backend), expected, torch.float64, "tiny fp64")


def test_vit_b_32_matches_open_clip(open_clip):
    theirs = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    ours = clip_text_from_open_clip(theirs).eval()
    text_params = sum(v.numel() for k, v in theirs.state_dict().items() if not k.startswith("visual.")
                      and k != "logit_scale")
    assert sum(p.numel() for p in ours.parameters()) == text_params == 63_428_096
    with torch.device("meta"):
        assert ours.config == CLIPTextEncoder.vit_b_32().config
    tokens = clip_tokenize(["a photo of a cat", "a diagram of a diffusion model sampling loop"])
    with torch.no_grad():
        expected, out = theirs.encode_text(tokens), ours(tokens, backend="cuda")
        normalized = ours(tokens, normalize=True)
    assert_close(out, expected, torch.float32, "ViT-B-32 batch 2")
    assert_close(normalized, F.normalize(expected, dim=-1), torch.float32, "normalize=True")


@pytest.mark.parametrize("backend, device", MODEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
def test_matches_float64_reference(backend, device, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton kernels do not take float64")
    model = randomize_(CLIPTextEncoder.tiny()).eval()
    sd = model.state_dict()
    tokens = random_tokens(LENGTHS, dtype=torch.int32)  # int32 ids are accepted too
    expected = reference_text(sd, TINY["heads"], tokens.long())
    baseline = None if dtype == torch.float64 else reference_text(sd, TINY["heads"], tokens.long(), dtype=dtype)
    with torch.no_grad():
        out = model.to(device, dtype)(tokens.to(device), backend=backend)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, f"{backend} {dtype}", baseline=baseline)


def test_gradients_match_open_clip(open_clip):
    theirs = open_clip_tiny(open_clip).double()
    ours = clip_text_from_open_clip(theirs).double()
    tokens = random_tokens(LENGTHS)
    grad_out = torch.randn(len(LENGTHS), TINY["embed_dim"], dtype=torch.float64)
    text = list(ours.state_dict())
    theirs_params = dict(theirs.named_parameters())
    g_ours = torch.autograd.grad((ours(tokens, backend="cuda") * grad_out).sum(), list(ours.parameters()))
    g_theirs = torch.autograd.grad((theirs.encode_text(tokens) * grad_out).sum(), [theirs_params[k] for k in text])
    for name, a, b in zip(text, g_ours, g_theirs):
        assert_close(a, b, torch.float64, f"grad {name}")
    assert g_ours[0].abs().sum() > 0  # the embedding rows of the tokens used get a gradient


def test_attention_is_causal_and_padding_is_ignored():
    model = randomize_(CLIPTextEncoder.tiny()).eval()
    tokens = random_tokens([10, 10])
    tokens[1, :12] = tokens[0, :12]
    tokens[1, 12:] = torch.randint(1, 998, (65,))  # rows 0 and 1: the same ids up to <eot>, others after
    with torch.no_grad():
        feats = model.forward_tokens(tokens)
        short = model(tokens[:1, :12])  # no padding at all: L = 12 < context_length
        pooled = model(tokens)
    assert torch.allclose(feats[0, :12], feats[1, :12], atol=1e-6)  # later tokens do not reach earlier ones
    assert not torch.allclose(feats[0, 12:], feats[1, 12:], atol=1e-3)
    assert torch.allclose(pooled[0], pooled[1], atol=1e-6) and torch.allclose(short[0], pooled[0], atol=1e-5)


def test_backend_argument_and_context():
    model = randomize_(CLIPTextEncoder.tiny(backend="torch")).eval()
    assert model.backend == "torch" and "backend=torch" in repr(model)
    tokens = random_tokens([3, 7])
    with torch.no_grad():
        default = model(tokens)
        with diffusion_fast.use_backend("cuda"):
            in_context = model(tokens, backend=None)
        per_call = model(tokens, backend="cuda")
    assert torch.allclose(default, in_context, atol=1e-5) and torch.allclose(default, per_call, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        CLIPTextEncoder.tiny(backend="tpu")
    with pytest.raises(ValueError, match=r"forward\(backend=\) must be"):
        model(tokens, backend="fast")


def test_torch_compile_fullgraph():
    model = randomize_(CLIPTextEncoder.tiny()).eval()
    tokens = random_tokens([4, 9])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(tokens), model(tokens), atol=1e-5)


def test_bad_inputs_and_configs():
    model = CLIPTextEncoder.tiny()
    with pytest.raises(TypeError, match="tokens must be int64 or int32 ids, got torch.float32"):
        model(torch.zeros(1, 77))
    with pytest.raises(TypeError, match="tokens must be a Tensor"):
        model([[1, 2]])
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, L\).*got \(77,\)"):
        model(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ValueError, match=r"1 <= L <= 77, got \(1, 78\)"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="heads=3 must divide width=64"):
        CLIPTextEncoder.tiny(heads=3)
    with pytest.raises(ValueError, match="layers must be a positive int, got 0"):
        CLIPTextEncoder.tiny(layers=0)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        CLIPTextEncoder.tiny(eps=0.0)


# ---------------------------------------------------------------------------
# Loading checkpoints
# ---------------------------------------------------------------------------
def test_full_clip_and_text_only_state_dicts_load(open_clip):
    theirs = open_clip_tiny(open_clip)
    full = dict(theirs.state_dict())
    full.update(input_resolution=torch.tensor(16), context_length=torch.tensor(77), vocab_size=torch.tensor(1000))
    assert any(k.startswith("visual.") for k in full) and "logit_scale" in full  # OpenAI JIT extras too
    tokens = random_tokens(LENGTHS)
    with torch.no_grad():
        expected = theirs.encode_text(tokens)
        from_full = clip_text_from_open_clip(full, heads=TINY["heads"])
        assert_close(from_full(tokens), expected, torch.float32, "full CLIP state dict")
        text_only = {k: v for k, v in full.items() if not k.startswith("visual.") and k in from_full.state_dict()}
        into = CLIPTextEncoder.tiny()
        assert clip_text_from_open_clip(text_only, model=into) is into
        assert_close(into(tokens), expected, torch.float32, "text-only state dict, model=")
        # Sizes are read off the shapes; heads default to width // 64 = 1 here, a different network.
        guessed = clip_text_from_open_clip(text_only)
        assert guessed.config["heads"] == 1 and guessed.config["layers"] == 2 and guessed.config["embed_dim"] == 32
        assert not torch.allclose(guessed(tokens), expected, atol=1e-3)
    assert clip_text_from_open_clip(text_only, quick_gelu=False).config["quick_gelu"] is False
    for other in (dict(pool_type="last"), dict(no_causal_mask=True)):  # same keys, another network
        text = open_clip.model.CLIPTextCfg(vocab_size=1000, width=64, heads=4, layers=1, **other)
        vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
        with pytest.raises(ValueError, match="must pool at the largest token id with a causal mask"):
            clip_text_from_open_clip(open_clip.model.CLIP(32, vision, text))


def test_missing_unexpected_and_misshapen_keys_are_listed():
    state = dict(randomize_(CLIPTextEncoder.tiny()).state_dict())
    del state["transformer.resblocks.1.mlp.c_proj.bias"], state["ln_final.weight"]
    state["transformer.resblocks.0.attn.extra"] = torch.zeros(1)
    state["transformer.resblocks.0.attn.in_proj_bias"] = torch.zeros(3 * 64 + 1)
    with pytest.raises(ValueError) as info:
        clip_text_from_open_clip(state, model=CLIPTextEncoder.tiny())
    msg = str(info.value)
    assert msg.startswith("clip_text_from_open_clip: checkpoint does not match CLIPTextEncoder(vocab_size=1000")
    assert "2 missing keys: ln_final.weight, transformer.resblocks.1.mlp.c_proj.bias" in msg
    assert "1 unexpected keys: transformer.resblocks.0.attn.extra" in msg
    assert "1 shape mismatches: transformer.resblocks.0.attn.in_proj_bias: checkpoint (193,) vs model (192,)" in msg
    with pytest.raises(ValueError, match=r"\d+ shape mismatches: .*positional_embedding: checkpoint \(77, 64\)"):
        clip_text_from_open_clip(state, model=CLIPTextEncoder.tiny(width=32, context_length=77))
    with pytest.raises(ValueError, match=r"cannot read the architecture, missing keys \['token_embedding.weight'\]"):
        clip_text_from_open_clip({k: v for k, v in state.items() if k != "token_embedding.weight"})
    with pytest.raises(TypeError, match="source must be an open_clip CLIP"):
        clip_text_from_open_clip(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="source must be an open_clip CLIP or a state dict, got str"):
        clip_text_from_open_clip("ViT-B-32")
    with pytest.raises(TypeError, match="model must be a CLIPTextEncoder"):
        clip_text_from_open_clip(state, model=torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------
def test_tokenize_matches_open_clip_and_pads(open_clip):
    texts = ["a photo of a cat", "A Photo of  a CAT", ""]
    tokens = clip_tokenize(texts)
    assert tokens.shape == (3, 77) and tokens.dtype == torch.int64
    assert torch.equal(tokens, open_clip.tokenize(texts))
    assert torch.equal(tokens[0], tokens[1])  # cleaned and lower-cased
    n = int((tokens[0] != 0).sum())
    assert tokens[0, 0] == 49406 and tokens[0, n - 1] == 49407 and tokens[0].argmax() == n - 1
    assert (tokens[0, n:] == 0).all() and tokens[2, :2].tolist() == [49406, 49407]
    assert torch.equal(clip_tokenize("a photo of a cat"), tokens[:1])
    assert torch.equal(clip_tokenize(texts, context_length=10), open_clip.tokenize(texts, context_length=10))


def test_tokenize_long_text_raises_or_truncates(open_clip):
    long = " ".join(["cat"] * 80)  # 80 BPE tokens + start + end
    with pytest.raises(ValueError, match=r"texts\[1\] has 82 tokens with start and end, more than context_length=77"):
        clip_tokenize(["short", long])
    cut = clip_tokenize(["short", long], truncate=True)
    assert torch.equal(cut, open_clip.tokenize(["short", long]))
    assert cut[1, -1] == 49407 and (cut[1] != 0).all()
    fits = " ".join(["cat"] * 75)  # exactly 77 with start and end
    assert (clip_tokenize(fits) != 0).all()


def test_tokenize_bad_arguments(open_clip):
    with pytest.raises(TypeError, match="texts must be a str or a non-empty sequence of str"):
        clip_tokenize([1, 2])
    with pytest.raises(TypeError, match="texts must be"):
        clip_tokenize([])
    with pytest.raises(ValueError, match="context_length must be an int >= 2, got 1"):
        clip_tokenize("x", context_length=1)


def test_tokenize_without_open_clip_says_what_to_install(monkeypatch):
    clip_tokenizer._tokenizer.cache_clear()
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ImportError
    try:
        with pytest.raises(ImportError, match=r"pip install 'diffusion_fast\[clip\]'"):
            clip_tokenize("a photo of a cat")
    finally:
        clip_tokenizer._tokenizer.cache_clear()


# ---------------------------------------------------------------------------
# Contrastive loss
# ---------------------------------------------------------------------------
def reference_clip_loss(t, i, s):
    """Fig. 3 of the paper written out per row, float64; s is the log-scale (float or tensor)."""
    t, i = t.double(), i.double()
    t = t / t.norm(dim=1, keepdim=True)
    i = i / i.norm(dim=1, keepdim=True)
    logits = (s.exp() if isinstance(s, torch.Tensor) else math.exp(s)) * t @ i.T
    n = logits.shape[0]
    loss_t = -sum(logits[r, r] - torch.logsumexp(logits[r], 0) for r in range(n)) / n
    loss_i = -sum(logits[c, c] - torch.logsumexp(logits[:, c], 0) for c in range(n)) / n
    return (loss_t + loss_i) / 2


@pytest.mark.parametrize("n, d", [(1, 3), (5, 8), (16, 33)], ids=["batch1", "small", "odd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=["fp64", "fp32", "fp16"])
def test_clip_loss_matches_reference(n, d, dtype):
    t, i = torch.randn(n, d) * 3, torch.randn(n, d)
    expected = reference_clip_loss(t, i, 2.0)
    t_lo, i_lo = t.to(dtype), i.to(dtype)
    out = clip_loss(t_lo, i_lo, torch.tensor(2.0, dtype=dtype))
    assert out.shape == () and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    baseline = reference_clip_loss(t_lo.float(), i_lo.float(), 2.0)  # the inputs' rounding alone
    assert_close(out, expected, dtype, f"clip_loss {dtype}", baseline=baseline if dtype == torch.float16 else None)
    assert_close(clip_loss(t, i, 2.0), expected, torch.float32, "float logit_scale")


def test_clip_loss_matches_open_clip(open_clip):
    from open_clip.loss import ClipLoss
    t, i, s = torch.randn(6, 10), torch.randn(6, 10), torch.tensor(math.log(1 / 0.07))
    theirs = ClipLoss()(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s.exp())
    assert_close(clip_loss(t, i, s), theirs, torch.float32, "ClipLoss")


def test_clip_loss_gradients():
    t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    i = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(clip_loss, (t, i, s))
    grads = torch.autograd.grad(clip_loss(t, i, s), (t, i, s))
    expected = torch.autograd.grad(reference_clip_loss(t, i, s), (t, i, s))
    for g, e, name in zip(grads, expected, ("text_emb", "image_emb", "logit_scale")):
        assert_close(g, e, torch.float64, f"grad {name}")


def test_contrastive_head_init_and_clamp():
    head = ContrastiveHead()
    assert isinstance(head.logit_scale, torch.nn.Parameter) and head.logit_scale.shape == ()
    assert head.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert head.logit_scale.exp().item() == pytest.approx(1 / 0.07)  # temperature 0.07 (Sec. 2.5)
    t, i = torch.randn(8, 16), torch.randn(8, 16)
    assert_close(head(t, i), reference_clip_loss(t, i, math.log(1 / 0.07)), torch.float32, "head at init")
    (grad,) = torch.autograd.grad(head(t, i), head.logit_scale)
    assert grad != 0
    with torch.no_grad():
        head.logit_scale.fill_(10.0)  # exp(10) > 100: clipped (Sec. 2.5)
    assert_close(head(t, i), reference_clip_loss(t, i, math.log(100)), torch.float32, "clipped at 100")
    (grad,) = torch.autograd.grad(head(t, i), head.logit_scale)
    assert grad == 0
    aligned = torch.randn(8, 16)
    assert head(aligned, aligned * 2).item() < 1e-3  # matching pairs, scale 100: near-zero loss


def test_clip_loss_bad_inputs():
    t = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"same shape \(N, D\), got \(4, 8\) and \(3, 8\)"):
        clip_loss(t, torch.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match=r"image_emb must have shape \(N, D\)"):
        clip_loss(t, torch.randn(4, 8, 1), 1.0)
    with pytest.raises(TypeError, match="text_emb must be a floating Tensor, got torch.int64"):
        clip_loss(torch.ones(4, 8, dtype=torch.long), t, 1.0)
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar, got shape \(2,\)"):
        clip_loss(t, t, torch.ones(2))
    with pytest.raises(TypeError, match="logit_scale must be a Tensor or a float, got str"):
        clip_loss(t, t, "1")
    with pytest.raises(ValueError, match="init_logit_scale must be a finite number"):
        ContrastiveHead(init_logit_scale=float("inf"))


def test_quick_gelu_mlp_folds_its_scale_into_the_weights_outside_autograd():
    """Off oneDNN (GPUs, few rows) the QuickGELU MLP runs c_proj/1.702 (silu(1.702 c_fc(x))) with the scaled
    weights kept between calls; with grads, under backend "torch" and for exact GELU it runs the plain MLP."""
    from diffusion_fast.models.param_cache import cached

    model = randomize_(CLIPTextEncoder.tiny()).eval()
    block = model.transformer.resblocks[0]
    x = torch.randn(2, 5, TINY["width"])
    expected = block.mlp(x)
    with torch.inference_mode():  # as the samplers run: the kept weights are inference tensors
        with diffusion_fast.use_backend("torch"):
            block._mlp(x)
        assert cached(block, "_fc_folded") is None
        folded = block._mlp(x)
    assert cached(block, "_fc_folded") is not None and cached(block, "_proj_folded") is not None
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)
    for p in block.parameters():  # autograd through x alone: the plain MLP, whose weights autograd can save
        p.requires_grad_(False)
    x_grad = x.clone().requires_grad_()
    block._mlp(x_grad).sum().backward()
    assert x_grad.grad is not None
    with torch.no_grad():  # the kept weights follow an in-place update of the parameters
        block.mlp.c_fc.weight.mul_(0.5)
        torch.testing.assert_close(block._mlp(x), block.mlp(x), atol=1e-5, rtol=1e-5)
