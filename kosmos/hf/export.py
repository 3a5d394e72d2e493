"""Export a checkpoint as a Hugging Face folder (the Hub's layout), loadable with `trust_remote_code=True`.

    kosmos-export-hf runs/kosmos hf/kosmos          # a run (its newest checkpoint), a checkpoint, sharded too
    python -m kosmos.hf.export CHECKPOINT OUT

OUT holds config.json (with `auto_map`), generation_config.json (eos, pad, the control tokens suppressed as
`kosmos-generate` does), model.safetensors (the whole model, CLIP tower included; the tied output
projection stored once), the tokenizer (tokenizer.json for transformers' fast tokenizer, no sentencepiece
needed), processor_config.json, the modelling code (configuration_kosmos.py,
modeling_kosmos.py, processing_kosmos.py), README.md (the model card: config, data mixture, tokens seen,
evaluation results found beside the checkpoint) and kosmos_training/ (config.yaml, trainer_state.json and
the tokenizer folder as trained: what `kosmos-import-hf` turns back into a checkpoint). Parameter names are
the training code's, unchanged. This module needs no transformers. docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

from kosmos.errors import KosmosError
from kosmos.hf import REMOTE, REMOTE_FILES

TRAINING = "kosmos_training"
"""The subfolder of an export with the training side's files (config.yaml, trainer_state.json, tokenizer/)."""


class ExportError(KosmosError):
    """A model this export cannot describe (a vision tower or decoder setting the remote code lacks)."""


# ----------------------------------------------------------------------------- config


def hf_config(model) -> dict:
    """config.json of `model` (a kosmos.model.Kosmos)."""
    cfg, d, c = model.cfg, model.cfg.decoder, model.cfg.connector
    visual = model.vision.visual
    blocks = visual.transformer.resblocks
    unsupported = [name for name, bad in [
        ("an attention pool", getattr(visual, "attn_pool", None) is not None),
        ("pooling other than the class token", getattr(visual, "pool_type", "tok") != "tok"),
        ("final_ln_after_pool", getattr(visual, "final_ln_after_pool", False)),
        ("layer scale", not isinstance(blocks[0].ls_1, torch.nn.Identity)),
        ("a conv bias", visual.conv1.bias is not None),
        (f"decoder.activation={d.activation}", d.activation not in ("gelu", "relu", "swish")),
    ] if bad]
    if unsupported:
        raise ExportError(f"the exported modelling code does not implement {', '.join(unsupported)} "
                          f"(vision.model_name={cfg.vision.model_name})")
    ln = visual.ln_pre
    vision = {"image_size": model.vision.image_size, "patch_size": visual.conv1.kernel_size[0],
              "width": model.vision.width, "layers": len(blocks), "heads": blocks[0].attn.num_heads,
              "mlp_width": blocks[0].mlp.c_fc.out_features, "quick_gelu": bool(model.vision.quick_gelu),
              "image_mean": list(model.vision.pixel_mean), "image_std": list(model.vision.pixel_std),
              "layer_norm_eps": ln.eps}
    perceiver = {"num_latents": c.num_latents, "depth": c.depth, "heads": c.heads, "dim_head": c.dim_head,
                 "ff_mult": c.ff_mult}
    return {
        "architectures": ["KosmosForCausalLM"],
        "model_type": "kosmos_pretrain",
        "auto_map": {"AutoConfig": "configuration_kosmos.KosmosConfig",
                     "AutoModelForCausalLM": "modeling_kosmos.KosmosForCausalLM"},
        "vocab_size": d.vocab_size, "hidden_size": d.dim, "intermediate_size": d.ffn_dim,
        "num_hidden_layers": d.layers, "num_attention_heads": d.heads, "hidden_act": d.activation,
        "layer_norm_eps": d.layernorm_eps, "xpos_scale_base": d.xpos_scale_base,
        "max_position_embeddings": d.max_len, "embed_scale": float(model.decoder.embed_tokens.scale),
        "tie_word_embeddings": bool(d.share_embeddings), "vision_config": vision,
        "perceiver_config": perceiver, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def generation_config(tok) -> dict:
    """generation_config.json: kosmos-generate's defaults (greedy, 32 new tokens, stop at eos, the control
    tokens never generated: `kosmos.generate.control_ids`)."""
    from kosmos.generate import control_ids

    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
            "decoder_start_token_id": None, "do_sample": False, "max_new_tokens": 32,
            "suppress_tokens": control_ids(tok)}


# ----------------------------------------------------------------------------- tokenizer


def hf_tokenizer_json(tokenizer_dir: str | Path) -> str:
    """tokenizer.json (the `tokenizers` library's format) from our SentencePiece unigram model: the same
    pieces, ids and scores, identity normalisation (spaces as U+2581, no dummy prefix), byte fallback, the
    control tokens as special added tokens. Control and byte pieces are scored far below every piece and made
    unmatchable where that is not enough, so that text never encodes as them (SentencePiece never matches
    them from text). docs/export.md says where the two can still differ."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    proto = pb.ModelProto()
    proto.ParseFromString((Path(tokenizer_dir) / "tokenizer.model").read_bytes())
    normal, unknown, control, byte = 1, 2, 3, 6
    if proto.trainer_spec.model_type != 1:  # UNIGRAM
        raise ExportError(f"{tokenizer_dir}: only unigram tokenizers are converted (this one is "
                          f"model_type {proto.trainer_spec.model_type})")
    lowest = min(p.score for p in proto.pieces if p.type == normal)
    vocab = [(p.piece, lowest - 1e4 if p.type in (control, byte) else p.score) for p in proto.pieces]
    unk = next(i for i, p in enumerate(proto.pieces) if p.type == unknown)
    tk = Tokenizer(Unigram(vocab, unk_id=unk, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    # The tokenizers library matches every vocabulary entry in text, control and byte pieces too. Scored far
    # below, they still win where the only other path spells a character as <unk> (byte fallback): text
    # "<image>" when "<" is in no piece. Such characters are cut off as pre-tokens of their own, which changes
    # no other segmentation (no piece holds them) and leaves no control or byte piece matchable.
    pieces = [p.piece for p in proto.pieces if p.type == normal]
    named = {ch for p in proto.pieces if p.type in (control, byte) for ch in p.piece}
    orphans = sorted(ch for ch in named if not any(ch in piece for piece in pieces))
    if orphans:
        pattern = Regex("[" + "".join(re.escape(ch) for ch in orphans) + "]")
        tk.pre_tokenizer = pre_tokenizers.Split(pattern, behavior="isolated")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    tk.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                           for p in proto.pieces if p.type in (control, unknown)])
    return tk.to_str(pretty=True)


def write_tokenizer(tokenizer_dir: Path, out: Path, tok, max_len: int) -> None:
    (out / "tokenizer.json").write_text(hf_tokenizer_json(tokenizer_dir), encoding="utf-8")
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    extra = ["<image>", "</image>"]
    (out / "special_tokens_map.json").write_text(json.dumps({**names, "additional_special_tokens": extra},
                                                            indent=2))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "extra_special_tokens": extra,
              "model_max_length": max_len, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True,
              "processor_class": "KosmosProcessor",
              "auto_map": {"AutoProcessor": "processing_kosmos.KosmosProcessor"}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------- weights


def state_dict_for_export(model) -> dict[str, torch.Tensor]:
    """The model's tensors by their training names, each storage once (the tied output projection is left
    out: `tie_word_embeddings` restores it), contiguous, on the CPU."""
    sd = model.state_dict()
    if model.cfg.decoder.share_embeddings:
        sd.pop("decoder.output_projection.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


# ----------------------------------------------------------------------------- model card


def find_eval_results(ckpt: Path, extra: list[Path] = (), step: int | None = None) -> list[dict]:
    """The `kosmos-eval run` summaries (TASK/Nshot/metrics.json under its --out folder) found in the
    checkpoint folder, its run folder and the folders given, of these weights only: a summary whose
    provenance names other weights (another sha256, or a training run's other step) is left out. The newest
    per task and shots."""
    from kosmos.weights import weights_identity

    roots = [ckpt, *extra]
    if ckpt.parent.name == "checkpoints":
        roots.append(ckpt.parent.parent)
    found: dict[tuple, dict] = {}
    sha = None
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.glob("**/*shot/metrics.json"), key=lambda p: p.stat().st_mtime):
            if "checkpoints" in path.relative_to(root).parts[:1]:
                continue  # another checkpoint's folder
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(rec, dict) or "task" not in rec or not isinstance(rec.get("metrics"), dict):
                continue
            source = (rec.get("provenance") or {}).get("checkpoint") or {}
            if source.get("sha256"):
                sha = sha or weights_identity(ckpt)["sha256"]  # read once, only when needed
                if source["sha256"] != sha:
                    continue
            elif source.get("step") is not None and step is not None and source["step"] != step:
                continue
            found[(rec["task"], rec.get("shots"))] = {**rec, "path": str(path)}
    return [found[k] for k in sorted(found, key=str)]


def model_card(cfg, state, evals: list[dict], name: str) -> str:
    """README.md of the export; `state`: the checkpoint's `kosmos.checkpoint.TrainState`, None without one."""
    import yaml

    # the Hub reads the front matter: the library, the task, tags
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags: [kosmos-1, multimodal, custom_code]", "---", "", f"# {name}", "",
             "A KOSMOS-1-style multimodal language model (Huang et al., 2023, arXiv 2302.14045) trained with "
             "kosmos-pretrain. Images enter as spans `<image> [embeddings] </image>` in the text; it "
             "generates text. Exported with `kosmos-export-hf`: the modelling code in this folder needs "
             "torch and transformers only (`trust_remote_code=True`).", "",
             "## Usage", "", "```python",
             "from PIL import Image",
             "from transformers import AutoModelForCausalLM, AutoProcessor",
             "",
             f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
             f'processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)',
             'inputs = processor(text="{image} An image of", images=[Image.open("cat.jpg")], '
             'return_tensors="pt")',
             "out = model.generate(**inputs, max_new_tokens=20)",
             "print(processor.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))",
             "```", "",
             "`{image}` marks where each image goes (without it the images come first), as in "
             "`kosmos-generate`.",
             ""]
    step = state.step if state else None
    sources = cfg.data.active_sources()
    lines += ["## Training", "", f"- steps: {step if step is not None else 'unknown'}"]
    if state and state.tokens:
        lines.append(f"- tokens seen: {state.tokens:,}")
    else:
        per_step = sum(s.tokens_per_step for s in sources.values())
        if per_step and step:
            lines.append(f"- tokens seen: about {per_step * step:,} ({per_step:,} per step x {step} steps)")
    lines += ["", "### Data mixture (tokens per step)", "", "| source | shards | tokens per step |",
              "|---|---|---|"]
    for src_name, src in sources.items():
        shards = ", ".join(str(s) for s in src.shards) or "-"
        lines.append(f"| {src_name} | {shards} | {src.tokens_per_step:,} |")
    lines += ["", "### Evaluation", ""]
    if evals:
        lines += ["| task | shots | metrics | source |", "|---|---|---|---|"]
        for e in evals:
            metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, int | float) else f"{k} {v}"
                                for k, v in e["metrics"].items())
            lines.append(f"| {e['task']} | {e.get('shots', '')} | {metrics} | {Path(e['path']).name} |")
    else:
        lines.append("No `kosmos-eval run` results were found beside the checkpoint.")
    cfg_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    lines += ["", "### Training config", "", "```yaml", cfg_yaml.rstrip(), "```", "",
              "## Licence", "",
              "The weights are the trainer's; the vision tower starts from CLIP (OpenAI's weights: MIT), the "
              "code is kosmos-pretrain's licence. Check the licences of the training data before use.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- export


def export(checkpoint: str | Path, out: str | Path, eval_dirs: list[str | Path] = (),
           overrides: list[str] | None = None) -> Path:
    """Write the Hugging Face folder of `checkpoint` (a checkpoint folder, sharded or not, or a run folder:
    its newest checkpoint) to `out`; returns `out`."""
    from safetensors.torch import save_file

    from kosmos.checkpoint import TrainState
    from kosmos.config import save_config
    from kosmos.generate import load_for_inference
    from kosmos.untrusted import load_json
    from kosmos.weights import find_checkpoint

    ckpt = find_checkpoint(checkpoint)
    out = Path(out)
    if (out / "trainer_state.json").is_file() or (out / "config.yaml").is_file() or \
            ckpt.resolve().is_relative_to(out.resolve()):
        raise ExportError(f"{out} is a checkpoint or holds {ckpt}: give another output folder (the export "
                          "would overwrite its files)")
    model, enc = load_for_inference(str(ckpt), overrides=overrides)
    cfg, tok = model.cfg, enc.tokenizer
    out.mkdir(parents=True, exist_ok=True)

    config = {**hf_config(model), "image_token_id": tok.image_id, "image_end_token_id": tok.image_end_id,
              "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(tok),
                                                           indent=2))
    save_file(state_dict_for_export(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok_dir = Path(tok.path)
    write_tokenizer(tok_dir, out, tok, cfg.decoder.max_len)
    processor = {"processor_class": "KosmosProcessor",
                 "auto_map": {"AutoProcessor": "processing_kosmos.KosmosProcessor"},
                 "num_latents": cfg.connector.num_latents, "image_size": model.vision.image_size,
                 "image_mean": list(model.vision.pixel_mean), "image_std": list(model.vision.pixel_std)}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    for name in REMOTE_FILES:
        shutil.copy2(REMOTE / name, out / name)

    training = out / TRAINING
    shutil.rmtree(training, ignore_errors=True)
    (training / "tokenizer").mkdir(parents=True)
    save_config(cfg, training / "config.yaml")
    for f in sorted(tok_dir.iterdir()):
        if f.is_file():
            shutil.copy2(f, training / "tokenizer" / f.name)
    state = None
    if (ckpt / "trainer_state.json").is_file():
        shutil.copy2(ckpt / "trainer_state.json", training / "trainer_state.json")
        try:
            saved = load_json((ckpt / "trainer_state.json").read_text())
            if isinstance(saved, dict) and "step" in saved:  # an imported checkpoint's is {}: no figures
                state = TrainState.from_dict(saved)
        except (ValueError, TypeError):  # not JSON, or figures that are not numbers
            state = None
    evals = find_eval_results(ckpt, [Path(p) for p in eval_dirs], state.step if state else None)
    (out / "README.md").write_text(model_card(cfg, state, evals, out.name))
    return out


def main(argv: list[str] | None = None) -> int:
    """The command (a `CheckpointError` is one `error: ...` line, exit 2)."""
    from kosmos.errors import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    from kosmos.errors import command_name

    ap = argparse.ArgumentParser(prog=command_name("kosmos.hf.export"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint folder (sharded too), or a run folder (its newest one)")
    ap.add_argument("out", help="output folder (created; files of the same name are replaced)")
    ap.add_argument("--eval", action="append", default=[], metavar="DIR",
                    help="a `kosmos-eval run --out` folder whose results go into the model card (the "
                         "checkpoint's and its run's folders are searched anyway); repeat for several")
    args = ap.parse_args(argv)
    out = export(args.checkpoint, args.out, args.eval)
    print(f"wrote {out} (load with trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
