"""What rnnbench's Trainer costs over a bare PyTorch loop: the same model, the same batches.

Both sides train the same LSTM model from the same initial weights on the same batches, with the
same optimizer, gradient clipping and one validation pass per block, on one of two tasks:

- ``--task charlm`` (default): a char-level language model, stateful (tinyshakespeare when it is
  found through $RNNBENCH_DATA, else the synthetic corpus); full-length batches;
- ``--task sentiment``: SST-2 (else the synthetic texts), variable-length texts in length-bucketed,
  padded batches: padding, packing and the pooling of the last real position are where a harness's
  overhead hides. The bare side packs with ``pack_padded_sequence`` and classifies ``h_n``.

The two sides:

- rnnbench: ``Trainer.fit`` with everything ``rnnbench run`` adds (the Encoder, per-step loss and
  gradient-norm accumulation, NaN checks, per-epoch metrics logged to an MLflow store, best-epoch
  checkpoint, the task's artifacts). One epoch of ``--steps`` steps is one block;
- bare: ``nn.Embedding -> nn.LSTM -> nn.Linear`` and a hand-written loop.

The two alternate block by block: a callback at the end of each Trainer epoch runs one bare block,
and its time is taken out of the Trainer's. Prints tokens/s of each and their ratio (target >= 0.9).
Both sides must end with the same training loss, which shows the work was the same.

    python benchmarks/overhead.py                      # ~1-2 minutes on 2 cores
    python benchmarks/overhead.py --task sentiment
    python benchmarks/overhead.py --dataset synthetic --blocks 3 --steps 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rnnbench.encoder import Encoder
from rnnbench.errors import DataError
from rnnbench.tasks.charlm import DATA_FILES, CharLM
from rnnbench.tasks.sentiment import SentimentTask
from rnnbench.trainer import (
    Architecture,
    Budget,
    Callback,
    RunSettings,
    Trainer,
    resolve_device,
    seed_everything,
)


class BareCharLM(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids, state=None):
        out, state = self.lstm(self.embedding(ids), state)
        return self.head(out), state


class BareSentiment(nn.Module):
    """The hand-written classifier: pack, run nn.LSTM, classify the final hidden state."""

    def __init__(self, vocab_size: int, embedding_dim: int, hidden: int, classes: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(embedding_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens, lengths):
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1])
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h_n, _) = self.lstm(packed)
        return self.head(h_n[-1])


class BareLoop:
    """The hand-written side: train ``steps`` batches, then one validation pass, like a Trainer epoch."""

    def __init__(self, task: CharLM, model: BareCharLM, args, device: torch.device):
        self.task, self.model, self.args, self.device = task, model, args, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        # Same seed and same draws as the Trainer's generator: the same batches in the same order.
        self.generator = torch.Generator().manual_seed(args.seed)
        self.losses: list[float] = []

    def block(self, steps: int) -> int:
        model, tokens, state = self.model, 0, None
        model.train()
        loss_sum = torch.zeros(())
        batches = self.task.batches(
            "train", self.args.batch_size, device=self.device, generator=self.generator
        )
        for step, batch in enumerate(batches, 1):
            if isinstance(model, BareSentiment):
                loss = F.cross_entropy(model(batch.inputs, batch.lengths), batch.targets)
            else:
                logits, state = model(batch.inputs, state)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), self.args.clip_norm)
            self.optimizer.step()
            if state is not None:
                state = tuple(s.detach() for s in state)
            loss_sum += loss.detach()
            tokens += batch.tokens
            if step == steps:
                break
        self.losses.append(float(loss_sum) / step)
        self.validate()
        return tokens

    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        if isinstance(self.model, BareSentiment):
            correct = total = 0
            for batch in self.task.batches("valid", self.args.batch_size, device=self.device):
                correct += int((self.model(batch.inputs, batch.lengths).argmax(-1) == batch.targets).sum())
                total += batch.targets.numel()
            self.model.train()
            return correct / total
        nll, chars, state = 0.0, 0, None
        for batch in self.task.batches("valid", self.args.batch_size, device=self.device):
            logits, state = self.model(batch.inputs, state)
            nll += float(F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="sum"))
            chars += batch.tokens
        self.model.train()
        return math.exp(nll / chars)


class Interleave(Callback):
    """Runs one bare block after each Trainer epoch and keeps both sides' times per block."""

    def __init__(self, bare: BareLoop):
        self.bare = bare
        self.trainer_s: list[float] = []
        self.bare_s: list[float] = []
        self.tokens: list[int] = []
        self.mark = 0.0

    def on_fit_start(self, info) -> None:
        self.mark = time.perf_counter()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        start = time.perf_counter()
        self.trainer_s.append(start - self.mark)
        self.tokens.append(self.bare.block(self.bare.args.steps))
        self.mark = time.perf_counter()
        self.bare_s.append(self.mark - start)

    def on_fit_end(self, result) -> None:
        self.trainer_s[-1] += time.perf_counter() - self.mark  # best checkpoint reload, samples


class EpochLogger(Callback):
    """What ``rnnbench run`` logs per trial: parameter counts, data facts, one metrics batch per epoch."""

    def __init__(self, tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def on_fit_start(self, info) -> None:
        self.tracker.log_metrics(self.run_id, {"params_total": info["parameters"]["total"]})
        self.tracker.log_params(self.run_id, {f"data.{k}": v for k, v in info["data"].items()})

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step=epoch)


def choose_dataset(task: str, name: str) -> str:
    """The real dataset when its files are found offline (never downloaded here), else synthetic."""
    if name != "auto":
        return name
    from rnnbench.data.resolve import resolve
    from rnnbench.tasks.sentiment import SST2_FILES

    dataset, files = {
        "charlm": ("tinyshakespeare", [DATA_FILES["tinyshakespeare"]]),
        "sentiment": ("sst2", list(SST2_FILES.values())),
    }[task]
    try:
        for file in files:
            resolve(file, offline=True)
        return dataset
    except DataError:
        return "synthetic"


def bare_copy(model: nn.Module, task, args) -> nn.Module:
    """A bare model holding the very initial weights the Trainer's model starts from."""
    vocab_size = task.describe()["vocab_size"]
    if isinstance(task, SentimentTask):
        bare = BareSentiment(vocab_size, args.embedding_dim, args.hidden, len(task.classes))
    else:
        bare = BareCharLM(vocab_size, args.embedding_dim, args.hidden)
    cell = model.encoder.cells[0]
    with torch.no_grad():
        bare.embedding.weight.copy_(model.embedding.weight)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(bare.lstm, f"{name}_l0").copy_(getattr(cell, name))
        bare.head.load_state_dict(model.head.state_dict())
    return bare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["charlm", "sentiment"], default="charlm")
    parser.add_argument("--dataset", choices=["auto", "tinyshakespeare", "sst2", "synthetic"], default="auto")
    parser.add_argument("--blocks", type=int, default=6, help="interleaved blocks (= Trainer epochs)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per block")
    parser.add_argument("--batch-size", type=int, help="default: 32 (charlm), 64 (sentiment)")
    parser.add_argument("--seq-len", type=int, default=64, help="charlm's window")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--home", help="folder of the MLflow store (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.batch_size = args.batch_size or (64 if args.task == "sentiment" else 32)
    dataset = choose_dataset(args.task, args.dataset)
    if args.task == "sentiment":
        task = SentimentTask(dataset, seed=args.seed)  # pooling "final": the last real position
    else:
        task = CharLM(dataset, seq_len=args.seq_len, seed=args.seed)
    task.setup()

    hparams = {
        "hidden_size": args.hidden,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "clip_norm": args.clip_norm,
        "embedding_dim": args.embedding_dim,
    }
    arch = Architecture("lstm")

    def encoder(n: int) -> Encoder:
        return Encoder("lstm", n, args.hidden)

    seed_everything(args.seed)  # exactly as Trainer.fit does before it builds the model
    bare_model = bare_copy(task.build_model(encoder, hparams), task, args).to(device)
    bare = BareLoop(task, bare_model, args, device)

    from rnnbench.tracking import Tracker, tracking_uri_for

    with tempfile.TemporaryDirectory() as scratch:
        home = Path(args.home or scratch)
        tracker = Tracker(tracking_uri_for(home), "overhead", artifact_root=home / "artifacts")
        settings = RunSettings(device=str(device))
        # Warm-up (kernels, plugin registry, MLflow sessions): one tiny fit and one bare step, untimed.
        warm_up = Trainer(Budget(epochs=1, steps_per_epoch=2), settings)
        warm_up.fit(task, arch, hparams, seed=args.seed, callbacks=[], setup_done=True)
        BareLoop(task, bare_copy(task.build_model(encoder, hparams), task, args), args, device).block(2)

        interleave = Interleave(bare)
        started = time.perf_counter()
        run_id = tracker.start_run("overhead", {"stage": "overhead", "cell": "lstm"})
        tracker.log_params(run_id, hparams)
        trainer = Trainer(Budget(epochs=args.blocks, steps_per_epoch=args.steps), settings)
        result = trainer.fit(
            task,
            arch,
            hparams,
            seed=args.seed,
            callbacks=[EpochLogger(tracker, run_id), interleave],
            setup_done=True,
        )
        tracker.log_metrics(run_id, result.summary, step=result.best_epoch)
        for filename, text in result.artifacts.items():
            tracker.log_text(run_id, text, filename)
        tracker.end_run(run_id)
        # Everything since the run started, bare blocks taken out: the run's own logging calls count.
        trainer_total = time.perf_counter() - started - sum(interleave.bare_s)

    tokens = sum(interleave.tokens)
    trainer_rate = tokens / trainer_total
    bare_rate = tokens / sum(interleave.bare_s)
    paired = [b / t for t, b in zip(interleave.trainer_s, interleave.bare_s)]
    trainer_loss = result.history[-1].metrics["train_loss"]
    what = (
        "padded, length-bucketed batches" if args.task == "sentiment" else f"seq_len {args.seq_len}, stateful"
    )
    print(
        f"{args.task} on {dataset} ({what}), lstm hidden {args.hidden}, "
        f"batch {args.batch_size}; {args.blocks} interleaved blocks of {args.steps} steps + validation; "
        f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(
        f"rnnbench Trainer : {trainer_rate:10,.0f} tokens/s  (Encoder, metrics, MLflow logging, checkpoint, samples)"
    )
    print(f"bare PyTorch loop: {bare_rate:10,.0f} tokens/s  (nn.LSTM, same batches, clipping, validation)")
    print(
        f"ratio Trainer/bare: {trainer_rate / bare_rate:.3f} overall, {statistics.median(paired):.3f} median "
        f"of per-block ratios [{min(paired):.3f}-{max(paired):.3f}] (target >= 0.95)"
    )
    same = abs(trainer_loss - bare.losses[-1]) <= 1e-3 * max(1.0, abs(trainer_loss))
    print(
        f"same computation: last-block train loss {trainer_loss:.5f} (Trainer) vs {bare.losses[-1]:.5f} (bare)"
        + ("" if same else "  <- DIFFERENT: the comparison is not like for like")
    )


if __name__ == "__main__":
    main()
