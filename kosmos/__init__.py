"""KOSMOS-1-style multimodal language model: config, model, vision tower, sequences, generation."""

import warnings

# torchscale/timm import paths still call torch.jit.script at import time; the deprecation notice is
# noise for our users (we never script anything).
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
