"""kosmos-export-hf / kosmos-import-hf: the exported folder loads in transformers (trust_remote_code=True)
and computes what kosmos computes; the import gives the checkpoint back bit for bit.

transformers is not in the venv (open_clip would import it in every process: requirements-hf.txt); `make
setup` installs it into .venv/hf-site, and everything that imports it runs in one subprocess
(tests/hf_check.py) with that folder on its PYTHONPATH. No pytest process imports transformers.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, checkpoint_dir, tiny_model

HF_SITE = Path(os.environ.get("KOSMOS_HF_SITE", ROOT / ".venv" / "hf-site"))
STDLIB = set(sys.stdlib_module_names)
REMOTE_MAY_IMPORT = {"torch", "transformers", "numpy", "PIL"}  # transformers' own dependencies (PIL: images)


def _hf_env(tmp_path: Path) -> dict:
    if not (HF_SITE / "transformers").is_dir():
        pytest.skip(f"transformers is not installed in {HF_SITE} (`make setup` installs it: "
                    "requirements-hf.txt)")
    return {**os.environ, "PYTHONPATH": f"{HF_SITE}{os.pathsep}{ROOT}", "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_the_remote_code_imports_only_torch_transformers_and_the_standard_library():
    from kosmos.hf import REMOTE, REMOTE_FILES

    assert sorted(p.name for p in REMOTE.glob("*.py")) == sorted(REMOTE_FILES)
    siblings = {Path(f).stem for f in REMOTE_FILES}
    for name in REMOTE_FILES:
        tree = ast.parse((REMOTE / name).read_text(), filename=name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # a sibling file of the folder
                    assert node.module in siblings, f"{name}: from .{node.module}"
                    continue
                tops = {node.module.split(".")[0]}
            else:
                continue
            bad = tops - STDLIB - REMOTE_MAY_IMPORT
            assert not bad, f"{name} imports {bad}: the exported folder must work wherever transformers does"


@pytest.mark.slow
def test_exporting_and_importing_never_import_transformers(tmp_path):
    env = _hf_env(tmp_path)  # transformers importable, yet not imported
    code = ("import sys, kosmos.hf.export, kosmos.hf.import_hf; "
            "bad = [m for m in ('transformers', 'open_clip') if m in sys.modules]; assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def _rough_model():
    """A tiny model whose greedy decoding varies token by token (a freshly initialised one repeats one token,
    which would make the generation comparison weak): the decoder's matrices redrawn with std 0.5. Its
    tower runs QuickGELU, as OpenAI's CLIP weights need (the fast tests' GELU)."""
    model = tiny_model("vision.quick_gelu=true")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _reference(model, enc, ref_dir: Path) -> dict:
    """What kosmos computes, for tests/hf_check.py to compare with: logits (fp32 and bf16), greedy tokens,
    the tokenizer's encodings and decodings, the pixels of a photo."""
    from safetensors.torch import save_file

    from kosmos.generate import GenerationConfig, build_prompt, generate
    from kosmos.tokenizer import TINY_CORPUS

    tok = enc.tokenizer
    img_path = ROOT / "assets" / "images" / "coffee.jpg"
    img = enc.load_image(img_path)
    tp, ip = build_prompt(enc, "An image of", []), build_prompt(enc, "{image} This shows", [img])
    ref = {"image_path": str(img_path), "image_prompt_text": "{image} This shows",
           "text_prompt_text": "An image of", "image_prompt_ids": ip.ids, "text_prompt_ids": tp.ids,
           "max_new_tokens": 12, "batch_texts": ["An image of", "The quick brown fox is"]}
    t = {"pixels": model.vision.normalize(img[None])}
    mask = torch.tensor([ip.image_mask])
    with torch.no_grad():
        t["text_logits"] = model(torch.tensor([tp.ids])).logits
        t["image_logits"] = model(torch.tensor([ip.ids]), ip.images, mask).logits
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        t["text_logits_bf16"] = bf16(torch.tensor([tp.ids])).logits.float()
        t["image_logits_bf16"] = bf16(torch.tensor([ip.ids]), ip.images, mask).logits.float()
    gen = GenerationConfig.for_tokenizer(tok, max_new_tokens=ref["max_new_tokens"])
    ref["text_generated"] = generate(model, [tp], gen)[0]
    ref["image_generated"] = generate(model, [ip], gen)[0]
    ref["batch_generated"] = generate(model, [build_prompt(enc, s, []) for s in ref["batch_texts"]], gen)
    ref["strings"] = ["Hello world", "  two  spaces\n\nnew lines\ttab\r\n", "café naïve Ünïcödé — “quotes”",
                      "12345 digits 3.14 -7", "中文字符 and emoji 😀", "", " ", "The cat sat on the mat.\n",
                      "typed <image>, </image>, <s> and <0x41> stay text"]
    ref["encodings"] = [tok.encode(s) for s in ref["strings"]]
    specials = [tok.bos_id, tok.image_id, tok.pad_id, tok.pad_id, tok.image_end_id]
    ref["decode_ids"] = [[*specials, *tok.encode("x y"), tok.eos_id], *ref["encodings"]]
    ref["decodings"] = [tok.decode(i) for i in ref["decode_ids"]]
    ref["decodings_skip"] = [tok.decode(i, skip_special=True) for i in ref["decode_ids"]]
    ref["corpus_lines"] = [line for line in TINY_CORPUS.read_text(encoding="utf-8").splitlines() if line]
    ref["corpus_encodings"] = [tok.encode(line) for line in ref["corpus_lines"]]
    save_file({k: v.contiguous() for k, v in t.items()}, str(ref_dir / "reference.safetensors"))
    (ref_dir / "reference.json").write_text(json.dumps(ref))
    return ref


@pytest.mark.slow
def test_the_export_loads_in_transformers_and_computes_what_kosmos_computes(tmp_path, tiny_tokenizer, capsys):
    from safetensors.torch import load_file

    from kosmos.generate import load_for_inference
    from kosmos.hf.export import TRAINING, main
    from kosmos.hf.import_hf import import_hf
    from kosmos.weights import load_model

    env = _hf_env(tmp_path)
    model = _rough_model()
    model.cfg.tokenizer.path = str(tiny_tokenizer.path)
    checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, model)
    # an evaluation result beside the run goes into the model card
    ev = tmp_path / "run" / "eval" / "coco_caption" / "0shot"
    ev.mkdir(parents=True)
    result = {"task": "coco_caption", "shots": 0, "metrics": {"CIDEr": 0.125}}
    (ev / "metrics.json").write_text(json.dumps(result))
    out = tmp_path / "hf"
    assert main([str(tmp_path / "run"), str(out)]) == 0  # a run folder: its newest checkpoint
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "processor_config.json", "README.md",
            "configuration_kosmos.py", "modeling_kosmos.py", "processing_kosmos.py", TRAINING} <= names
    card = (out / "README.md").read_text()
    assert "coco_caption" in card and "CIDEr 0.125" in card and "decoder:" in card
    assert "trust_remote_code" in card
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_kosmos.KosmosForCausalLM"
    assert config["vision_config"]["quick_gelu"] is True

    model, enc = load_for_inference(str(tmp_path / "run"))
    ref = _reference(model, enc, tmp_path)
    res = subprocess.run([sys.executable, "-m", "tests.hf_check", str(out), str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\nhf: logits max |diff| fp32 text {got['text_logits_max_diff']:.3g} image "
              f"{got['image_logits_max_diff']:.3g}; bf16 text {got['text_logits_bf16_max_diff']:.3g} image "
              f"{got['image_logits_bf16_max_diff']:.3g}; pixels {got['pixel_max_diff']:.3g}; tokenizer "
              f"corpus lines differing {got['corpus_mismatches']}/{len(ref['corpus_lines'])}")
    assert (got["config_class"], got["model_class"], got["processor_class"]) == \
        ("KosmosConfig", "KosmosForCausalLM", "KosmosProcessor")
    assert got["loaded_modules"] == []  # neither kosmos, torchscale nor open_clip behind transformers
    assert got["processor_ids_equal"] and got["processor_text_ids_equal"]
    assert got["pixel_max_diff"] == 0.0
    assert got["text_logits_max_diff"] <= 1e-5 and got["image_logits_max_diff"] <= 1e-5
    assert got["text_logits_bf16_max_diff"] <= 1e-2 and got["image_logits_bf16_max_diff"] <= 1e-2
    assert got["text_generated"] == ref["text_generated"] and len(set(ref["text_generated"])) > 3
    assert got["image_generated"] == ref["image_generated"]
    assert got["batch_generated"] == ref["batch_generated"]  # left padding decodes as kosmos's does
    assert got["encodings"] == ref["encodings"]
    assert got["decodings"] == ref["decodings"] and got["decodings_skip"] == ref["decodings_skip"]
    # SentencePiece sums piece scores in float32, the tokenizers library in float64: near-ties can split
    # differently (docs/export.md)
    assert got["corpus_mismatches"] <= 0.02 * len(ref["corpus_lines"])

    # import-hf: the same weights, bit for bit, and the same logits
    back = import_hf(out, tmp_path / "imported")
    again = load_model(back)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        ids = torch.tensor([ref["text_prompt_ids"]])
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert load_file(str(back / "model.safetensors")).keys() == load_file(
        str(tmp_path / "run" / "checkpoints" / "step_00000007" / "model.safetensors")).keys()


def _checkpoint(tmp_path, tiny_tokenizer):
    model = tiny_model()
    model.cfg.tokenizer.path = str(tiny_tokenizer.path)
    return model, checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, model)


def test_the_export_holds_every_weight_by_its_name_and_a_tokenizer_that_encodes_as_ours(tmp_path,
                                                                                        tiny_tokenizer):
    """Without transformers: the folder's weights are the checkpoint's (CLIP tower included, the tied
    projection once), its config describes the model, and its tokenizer.json (read by the `tokenizers`
    library, as transformers' fast tokenizer does) encodes and decodes as KosmosTokenizer."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from kosmos.hf.export import export
    from kosmos.weights import weights_identity

    model, ckpt = _checkpoint(tmp_path, tiny_tokenizer)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 7, "tokens": 28672}))
    # kosmos-eval's summaries in the run folder: of these weights, of other weights, of another step
    sha = weights_identity(ckpt)["sha256"]
    for task, source in [("vqav2", {"sha256": sha, "step": 7}), ("okvqa", {"sha256": "0" * 64, "step": 7}),
                         ("coco_caption", {"run": "x", "step": 3}), ("flickr30k", {"run": "x", "step": 7})]:
        folder = tmp_path / "run" / "results" / task / "0shot"
        folder.mkdir(parents=True)
        summary = {"task": task, "shots": 0, "metrics": {"score": 0.5}, "provenance": {"checkpoint": source}}
        (folder / "metrics.json").write_text(json.dumps(summary))
    out = export(ckpt, tmp_path / "hf")
    card = (out / "README.md").read_text()
    assert "- steps: 7" in card and "- tokens seen: 28,672" in card and "| captions |" in card
    assert "| vqav2 |" in card and "| flickr30k |" in card
    assert "okvqa" not in card and "coco_caption" not in card
    sd = load_file(str(out / "model.safetensors"))
    want = model.state_dict()
    assert set(want) - set(sd) == {"decoder.output_projection.weight"}  # tied: restored on loading
    assert all(torch.equal(sd[k], want[k]) for k in sd)
    assert any(k.startswith("vision.visual.transformer.resblocks.") for k in sd)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 1000)
    assert config["vision_config"]["quick_gelu"] is False and config["embed_scale"] == 8.0
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 3 and set(gen["suppress_tokens"]) == {0, 1, 2, 4, 5}

    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    tk.encode_special_tokens = True  # tokenizer_config.json's split_special_tokens: text never gives a marker
    ours = tiny_tokenizer
    for text in ["Hello world", "  two  spaces\n\nnew lines\ttab", "café naïve Ünïcödé — “quotes”",
                 "12345 digits 3.14", "中文字符 and emoji 😀", "", " ",
                 "typed <image>, </image>, <s> and <0x41>", "<<image>>x<pad>"]:
        assert tk.encode(text).ids == ours.encode(text), text
        assert tk.decode(ours.encode(text), skip_special_tokens=False) == text
    ids = [ours.bos_id, ours.image_id, ours.pad_id, ours.image_end_id, *ours.encode("x y"), ours.eos_id]
    assert tk.decode(ids, skip_special_tokens=False) == ours.decode(ids) == "<s><image><pad></image>x y</s>"
    assert tk.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special=True) == "x y"


def test_a_sharded_checkpoint_exports_the_same_weights(tmp_path, tiny_tokenizer, one_process_group):
    """A sharded (FSDP2) run's checkpoint is read shard by shard, as kosmos-generate reads it."""
    from safetensors.torch import load_file

    from kosmos.checkpoint import SHARDED, save_sharded
    from kosmos.config import save_config
    from kosmos.hf.export import export
    from kosmos.optim import build_optimizer
    from kosmos.sharding import shard_model
    from tests.helpers import tiny_config

    model = tiny_model(f"tokenizer.path={tiny_tokenizer.path}")
    want = {k: v.clone() for k, v in model.state_dict().items()}
    sharded = shard_model(model)
    ckpt = tmp_path / "step_00000001"
    save_sharded(ckpt / SHARDED, sharded, build_optimizer(sharded, tiny_config("optim.name=adamw").optim))
    save_config(model.cfg, ckpt / "config.yaml")
    sd = load_file(str(export(ckpt, tmp_path / "hf") / "model.safetensors"))
    assert sd.keys() == want.keys() - {"decoder.output_projection.weight"}
    assert all(torch.equal(sd[k], want[k]) for k in sd)


def test_importing_a_folder_kosmos_did_not_write_is_one_line(tmp_path, capsys):
    from kosmos.hf.import_hf import main

    (tmp_path / "other").mkdir()
    assert main([str(tmp_path / "other"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "kosmos-export-hf" in err and err.count("\n") == 1


def test_exporting_into_the_checkpoint_or_its_run_is_refused(tmp_path, tiny_tokenizer, capsys):
    from kosmos.hf.export import main

    _, ckpt = _checkpoint(tmp_path, tiny_tokenizer)
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    for out in (ckpt, tmp_path / "run"):
        assert main([str(ckpt), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "another output folder" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before
