"""Hugging Face export and import: `kosmos-export-hf CHECKPOINT OUT` writes a folder that `transformers`
loads with `trust_remote_code=True`; `kosmos-import-hf HF_FOLDER OUT` turns one back into a checkpoint.

Neither needs transformers: the export writes JSON, safetensors, a `tokenizers` tokenizer.json and copies
the modelling code in `kosmos/hf/remote/` (which imports torch, transformers, numpy, PIL and the standard
library only, never kosmos) into the folder. docs/export.md.
"""

from pathlib import Path

REMOTE = Path(__file__).resolve().parent / "remote"
"""The remote-code files copied verbatim into every exported folder."""
REMOTE_FILES = ("configuration_kosmos.py", "modeling_kosmos.py", "processing_kosmos.py")
