"""Turn a folder written by `kosmos-export-hf` back into a checkpoint that `kosmos-generate`, `kosmos-eval`
and `kosmos.weights.load_model` read (and `kosmos-train --resume` does not: no optimizer state).

    kosmos-import-hf hf/kosmos runs/imported/step_00001000
    python -m kosmos.hf.import_hf HF_FOLDER OUT_CHECKPOINT

The model is rebuilt from the export's kosmos_training/config.yaml, filled from its model.safetensors (the
same parameter names; the tied output projection restored) and saved as the trainer saves it, with the
config, the tokenizer folder and trainer_state.json beside it. Needs no transformers.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from kosmos.weights import CheckpointError


def import_hf(folder: str | Path, out: str | Path) -> Path:
    """Write the checkpoint of export `folder` to `out`; returns `out`."""
    from safetensors.torch import load_file, save_model

    from kosmos.config import Config
    from kosmos.hf.export import TRAINING
    from kosmos.model import Kosmos
    from kosmos.weights import check_finite, check_safetensors

    folder, out = Path(folder), Path(out)
    training = folder / TRAINING
    weights = folder / "model.safetensors"
    if not (training / "config.yaml").is_file() or not (training / "tokenizer").is_dir():
        raise CheckpointError(f"{folder}: no {TRAINING}/config.yaml and {TRAINING}/tokenizer/; only folders "
                              "written by kosmos-export-hf can be imported")
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no model.safetensors")
    check_safetensors(weights)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(training / "config.yaml", out / "config.yaml")
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    shutil.copytree(training / "tokenizer", out / "tokenizer")
    state = training / "trainer_state.json"
    if state.is_file():
        shutil.copy2(state, out / "trainer_state.json")
    else:
        (out / "trainer_state.json").write_text("{}")
    model = Kosmos(Config.from_checkpoint(out))
    sd = load_file(str(weights))
    if model.cfg.decoder.share_embeddings and "decoder.output_projection.weight" not in sd:
        sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:200]
        raise CheckpointError(f"{weights}: does not fit {TRAINING}/config.yaml ({first})") from None
    check_finite(model, weights)
    save_model(model, str(out / "model.safetensors"))
    return out


def main(argv: list[str] | None = None) -> int:
    """The command (a `CheckpointError` is one `error: ...` line, exit 2)."""
    from kosmos.errors import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    from kosmos.errors import command_name

    ap = argparse.ArgumentParser(prog=command_name("kosmos.hf.import_hf"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a folder written by kosmos-export-hf")
    ap.add_argument("out", help="the checkpoint folder to write")
    args = ap.parse_args(argv)
    print(f"wrote {import_hf(args.folder, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
