"""Benchmark the CLIP text encoder: open_clip's encode_text (eager and torch.compile) and ours per backend.

    python benchmarks/bench_clip_text.py --device cpu --out /tmp/bench_out
    python benchmarks/bench_clip_text.py --quick              # smoke run, tiny network

Providers: ``eager`` is open_clip's ``CLIP.encode_text`` (``nn.MultiheadAttention`` with an
additive -inf mask, QuickGELU forced so that it is OpenAI's network), ``compile`` is
``torch.compile`` of it, and ``cuda``/``cpu``/``triton`` run ``CLIPTextEncoder`` with the same
weights under ``use_backend``; our encoder's only op of ours is attention
(``diffusion_fast.models.attention``), so a backend without an attention kernel runs the same
SDPA call there. On a GPU also ``cuda+graph``: our encoder (auto backend) replayed from a CUDA
graph (``diffusion_fast.cuda_graphs.GraphedModel``), as a text-to-image pipeline can run it: at
77 tokens a forward is some 200 kernels, so eager's host overhead rivals the matmuls even at
batch 64. Forward only, inference (no parameter needs grad), 77 tokens per text.

Variants: ``vit_b_32`` (width 512, 8 heads, 12 layers, 63.4M parameters) and, with --quick,
``tiny`` (width 64, 4 heads, 2 layers, vocab 1000). Shapes are (batch, 77).

Bytes: every weight once (the embedding table only for the B·77 rows looked up), the token ids
and the output: a lower bound; activations that a fused layer keeps on chip are not counted.
FLOPs per layer (B·L tokens, width W): 24·B·L·W² for the QKV, output and MLP matmuls plus
4·B·L²·W for the attention (half of it masked). ViT-B-32 in fp32: ~0.16 GB and 5.8 GFLOP at
batch 1 (~40 FLOP/byte: on a GPU the weights' bytes set the floor, in bf16 even more so),
373 GFLOP at batch 64 (~2300 FLOP/byte: compute-bound everywhere, so the matmuls dominate and
an attention kernel can win only its ~2.5% share of the FLOPs plus the mask and layout copies).
"""

from __future__ import annotations

import harness  # first: puts the repo root on sys.path when diffusion_fast is not installed
import torch

from diffusion_fast import backends
from diffusion_fast.cuda_graphs import GraphedModel
from diffusion_fast.models import CLIPTextEncoder, clip_text_from_open_clip

CONTEXT = 77
CPU_BATCHES = GPU_BATCHES = (1, 64)
QUICK_BATCHES = (1, 2)


def build(variant: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """(open_clip CLIP, our CLIPTextEncoder) with the same random weights, frozen, in eval mode."""
    import open_clip  # optional extra: pip install 'diffusion_fast[clip]'

    if variant == "tiny":
        cfg = CLIPTextEncoder.tiny().config
        vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
        text = open_clip.model.CLIPTextCfg(context_length=CONTEXT, vocab_size=cfg["vocab_size"], width=cfg["width"],
                                           heads=cfg["heads"], layers=cfg["layers"])
        theirs = open_clip.model.CLIP(cfg["embed_dim"], vision, text, quick_gelu=True)
    else:
        theirs = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    theirs.visual = torch.nn.Identity()  # encode_text never uses the image tower
    ours = clip_text_from_open_clip(theirs)
    return tuple(m.to(device, dtype).eval().requires_grad_(False) for m in (theirs, ours))


def make_tokens(batch: int, vocab: int, device: torch.device):
    """requires_grad -> (tokens,): <sot> ids <eot> 0... with lengths spread over the context."""

    def make(requires_grad: bool) -> tuple:
        tokens = torch.zeros(batch, CONTEXT, dtype=torch.int64)
        for i, n in enumerate(torch.randint(1, CONTEXT - 1, (batch,)).tolist()):
            tokens[i, 0], tokens[i, n + 1] = vocab - 2, vocab - 1
            tokens[i, 1:n + 1] = torch.randint(1, vocab - 2, (n,))
        return (tokens.to(device),)

    return make


def counts(model: CLIPTextEncoder, batch: int, dtype: torch.dtype) -> tuple:
    """(bytes, FLOPs) of one forward (see the module docstring)."""
    cfg, s = model.config, torch.finfo(dtype).bits // 8
    width, layers, tokens = cfg["width"], cfg["layers"], batch * CONTEXT
    dense = sum(p.numel() for p in model.parameters()) - model.token_embedding.weight.numel()
    nbytes = (dense + min(tokens, cfg["vocab_size"]) * width) * s + tokens * 8 + batch * cfg["embed_dim"] * s
    flops = layers * (24 * tokens * width ** 2 + 4 * batch * CONTEXT ** 2 * width)
    return nbytes, flops + 2 * batch * width * cfg["embed_dim"]


def plan(device: str, quick: bool, dtypes) -> list:
    """(variant, batch, dtype), the most telling first (a --budget-s may cut the tail)."""
    fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16
    if quick:
        return [("tiny", b, d) for d in dtypes or [fp32] for b in QUICK_BATCHES]
    if device == "cpu":
        return [("vit_b_32", b, d) for d in dtypes or [fp32] for b in CPU_BATCHES]
    return [("vit_b_32", b, d) for d in dtypes or [bf16, fp16, fp32] for b in GPU_BATCHES]


def unsupported(backend: str, tokens: torch.Tensor):
    """Why ``backend`` cannot run our encoder on tokens' device (None if it can)."""
    return backends.unsupported(backend, tokens)


def graph_replay(model: CLIPTextEncoder):
    """tokens -> model(tokens) replayed from a CUDA graph (captured on the first call per shape)."""
    graphed = GraphedModel(model)

    def run(tokens):
        with torch.no_grad():
            return graphed(tokens)

    return run


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    bench = harness.Harness("bench_clip_text", "CLIPTextEncoder", args)
    models = {}
    for variant, batch, dtype in plan(args.device, args.quick, args.dtypes):
        print(f"{variant} batch {batch} {dtype}", flush=True)
        if (variant, dtype) not in models:
            models.clear()  # one pair in memory at a time
            models[variant, dtype] = build(variant, bench.device, dtype)
        theirs, ours = models[variant, dtype]
        nbytes, flops = counts(ours, batch, dtype)
        case = harness.Case(variant, (batch, CONTEXT), dtype, "fwd",
                            make_tokens(batch, ours.config["vocab_size"], bench.device), nbytes,
                            extra={"flops": flops, **{k: ours.config[k] for k in ("width", "heads", "layers")}})
        others = {"cuda+graph": graph_replay(ours)} if bench.device.type == "cuda" else None
        bench.run(case, theirs.encode_text, ours, unsupported, others=others)
    bench.finish()


if __name__ == "__main__":
    main()
