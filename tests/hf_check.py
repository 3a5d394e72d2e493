"""The transformers side of tests/test_hf.py, run in its own process (pytest's processes never import
transformers): `PYTHONPATH=.venv/hf-site:. python -m tests.hf_check EXPORT_DIR REFERENCE_DIR`.

REFERENCE_DIR holds what kosmos computed (reference.json, reference.safetensors); this loads EXPORT_DIR with
AutoConfig / AutoModelForCausalLM / AutoTokenizer / AutoProcessor (trust_remote_code=True, local files
only) and prints one JSON line: the largest logits differences, the greedy tokens of transformers'
generate(), the tokenizer's encodings and decodings, the processor's pixels."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path


def main(export: str, ref_dir: str) -> dict:
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    ref = json.loads((Path(ref_dir) / "reference.json").read_text())
    tensors = load_file(str(Path(ref_dir) / "reference.safetensors"))
    out: dict = {}
    config = AutoConfig.from_pretrained(export, trust_remote_code=True, local_files_only=True)
    out["config_class"] = type(config).__name__
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, local_files_only=True,
                                                 dtype=torch.float32).eval()
    out["model_class"] = type(model).__name__
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True, local_files_only=True)
    out["tokenizer_class"] = type(tok).__name__
    proc = AutoProcessor.from_pretrained(export, trust_remote_code=True, local_files_only=True)
    out["processor_class"] = type(proc).__name__

    # the processor: prompts and pixels as kosmos builds them
    image = Image.open(ref["image_path"])
    batch = proc(text=ref["image_prompt_text"], images=[image], return_tensors="pt")
    out["processor_ids_equal"] = batch["input_ids"][0].tolist() == ref["image_prompt_ids"]
    out["pixel_max_diff"] = float((batch["pixel_values"] - tensors["pixels"]).abs().max())
    text_batch = proc(text=ref["text_prompt_text"], return_tensors="pt")
    out["processor_text_ids_equal"] = text_batch["input_ids"][0].tolist() == ref["text_prompt_ids"]

    # logits (fp32; and bf16 against kosmos in bf16)
    with torch.no_grad():
        for name in ("text", "image"):
            ids = torch.tensor([ref[f"{name}_prompt_ids"]])
            kw = {"pixel_values": tensors["pixels"]} if name == "image" else {}
            logits = model(input_ids=ids, **kw).logits
            out[f"{name}_logits_max_diff"] = float((logits - tensors[f"{name}_logits"]).abs().max())
        bf = copy.deepcopy(model).to(torch.bfloat16)
        for name in ("text", "image"):
            ids = torch.tensor([ref[f"{name}_prompt_ids"]])
            kw = {"pixel_values": tensors["pixels"]} if name == "image" else {}
            logits = bf(input_ids=ids, **kw).logits.float()
            out[f"{name}_logits_bf16_max_diff"] = float((logits - tensors[f"{name}_logits_bf16"]).abs().max())

        # greedy generate() through transformers' generation API (the export's generation_config)
        n = ref["max_new_tokens"]
        for name, inputs in (("text", text_batch), ("image", batch)):
            gen = model.generate(**inputs, max_new_tokens=n, do_sample=False)
            new = gen[0, inputs["input_ids"].shape[1]:].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            out[f"{name}_generated"] = new
        # two prompts of different lengths, left-padded, in one batch
        pair = proc(text=ref["batch_texts"], return_tensors="pt")
        gen = model.generate(**pair, max_new_tokens=n, do_sample=False)
        rows = []
        for row in gen[:, pair["input_ids"].shape[1]:].tolist():
            rows.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
        out["batch_generated"] = rows

    # the tokenizer
    out["encodings"] = [tok(s, add_special_tokens=False)["input_ids"] for s in ref["strings"]]
    out["decodings"] = [tok.decode(ids, skip_special_tokens=False) for ids in ref["decode_ids"]]
    out["decodings_skip"] = [tok.decode(ids, skip_special_tokens=True) for ids in ref["decode_ids"]]
    mismatches = [line for line, ids in zip(ref["corpus_lines"], ref["corpus_encodings"], strict=True)
                  if tok(line, add_special_tokens=False)["input_ids"] != ids]
    out["corpus_mismatches"] = len(mismatches)
    out["corpus_mismatch_examples"] = mismatches[:3]
    ours = ("open_clip", "torchscale", "kosmos", "flamingo_pytorch")
    out["loaded_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ours)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
