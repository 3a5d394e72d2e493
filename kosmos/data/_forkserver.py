"""Imported by the data workers' forkserver only (`kosmos.data.workers.PRELOAD`, multiprocessing's
`set_forkserver_preload`), before it forks any worker; nothing else imports it.

It imports what every worker needs, once, so that a worker forked from the server has it already: torch,
the stream (and with it the packing, samples and shard readers), the tokenizer and SentencePiece, and the
image decoders (PIL, torchvision.io), which `kosmos.image` imports lazily.

And it makes the server ignore SIGTERM. The server runs in the main process's process group, so a SIGTERM
sent to the group (`timeout`, SLURM preemption, a container stop) reaches it too. Killed by it, it would
take every worker down in the main process's eyes, while the main process still needs batches to finish
its step and save: multiprocessing learns a forkserver child's exit from the server, and a dead server reads
as workers that "exited unexpectedly" (checked: tests/test_hostile_train.py). It ignores SIGINT
from here too, so that workers are born ignoring it (see below); the server ends by itself once the main
process and the workers have ended (at EOF on the pipe they hold).
"""

import contextlib
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
# SIGINT too, although multiprocessing's server ignores it: the server gives each child the handler it found
# at its start, and a worker that met Ctrl-C (a SIGINT to the group) before its worker_init_fn ran would die
# of Python's KeyboardInterrupt; ignored from here on, a worker is born ignoring both.
signal.signal(signal.SIGINT, signal.SIG_IGN)
# And blocked: torch's DataLoader worker loop installs a SIGTERM handler of its own as it starts (in C: print,
# then die), before our worker_init_fn replaces it; a SIGTERM to the group in between killed the worker
# (seen under load: a worker gone with -15). Blocked here, a worker is born with both signals held pending;
# kosmos.data.workers._worker_signals unblocks them once its own handlers are in place.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

import torch  # noqa: E402, F401

import kosmos.data.stream  # noqa: E402, F401

for name in ("numpy", "PIL.Image", "sentencepiece", "torchvision.io", "kosmos.tokenizer"):
    with contextlib.suppress(ImportError):  # what is not installed, a worker does not use
        __import__(name)
