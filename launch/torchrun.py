"""`shotdistill launch`: validate the recipe here, then run torchrun (`shotdistill run` on every rank)
as a child and end, when a rank fails, in one line of ours instead of torchrun's report.

The workers' output passes through as it comes. What torchrun itself prints (its log lines, its
traceback and the failure report that follows) is held back and read: the root cause names the
failing rank and its exit status, and each worker's last line (`shotdistill: error: [rank R] ...`,
see launch/cli.py `rank_tag`) gives the error. The last line is then `shotdistill: error: rank R
failed (exit C): <its error>` and the exit status is the rank's (a stop by SIGTERM that saved a
checkpoint: `shotdistill: stopped by signal ...`, exit 143). SHOTDISTILL_DEBUG=1 passes everything.

Signals: SIGTERM and SIGUSR1 (a scheduler's) are passed to torchrun as SIGTERM, which forwards it
to the workers: they checkpoint and exit 143. Ctrl-C reaches every process of the terminal's group
by itself, so SIGINT is only remembered here (the workers checkpoint and exit 130).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys

# a log line of torchrun's own (glog format, its pid): "E1130 12:51:18.404000 22633 torch/...py:1002] ..."
_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +(\d+) \S+:\d+\] (.*)$")
_WORKER = re.compile(r"^shotdistill: (error: )?\[rank (\d+)\] (.*)$")
_ROOT = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
_SIGNALLED = re.compile(r"got signal: (\d+)")


def parse_master(master: str) -> tuple[str, int]:
    """'HOST:PORT' → (host, port), with a one-line error naming the flag."""
    host, sep, port = master.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--master {master!r}: expected HOST:PORT")
    return host, int(port)


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The torchrun command line that starts `--nproc` workers on this node."""
    if args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"launch: need --nproc >= 1, --nnodes >= 1 and 0 <= --node-rank < "
                         f"--nnodes (got {args.nproc}, {args.nnodes}, {args.node_rank})")
    host, port = parse_master(args.master)
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={args.nproc}", f"--nnodes={args.nnodes}",
            f"--node_rank={args.node_rank}", f"--master_addr={host}", f"--master_port={port}",
            "-m", "launch.cli", "run", args.recipe, *args.overrides]


class _Relay:
    """Passes the workers' stderr through and keeps torchrun's own lines and the workers' final lines."""

    def __init__(self, torchrun_pid: int, out, everything: bool):
        self.pid, self.out, self.everything = str(torchrun_pid), out, everything
        self.held: list[str] = []            # torchrun's text, read at the end
        self.finals: dict[int, str] = {}     # rank -> its last `shotdistill:` line (without the prefix)
        self.traceback: list[str] | None = None
        self.tail = False                    # torchrun's report has begun: the workers are gone

    def line(self, text: str) -> None:
        if self.everything:
            self.out.write(text)
            return
        bare = text.rstrip("\n")
        if self.traceback is not None:       # a traceback block: torchrun's is dropped, a worker's shown
            self.traceback.append(text)
            if bare and not bare.startswith((" ", "Traceback")):
                block, self.traceback = "".join(self.traceback), None
                if "torch/distributed/run.py" in block or "torch.distributed.elastic" in block:
                    self.held.append(block)
                    self.tail = True
                else:
                    self.out.write(block)
            return
        if self.tail:
            self.held.append(text)
            return
        log = _LOG.match(bare)
        if log and log.group(1) == self.pid:
            self.held.append(text)
            return
        worker = _WORKER.match(bare)
        if worker:
            self.finals[int(worker.group(2))] = bare[len("shotdistill: "):].replace(f"[rank {worker.group(2)}] ", "")
            return
        if bare.startswith("Traceback (most recent call last)"):
            self.traceback = [text]
            return
        self.out.write(text)

    def partial(self, text: str) -> None:
        """A progress bar's carriage-return update (no newline yet): shown at once."""
        self.out.write(text)

    def close(self) -> None:
        if self.traceback:
            self.out.write("".join(self.traceback))
        self.out.flush()


def _pump(stream, relay: _Relay) -> None:
    pending = b""
    while True:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            relay.line(line.decode(errors="replace") + "\n")
        cut = pending.rfind(b"\r")
        if cut >= 0:
            relay.partial(pending[:cut + 1].decode(errors="replace"))
            pending = pending[cut + 1:]
        relay.out.flush()
    if pending:
        relay.line(pending.decode(errors="replace"))
    relay.close()


def verdict(returncode: int, relay: _Relay, signalled: int | None) -> tuple[int, str]:
    """(exit status, our one line) of a torchrun that ended with `returncode`."""
    held = "".join(relay.held)
    root = _ROOT.search(held)
    rank, code = (int(root.group(1)), int(root.group(2))) if root else (None, None)
    if code is None:
        got = _SIGNALLED.search(held)
        sig = int(got.group(1)) if got else signalled
        code = 128 + sig if sig else returncode
    elif code < 0:
        code = 128 - code                                 # killed by signal N: 128 + N, as a shell says
    code = code or 1
    if rank is None and relay.finals:
        rank = min(relay.finals)
    message = relay.finals.get(rank) if rank is not None else None
    if message is not None and message.startswith("stopped by signal"):
        return code, f"shotdistill: {message}"
    if message is None and root and 128 < code < 128 + 65:
        message = f"killed by {signal.Signals(code - 128).name}"
    if message is None:                                   # torchrun's own failure: its exception line
        lines = [line for line in held.splitlines() if line.strip() and not line.startswith((" ", "=", "-"))
                 and not _LOG.match(line)]
        message = lines[-1] if lines else f"exited with status {code}"
    who = f"rank {rank}" if rank is not None else "torchrun"
    return code, f"shotdistill: error: {who} failed (exit {code}): {message.removeprefix('error: ')}"


def launch(args: argparse.Namespace) -> int:
    """Validate the whole recipe tree once (one clear error, not one per rank), then run torchrun."""
    from distill.runner import plan
    plan(args.recipe, list(args.overrides))
    argv = torchrun_argv(args)
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")   # torchrun's own default, without its banner
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env)
    signalled: list[int] = []

    def forward(signum, frame) -> None:
        signalled.append(signum)
        if signum != signal.SIGINT:          # Ctrl-C already reached torchrun and the workers
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    relay = _Relay(proc.pid, sys.stderr, everything=bool(os.environ.get("SHOTDISTILL_DEBUG")))
    try:
        _pump(proc.stderr, relay)
        returncode = proc.wait()
    finally:
        proc.stderr.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if returncode == 0:
        return 0
    code, line = verdict(returncode, relay, signal.SIGTERM if signalled and signalled[-1] != signal.SIGINT
                         else (signal.SIGINT if signalled else None))
    print(line, file=sys.stderr, flush=True)
    return code
