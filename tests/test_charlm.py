"""The charlm task: data, batching, state carrying, metrics, baselines, samples, real corpora."""

from __future__ import annotations

import math

import pluggy
import pytest
import torch
import torch.nn.functional as F

from rnnbench import hookspecs
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError, UnknownNameError
from rnnbench.task import detach_state
from rnnbench.tasks import charlm as charlm_module
from rnnbench.tasks.charlm import CharLM
from tests.helpers import train_briefly

CPU = torch.device("cpu")


def tiny_model(task, hidden_size=16, layers=1):
    task.setup()
    torch.manual_seed(0)
    model = task.build_model(lambda n: Encoder("lstm", n, hidden_size, layers), {"embedding_dim": 8})
    return model.eval()


def test_registers_through_the_task_hook():
    pm = pluggy.PluginManager("rnnbench")
    pm.add_hookspecs(hookspecs)
    pm.register(charlm_module)
    assert pm.hook.rnnbench_tasks() == [{"charlm": CharLM}]
    assert CharLM.__doc__.splitlines()[0].startswith("Character-level language modelling")
    assert [m.name for m in CharLM.metrics] == ["perplexity", "bits_per_char"]
    assert CharLM("synthetic").primary_metric.direction == "minimize"


@pytest.mark.parametrize("mode", ["stateful", "stateless"])
def test_synthetic_text_is_learnt_in_both_modes(mode):
    task = CharLM("synthetic", seq_len=32, mode=mode)
    _, scores = train_briefly(task, steps=300, hidden_size=64, hparams={"embedding_dim": 16})
    facts, baseline = task.describe(), task.baseline("valid")
    assert baseline["perplexity"] == pytest.approx(facts["vocab_size"])
    # Far below the uniform and unigram models, and not better than the chain that wrote the text.
    assert scores["perplexity"] < 0.5 * facts["vocab_size"]
    assert scores["perplexity"] < 0.5 * baseline["unigram_perplexity"]
    assert scores["perplexity"] > 0.8 * facts["source_perplexity"]
    assert scores["bits_per_char"] == pytest.approx(math.log2(scores["perplexity"]))


def test_synthetic_corpus_is_deterministic_by_seed():
    first, again, other = CharLM(seed=3), CharLM(seed=3), CharLM(seed=4)
    for task in (first, again, other):
        task.setup()
    assert torch.equal(first._ids["train"], again._ids["train"])
    assert not torch.equal(first._ids["train"], other._ids["train"])
    facts = first.describe()
    assert facts["characters"] == 20 and facts["vocab_size"] == 21  # 20 letters/space + <unk>
    assert sum(facts[f"chars_{s}"] for s in ("train", "valid", "test")) == 50_000
    assert facts["chars_train"] == 45_000 and facts["chars_valid"] == 2_500


def test_stateful_training_batches_continue_each_stream():
    task = CharLM("synthetic", seq_len=16, mode="stateful")
    task.setup()
    ids = task._ids["train"]
    batches = list(task.batches("train", 4, device=CPU, generator=torch.Generator().manual_seed(1)))
    for batch in batches:
        assert batch.inputs.dtype == torch.long and batch.inputs.shape[0] == 4
        assert batch.tokens == batch.inputs.numel()
    for before, after in zip(batches, batches[1:]):
        assert torch.equal(after.inputs[:, 0], before.targets[:, -1])  # each row goes on
    # Training shifts the layout by a random offset below seq_len; each row stays contiguous.
    rows = torch.cat([b.inputs for b in batches], dim=1)
    offset = next(o for o in range(16) if torch.equal(ids[o : o + rows.shape[1]], rows[0]))
    length = (len(ids) - offset - 1) // 4
    assert rows.shape[1] == length and torch.equal(rows[1], ids[offset + length : offset + 2 * length])
    assert [b.extra["new_pass"] for b in batches] == [True] + [False] * (len(batches) - 1)


def test_stateful_evaluation_reads_one_stream_whatever_the_batch_size():
    task = CharLM("synthetic", seq_len=16, mode="stateful")
    task.setup()
    ids = task._ids["valid"]
    for batch_size in (1, 4, 64):
        batches = list(task.batches("valid", batch_size, device=CPU))
        assert all(b.inputs.shape[0] == 1 for b in batches)
        assert torch.equal(torch.cat([b.inputs[0] for b in batches]), ids[:-1])
        assert torch.equal(torch.cat([b.targets[0] for b in batches]), ids[1:])  # every character once
    model = tiny_model(task)
    scores = [task.evaluate(model, "valid", b, device=CPU)["perplexity"] for b in (1, 7, 64)]
    assert scores[0] == scores[1] == scores[2]


def positions_task(seq_len: int) -> tuple[CharLM, int]:
    """A stateful task whose training "text" is its own positions, so a batch shows what it read."""
    task = CharLM("synthetic", seq_len=seq_len, mode="stateful")
    task.setup()
    task._ids["train"] = torch.arange(len(task._ids["train"]))
    return task, len(task._ids["train"])


def capped_epoch(task, generator, batch_size, cap):
    """One epoch stopped after ``cap`` batches, exactly as the trainer stops it (steps_per_epoch)."""
    batches = []
    for batch in task.batches("train", batch_size, device=CPU, generator=generator):
        batches.append(batch)
        if len(batches) >= cap:
            break
    return batches


def test_capped_epochs_resume_the_streams_and_cover_the_whole_training_text():
    # experiments/smoke.yaml: seq_len 32, batch_size 32, steps_per_epoch 20 (a pass is 44 batches).
    task, n = positions_task(seq_len=32)
    generator = torch.Generator().manual_seed(0)
    first, second = (capped_epoch(task, generator, 32, 20) for _ in range(2))
    assert torch.equal(second[0].inputs[:, 0], first[-1].targets[:, -1])  # it resumes, not restarts
    seen = torch.cat([b.inputs.reshape(-1) for b in first + second])
    assert len(seen.unique()) == len(seen) == 2 * 20 * 32 * 32  # no character read twice
    assert len(seen) / n > 0.9  # restarting every epoch read about 48% of the text
    third = capped_epoch(task, generator, 32, 20)
    # The rest of the pass, then a new pass (fresh offset, state reset) fills the capped epoch.
    assert [b.extra["new_pass"] for b in third].index(True) == 44 - 40
    seen = set(torch.cat([seen, *(b.inputs.reshape(-1) for b in third)]).tolist())
    # A pass leaves out fewer than seq_len characters at the start and batch_size at the end.
    assert seen >= set(range(32, n - 32))


def positions_read(batch) -> torch.Tensor:
    """Text positions of a batch's inputs: its slices are views into the split's one id tensor."""
    x = batch.inputs
    rows = torch.arange(x.shape[0]).unsqueeze(1) * x.stride(0)
    return (x.storage_offset() + rows + torch.arange(x.shape[1]) * x.stride(1)).reshape(-1)


class RecordingCharLM(CharLM):
    """Records the training positions of every batch it hands out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs: list[list[torch.Tensor]] = []

    def batches(self, split, batch_size, *, device, generator=None):
        if generator is not None:
            self.epochs.append([])
        for batch in super().batches(split, batch_size, device=device, generator=generator):
            if generator is not None:
                positions = positions_read(batch)
                assert torch.equal(self._ids[split][positions], batch.inputs.reshape(-1))
                self.epochs[-1].append(positions)
            yield batch


def test_the_trainer_with_steps_per_epoch_covers_the_training_text():
    from rnnbench.trainer import Architecture, Trainer

    task = RecordingCharLM("synthetic", seq_len=32)
    trainer = Trainer({"epochs": 3, "steps_per_epoch": 20}, {"device": "cpu"})
    trainer.fit(task, Architecture("lstm"), {"hidden_size": 8, "batch_size": 32, "embedding_dim": 8})
    n = len(task._ids["train"])
    assert [len(epoch) for epoch in task.epochs] == [20, 20, 20]  # batches of the 3 capped epochs
    read = [torch.cat(epoch) for epoch in task.epochs]
    assert len(torch.cat(read[:2]).unique()) == 2 * 20 * 32 * 32  # the second epoch read new text
    assert set(torch.cat(read).tolist()) >= set(range(32, n - 32))  # all of it by the third


def test_uncapped_epochs_each_read_one_whole_pass_as_before():
    task, n = positions_task(seq_len=32)
    generator, replay = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        batches = list(task.batches("train", 32, device=CPU, generator=generator))
        offset = int(torch.randint(32, (1,), generator=replay))  # the one draw per epoch it always made
        length = (n - offset - 1) // 32
        assert int(batches[0].inputs[0, 0]) == offset and len(batches) == math.ceil(length / 32)
        assert torch.equal(
            torch.cat([b.inputs for b in batches], 1).reshape(-1), torch.arange(offset, offset + 32 * length)
        )


def test_a_new_pass_starts_from_a_zero_state():
    task = CharLM("synthetic", seq_len=8)
    model = tiny_model(task)
    batches = iter(task.batches("train", 4, device=CPU, generator=torch.Generator().manual_seed(0)))
    first, second = next(batches), next(batches)
    _, carry = task.training_loss(model, first, None)
    fresh, _ = task.training_loss(model, first, None)
    marked, _ = task.training_loss(model, first, carry)  # first batch of a pass: the carry is dropped
    carried, _ = task.training_loss(model, second, carry)
    dropped, _ = task.training_loss(model, second, None)
    assert first.extra["new_pass"] and marked.item() == fresh.item()
    assert not second.extra["new_pass"] and carried.item() != dropped.item()


def test_stateful_training_carries_a_detached_state_and_stateless_none():
    for mode, carries in (("stateful", True), ("stateless", False)):
        task = CharLM("synthetic", seq_len=8, mode=mode)
        model = tiny_model(task).train()
        batches = iter(task.batches("train", 4, device=CPU, generator=torch.Generator().manual_seed(0)))
        batch, following = next(batches), next(batches)
        loss, carry = task.training_loss(model, batch, None)
        assert loss.dim() == 0 and loss.requires_grad
        if carries:
            h, c = carry[0]
            assert h.shape == (4, 16) and not h.requires_grad and not c.requires_grad
            with_carry, _ = task.training_loss(model, following, carry)
            without, _ = task.training_loss(model, following, None)
            assert with_carry.item() != pytest.approx(without.item())  # the carried state is used
        else:
            assert carry is None


def test_stateless_training_draws_random_windows_of_seq_len():
    task = CharLM("synthetic", seq_len=12, mode="stateless")
    task.setup()
    ids = task._ids["train"]
    batches = list(task.batches("train", 16, device=CPU, generator=torch.Generator().manual_seed(0)))
    assert sum(b.inputs.shape[0] for b in batches) == (len(ids) - 1) // 12
    batch = batches[0]
    assert batch.inputs.shape == (16, 12) and batch.inputs.dtype == torch.long
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    start = next(s for s in range(len(ids)) if torch.equal(ids[s : s + 12], batch.inputs[0]))
    assert torch.equal(ids[start + 1 : start + 13], batch.targets[0])
    again = next(iter(task.batches("train", 16, device=CPU, generator=torch.Generator().manual_seed(0))))
    assert torch.equal(again.inputs, batch.inputs)  # reproducible by the generator


def test_stateless_evaluation_scores_every_character_once():
    task = CharLM("synthetic", seq_len=64, mode="stateless")
    task.setup()
    batches = list(task.batches("valid", 8, device=CPU))
    assert sum(b.tokens for b in batches) == len(task._ids["valid"]) - 1
    targets = torch.cat([b.targets.reshape(-1) for b in batches])
    assert torch.equal(targets, task._ids["valid"][1:])


class RecordingModel(torch.nn.Module):
    """Wraps a model and records what evaluate feeds it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, ids, state=None):
        self.calls.append((ids.dtype, tuple(ids.shape), state is not None))
        return self.model(ids, state)


def test_stateful_evaluation_equals_one_pass_over_the_whole_split():
    task = CharLM("synthetic", seq_len=50, mode="stateful")
    model = tiny_model(task)
    recorder = RecordingModel(model)
    scores = task.evaluate(recorder, "valid", 64, device=CPU)
    # One index-tensor forward per window, state carried from the second window on.
    ids = task._ids["valid"]
    assert len(recorder.calls) == math.ceil((len(ids) - 1) / 50)
    assert all(dtype == torch.long for dtype, _, _ in recorder.calls)
    assert [carried for _, _, carried in recorder.calls] == [False] + [True] * (len(recorder.calls) - 1)
    with torch.no_grad():
        logits, _ = model(ids[:-1].unsqueeze(0))
        nll = F.cross_entropy(logits[0], ids[1:]).item()
    assert scores["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert scores["bits_per_char"] == pytest.approx(nll / math.log(2), rel=1e-5)


def test_stateless_evaluation_starts_every_window_from_zero_state():
    task = CharLM("synthetic", seq_len=40, mode="stateless")
    model = tiny_model(task)
    recorder = RecordingModel(model)
    scores = task.evaluate(recorder, "valid", 16, device=CPU)
    assert not any(carried for _, _, carried in recorder.calls)
    ids, total = task._ids["valid"], 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 40):
            window = ids[start : min(start + 41, len(ids))]
            logits, _ = model(window[:-1].unsqueeze(0))
            total += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
    assert scores["perplexity"] == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-5)


def test_bidirectional_is_refused_with_the_reason():
    task = CharLM("synthetic")
    task.check_architecture(bidirectional=False)
    with pytest.raises(ConfigError, match="causal") as info:
        task.check_architecture(bidirectional=True)
    assert "backward direction reads the very tokens the model must predict" in str(info.value)


def test_unknown_dataset_suggests_the_closest_name():
    with pytest.raises(UnknownNameError, match="did you mean 'tinyshakespeare'"):
        CharLM("tinyshakespear")


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="sum to 1"):
        CharLM(split=[0.9, 0.2, 0.05])
    with pytest.raises(ConfigError, match="unknown option"):
        CharLM(sequence_length=10)
    with pytest.raises(ConfigError, match="mode"):
        CharLM(mode="sometimes")
    with pytest.raises(ConfigError, match="data_path"):
        CharLM("synthetic", data_path="/tmp/x.txt")


def test_text_dataset_reads_a_user_file(tmp_path):
    with pytest.raises(ConfigError, match="data_path"):
        CharLM("text")
    text = "abcab cabca bcabc " * 200 + "XYZ"  # X, Y, Z appear only at the end: test split
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    task = CharLM("text", data_path=path, seq_len=8, split=[0.8, 0.1, 0.1])
    _, scores = train_briefly(task, steps=30, hidden_size=16, hparams={"embedding_dim": 8})
    facts = task.describe()
    assert facts["characters"] == 4 and facts["vocab_size"] == 5  # a b c space + <unk>
    assert sum(facts[f"chars_{s}"] for s in ("train", "valid", "test")) == len(text)
    assert facts["unknown_test"] == 3 and facts["unknown_valid"] == 0
    assert facts["data_file"] == str(path)
    assert math.isfinite(scores["perplexity"])
    assert math.isfinite(task.baseline("test")["unigram_perplexity"])  # smoothed: <unk> costs finitely


def test_samples_artifact_has_the_requested_length_and_is_seeded():
    task = CharLM("synthetic", seq_len=16, sample_prime="abc", sample_length=75, temperature=0.5)
    model = tiny_model(task).train()
    samples = task.artifacts(model, device=CPU)["samples.txt"]
    assert len(samples) == 3 + 75 and samples.startswith("abc")
    assert set(samples[3:]) <= set(task.vocab.itos[1:])  # real characters, never <unk>
    assert model.training  # the mode it came in with is restored
    assert CharLM("synthetic", seq_len=16, sample_prime="abc", sample_length=75, temperature=0.5).artifacts(
        model, device=CPU
    ) == {"samples.txt": samples}
    unknown_prime = CharLM("synthetic").artifacts(model, device=CPU)["samples.txt"]
    assert unknown_prime.startswith("The ") and len(unknown_prime) == 4 + 200  # defaults


def test_tinyshakespeare_from_the_shared_data(shared_data):
    task = CharLM("tinyshakespeare")
    task.setup()
    facts = task.describe()
    assert facts["data_file"] == str(shared_data / "charlm/tinyshakespeare/input.txt")
    assert facts["characters"] == 65 and facts["vocab_size"] == 66  # the char-rnn 65 + <unk>
    assert sum(facts[f"chars_{s}"] for s in ("train", "valid", "test")) == 1_115_394
    assert facts["unknown_valid"] == facts["unknown_test"] == 0
    explicit = CharLM("tinyshakespeare", data_path=shared_data / "charlm/tinyshakespeare/input.txt")
    explicit.setup()
    assert torch.equal(explicit._ids["valid"], task._ids["valid"])


def test_timemachine_with_d2l_preprocessing(shared_data):
    task = CharLM("timemachine", d2l_preprocess=True)
    task.setup()
    facts = task.describe()
    # 26 letters + space + <unk> = d2l's 28 tokens; lines joined with no separator = 170,580 chars.
    assert facts["vocab_size"] == 28 and facts["characters"] == 27
    assert sum(facts[f"chars_{s}"] for s in ("train", "valid", "test")) == 170_580
    assert task.vocab.decode(task._ids["train"][:29].tolist()) == "the time machine by h g wells"
    raw = CharLM("timemachine")
    raw.setup()
    assert sum(raw.describe()[f"chars_{s}"] for s in ("train", "valid", "test")) == 178_979


def test_detach_state_handles_the_encoder_state_list():
    task = CharLM("synthetic", seq_len=8)
    model = tiny_model(task, layers=2).train()
    _, state = model(torch.zeros(2, 5, dtype=torch.long))
    detached = detach_state(state)
    assert isinstance(detached, list) and len(detached) == 2
    assert all(not t.requires_grad for pair in detached for t in pair)
