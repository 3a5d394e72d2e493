"""Imported by the data workers' forkserver only (`kosmos.data.stream.PRELOAD`, multiprocessing's
`set_forkserver_preload`), before it forks any worker; nothing else imports it.

It imports what every worker needs, once, so that a worker forked from the server has it already: torch,
the stream (and with it the packing, samples and shard readers), the tokenizer and SentencePiece, and the
image decoders (PIL, torchvision.io), which `kosmos.image` imports lazily.

And it makes the server ignore SIGTERM. The server runs in the main process's process group, so a SIGTERM
sent to the group (`timeout`, SLURM preemption, a container stop) reaches it too; killed by it, it would
take every worker with it (they die with their parent, `kosmos.procs`) while the main process is still
saving its checkpoint. multiprocessing's server already ignores SIGINT, and ends by itself when the main
process does (at EOF on the pipe that the main process holds).
"""

import contextlib
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)

import torch  # noqa: E402, F401

import kosmos.data.stream  # noqa: E402, F401

for name in ("numpy", "PIL.Image", "sentencepiece", "torchvision.io", "tokenizer"):
    with contextlib.suppress(ImportError):  # what is not installed, a worker does not use
        __import__(name)
