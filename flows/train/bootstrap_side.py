"""Bootstrap parts in a second process (`procs: 2` in a bootstrap config).

The three parts are independent until the model is assembled, and on a 2-core CPU two processes
with one thread each do more work than one process with two threads (PyTorch splits the small
convolutions and matmuls of these models poorly). So the VAE and then the LLM train in a spawned
process while this one trains SigLIP, the longest part. The second process writes its metrics to
OUT/parts/side.metrics.jsonl, under the steps the one-process run gives them (Bootstrap.first_step),
and its weights through the same atomic part files as always; this process waits for it with a
progress bar, loads the parts, and logs the metrics to metrics.jsonl and MLflow. Nothing else
changes: each part starts from the same initialisation and draws from the same seeded generators as
it does in one process.

Whichever process finishes first leaves its core to the other: the first process checks at every
step whether the second has exited, and the second whether OUT/parts/side.threads (written by the
first when it starts waiting) exists; either then takes all the threads. Only the summation order of
the later steps changes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm


def _train_alone(cfg_dict: dict, parts: list[str], threads: int) -> None:
    """The second process: build the same Bootstrap, train `parts` in order, save each. Errors go
    to a file the first process turns into its one-line message."""
    from flows.train.bootstrap import Bootstrap
    from flows.train.config import TrainConfig

    torch.set_num_threads(threads)
    cfg = TrainConfig.from_dict(cfg_dict)
    out = Path(cfg.out) / "parts"
    part = parts[0]
    try:
        boot = Bootstrap(cfg, progress=False)
        boot.freed_threads = lambda: _read_threads(out / "side.threads")
        with open(out / "side.metrics.jsonl", "w") as boot.log:
            for part in parts:
                boot.step = boot.first_step(part)
                getattr(boot, f"train_{part}")(None)
                boot._save_part(part)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the first process
        (out / "side.error").write_text(f"{part}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise SystemExit(1)


def _read_threads(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or caught half-written
        return 0


class SidePart:
    """`parts` of `boot` training in a spawned process from construction until join()."""

    def __init__(self, boot, parts: list[str]):
        self.boot, self.parts = boot, list(parts)
        self.steps = sum(getattr(boot.b, f"{p}_steps") for p in self.parts)
        self.metrics = boot.parts_dir / "side.metrics.jsonl"
        self.error = boot.parts_dir / "side.error"
        self.handover = boot.parts_dir / "side.threads"
        for stale in (self.metrics, self.error, self.handover):
            stale.unlink(missing_ok=True)
        self.threads = torch.get_num_threads()
        side_threads = max(1, self.threads // 2)
        self.proc = mp.get_context("spawn").Process(
            target=_train_alone, args=(boot.cfg.to_dict(), self.parts, side_threads), daemon=True,
            name="janusflow-bootstrap-" + "-".join(self.parts))
        self.proc.start()
        torch.set_num_threads(max(1, self.threads - side_threads))
        boot.freed_threads = lambda: self.threads if self.proc.exitcode is not None else 0

    def join(self, tracker) -> None:
        """Wait (with a progress bar), then load the parts and log their metrics as if trained here."""
        self.boot.freed_threads = None
        tmp = self.handover.with_suffix(".tmp")
        tmp.write_text(str(self.threads))
        tmp.rename(self.handover)  # this process is done: the second one may use every thread
        name = " + ".join(self.parts)
        bar = tqdm(total=self.steps, desc=f"bootstrap {name} (second process)", unit="step",
                   disable=not self.boot.progress)
        while self.proc.is_alive():
            bar.update(self._rows() - bar.n)
            time.sleep(0.5)
        self.proc.join()
        self.handover.unlink(missing_ok=True)
        bar.update(self._rows() - bar.n)
        bar.close()
        torch.set_num_threads(self.threads)
        if self.proc.exitcode != 0:
            where, reason = name, f"exit code {self.proc.exitcode}"
            if self.error.is_file():  # "<part>: <error>" on its first line
                where, reason = self.error.read_text().splitlines()[0].split(": ", 1)
            raise ValueError(f"bootstrap {where} (second process) failed: {reason}")
        for part in self.parts:
            self.boot._load_part(part)
        for line in self.metrics.read_text().splitlines():
            row = json.loads(line)
            self.boot._write(tracker, row.pop("step"), row)

    def stop(self) -> None:
        """End the second process if it still runs (the first one failed or was interrupted)."""
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)
        torch.set_num_threads(self.threads)

    def _rows(self) -> int:
        try:
            return min(self.steps, sum(1 for line in self.metrics.read_text().splitlines() if "_loss" in line))
        except FileNotFoundError:
            return 0
