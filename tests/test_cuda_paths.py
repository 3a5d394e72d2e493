"""Every CUDA code path traced without a GPU: the full-size model (configs/kosmos1.yaml) on fake CUDA tensors
(torch's FakeTensorMode: shapes, dtypes and devices, no values, no driver) in bf16 autocast, as a GPU run
has it. A tensor made on the wrong device (a CPU tensor meeting a CUDA one fails the fake op; one made
alone on the CPU is seen by the recorder) or in the wrong dtype fails here, before any GPU is lent. xPos
and the loss stay fp32, as designed.

autocast refuses "cuda" without a driver (it disables itself with a warning); it is constructed with
torch.cuda.is_available / is_bf16_supported answering True, which changes nothing else: every tensor is
fake."""

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kosmos import plan as P
from kosmos.config import load_config
from tests.helpers import ROOT

MATMULS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution")
SDPA = torch.nn.functional.scaled_dot_product_attention


class Recorder(TorchDispatchMode):
    """Every op's tensor outputs: (op, dtype, device type); inside F.scaled_dot_product_attention the op is
    named `sdpa:` and its inputs q, k, v are recorded as `sdpa.q/k/v`. Fake CUDA cannot ask the device which
    fused kernel it has, so sdpa takes its math path there, which computes in fp32 (torch upcasts bf16 in
    it): its inner matmuls are not the model's; its inputs are."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, str]] = []
        self.inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = f"sdpa:{func}" if self.inside else str(func)
        self.seen += [(name, t.dtype, t.device.type) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def sdpa(self, q, k, v, *args, **kwargs):
        self.seen += [(f"sdpa.{n}", t.dtype, t.device.type) for n, t in zip("qkv", (q, k, v), strict=True)]
        self.inside = True
        try:
            return SDPA(q, k, v, *args, **kwargs)
        finally:
            self.inside = False

    def __enter__(self):
        self._patch = mock.patch("torch.nn.functional.scaled_dot_product_attention", self.sdpa)
        self._patch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._patch.__exit__(*exc)


def _cuda_autocast():
    with mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True):
        return torch.autocast("cuda", dtype=torch.bfloat16)


def _check(seen):
    """No tensor off the GPU, no fp16/fp64, every matmul in bf16, xPos in complex fp32."""
    off = {(op, d) for op, _, d in seen if d != "cuda"}
    assert not off, f"tensors made off the GPU: {sorted(off)[:10]}"
    bad = {(op, t) for op, t, _ in seen if t in (torch.float16, torch.float64, torch.complex32)}
    assert not bad, f"tensors in a wrong dtype: {sorted(bad, key=str)[:10]}"
    mm = {(op, t) for op, t, _ in seen
          if op.startswith((*MATMULS, "sdpa.")) and t.is_floating_point and t != torch.bfloat16}
    assert not mm, f"matmuls outside bf16 autocast: {sorted(mm, key=str)[:10]}"
    assert any(op == "sdpa.q" for op, _, _ in seen), "no attention seen"
    assert any(t == torch.complex64 for _, t, _ in seen), "xPos is not computed in complex fp32"


@pytest.fixture(scope="module")
def paper():
    """configs/kosmos1.yaml built on fake CUDA tensors (the mode stays open for the module's tests)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kosmos.model import Kosmos

    cfg = load_config(ROOT / "configs" / "kosmos1.yaml", ["decoder.document_mask=true"])
    real = {b.kind: P.make_batch(cfg, P.MicroBatch(b.name, b.kind, 2, b.images // b.rows * 2))
            for b in P.heaviest_batches(cfg, max_images=3)}
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode, torch.device("cuda"):
        torch.manual_seed(0)
        model = Kosmos(cfg)
    yield cfg, model, mode, real


@pytest.mark.slow
@pytest.mark.parametrize("document_mask", [False, True])
@pytest.mark.parametrize("kind", ["text", "captions", "interleaved"])
def test_the_training_forward_on_fake_cuda_in_bf16(paper, kind, document_mask):
    cfg, model, mode, real = paper
    cfg.decoder.document_mask = document_mask
    rec = Recorder()
    with mode:
        batch = {k: mode.from_tensor(v).to("cuda") for k, v in real[kind].items()}
        model.train()
        with _cuda_autocast(), rec:
            out = model(**batch)
    _check(rec.seen)
    assert out.logits.device.type == "cuda" and out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and out.loss.device.type == "cuda"


@pytest.mark.slow
@pytest.mark.parametrize("beams", [1, 3])
def test_cached_generation_on_fake_cuda_in_bf16(paper, beams):
    """Two prompts of other lengths (left-padded) with an image each: the prefill and two cached steps,
    greedy (beams 1) or with beams, the cache reordered by the beams' choice as kosmos.generate's beam
    search does."""
    from kosmos.generate import Prompt, _batch_prompts, _Decoder
    from kosmos.model import evaluating

    cfg, model, mode, real = paper
    L, n = 80, cfg.connector.num_latents
    mask = [False, True, *[True] * (n - 1), False] + [False] * (L - n - 2)
    image = real["captions"]["images"][:1]
    prompts = [Prompt(list(range(1, L + 1 - k)), mask[: L - k], image) for k in (0, 5)]
    ids, image_mask, padding, images = _batch_prompts(prompts, 0, "cpu")
    rec = Recorder()
    with mode, evaluating(model), torch.no_grad():
        ids, image_mask, padding, images = (mode.from_tensor(t).to("cuda") for t in (ids, image_mask, padding,
                                                                                     images))
        with _cuda_autocast(), rec:
            embeds = model.embed(ids, images, image_mask)
            # _Decoder's own __init__ asks the host whether there is padding at all (once per generation):
            # its fields set here, with the padding the prompts have
            dec = _Decoder.__new__(_Decoder)
            dec.model, dec.use_cache, dec.state = model, True, {"is_first_step": True}
            dec.embeds, dec.padding = embeds.repeat_interleave(beams, 0), padding.repeat_interleave(beams, 0)
            logits = dec.first()
            for _ in range(2):
                assert logits.dtype == torch.float32 and logits.device.type == "cuda"
                if beams == 1:
                    tokens = logits.argmax(-1)
                else:
                    scores = torch.log_softmax(logits, -1).view(len(prompts), -1)
                    top = scores.topk(beams, -1).indices  # (B, beams) over beams x vocab
                    rows = (top // logits.shape[-1] + torch.arange(len(prompts), device=top.device)[:, None]
                            * beams).flatten()
                    dec.reorder(rows)
                    tokens = (top % logits.shape[-1]).flatten()
                logits = dec.step(tokens)
    _check(rec.seen)
    assert all(v.device.type == "cuda" for layer in dec.state.values() if isinstance(layer, dict)
               for v in layer.values())
