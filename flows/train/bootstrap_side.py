"""One bootstrap part in a second process (`procs: 2` in a bootstrap config).

The three parts are independent until the model is assembled, and on a 2-core CPU two processes
with one thread each do more work than one process with two threads (PyTorch splits the VAE's small
convolutions poorly). So the VAE, the longest part, trains in a spawned process while this one
trains SigLIP and the LLM. The second process writes its metrics to OUT/parts/vae.metrics.jsonl and
its weights through the same atomic part file as always; this process waits for it with a progress
bar, loads the part, and logs its metrics to metrics.jsonl and MLflow under the steps the
sequential run would have given them. Nothing else changes: the part starts from the same
initialisation and draws from the same seeded generators as it does in one process.

Whichever process finishes first leaves its core to the other: the first process checks at every
step whether the second has exited, and the second whether OUT/parts/<part>.threads (written by the
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


def _train_alone(cfg_dict: dict, part: str, threads: int) -> None:
    """The second process: build the same Bootstrap, train `part`, save it. Errors go to a file
    the first process turns into its one-line message."""
    from flows.train.bootstrap import Bootstrap
    from flows.train.config import TrainConfig

    torch.set_num_threads(threads)
    cfg = TrainConfig.from_dict(cfg_dict)
    parts = Path(cfg.out) / "parts"
    try:
        boot = Bootstrap(cfg, progress=False)
        boot.freed_threads = lambda: _read_threads(parts / f"{part}.threads")
        with open(parts / f"{part}.metrics.jsonl", "w") as boot.log:
            getattr(boot, f"train_{part}")(None)
        boot._save_part(part)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the first process
        (parts / f"{part}.error").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise SystemExit(1)


def _read_threads(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or caught half-written
        return 0


class SidePart:
    """`part` of `boot` training in a spawned process from construction until join()."""

    def __init__(self, boot, part: str):
        self.boot, self.part = boot, part
        self.steps = getattr(boot.b, f"{part}_steps")
        self.metrics = boot.parts_dir / f"{part}.metrics.jsonl"
        self.error = boot.parts_dir / f"{part}.error"
        self.handover = boot.parts_dir / f"{part}.threads"
        for stale in (self.metrics, self.error, self.handover):
            stale.unlink(missing_ok=True)
        self.threads = torch.get_num_threads()
        side_threads = max(1, self.threads // 2)
        self.proc = mp.get_context("spawn").Process(
            target=_train_alone, args=(boot.cfg.to_dict(), part, side_threads), daemon=True,
            name=f"janusflow-bootstrap-{part}")
        self.proc.start()
        torch.set_num_threads(max(1, self.threads - side_threads))
        boot.freed_threads = lambda: self.threads if self.proc.exitcode is not None else 0
        self.first_step = boot.step
        boot.step += self.steps  # the parts after it count on from where it will end

    def join(self, tracker) -> None:
        """Wait (with a progress bar), then load the part and log its metrics as if trained here."""
        self.boot.freed_threads = None
        tmp = self.handover.with_suffix(".tmp")
        tmp.write_text(str(self.threads))
        tmp.rename(self.handover)  # this process is done: the second one may use every thread
        bar = tqdm(total=self.steps, desc=f"bootstrap {self.part} (second process)", unit="step",
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
            reason = (self.error.read_text().splitlines()[0] if self.error.is_file()
                      else f"exit code {self.proc.exitcode}")
            raise ValueError(f"bootstrap {self.part} (second process) failed: {reason}")
        step = self.boot.step
        self.boot._load_part(self.part)
        self.boot.step = step
        for line in self.metrics.read_text().splitlines():
            row = json.loads(line)
            self.boot._write(tracker, self.first_step + row.pop("step"), row)

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
