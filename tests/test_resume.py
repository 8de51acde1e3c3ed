"""Honest resume: a stage is finished only when its marker matches, a re-run never trains past the end, an
incomplete checkpoint is skipped for the last complete one, counts are right after a resume, and a copied run
directory resumes."""
import dataclasses
import json
import shutil

import pytest

from autorule_lib.train.resume import CHECKPOINT_MARKER
from autorule_lib.train.sft import train_sft
from autorule_lib.config import TinyModelConfig
from autorule_lib.profiles import load_profile
from autorule_lib.smoke.models import build_tiny_llama, build_tiny_tokenizer
from test_training import ROWS, StepRecorder, rows_with_content

RUN = rows_with_content(ROWS)


def build_tiny(where):
    cfg = TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    texts = [t for r in RUN for t in (r["prompt"], r["chosen_content"], r["rejected_content"])]
    build_tiny_llama(build_tiny_tokenizer(texts, cfg, where / "tok"), cfg, where / "policy")
    return str(where / "policy")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def smoke(**sft):
    p = load_profile("smoke")
    p.sft = dataclasses.replace(p.sft, **{"global_batch_size": 2, "per_device_batch_size": 2, "save_steps": 2, **sft})
    return p


class CrashAtEnd(StepRecorder):
    """Dies after the last checkpoint is saved and marked, before the stage's finished marker."""

    def on_train_end(self, args, state, control, **kw):
        raise KeyboardInterrupt("killed before done.json")


def read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "sft"
    train_sft(smoke(max_steps=6), RUN, RUN[:2], tiny, out)
    return read(out / "done.json"), read(out / "log_history.json")


def test_kill_between_last_checkpoint_and_marker_finalises_without_training_more(tiny, tmp_path, uninterrupted, capsys):
    profile, out = smoke(max_steps=6), tmp_path / "sft"
    with pytest.raises(KeyboardInterrupt):
        train_sft(profile, RUN, RUN[:2], tiny, out, callbacks=[CrashAtEnd()])
    assert (out / "checkpoint-6").exists() and not (out / "done.json").exists()

    again = StepRecorder()
    train_sft(profile, RUN, RUN[:2], tiny, out, callbacks=[again])
    assert again.steps == []  # not one step past the end
    done = read(out / "done.json")
    assert done["global_step"] == 6 and done["finalised_from"] == "checkpoint-6"
    assert "finalised from it, not trained further" in capsys.readouterr().out
    whole_done, whole_history = uninterrupted
    assert done["train_loss"] == pytest.approx(whole_done["train_loss"], rel=1e-6)
    assert done["num_tokens"] == whole_done["num_tokens"]
    assert (out / "model/model.safetensors").read_bytes() == (out / "checkpoint-6/model.safetensors").read_bytes()


def test_a_marker_with_other_settings_is_not_finished_and_does_not_overtrain(tiny, tmp_path):
    profile, out = smoke(max_steps=4), tmp_path / "sft"
    train_sft(profile, RUN, RUN[:2], tiny, out)
    done = read(out / "done.json")
    (out / "done.json").write_text(json.dumps({**done, "settings_hash": "0000000000000000"}))
    again = StepRecorder()
    train_sft(profile, RUN, RUN[:2], tiny, out, callbacks=[again])
    assert again.steps == [] and read(out / "done.json")["settings_hash"] == done["settings_hash"]
    assert read(out / "done.json")["global_step"] == 4
    (out / "done.json").write_text('{"settings_hash": "')  # cut short by a crash: not finished either
    train_sft(profile, RUN, RUN[:2], tiny, out, callbacks=[StepRecorder()])
    assert read(out / "done.json")["global_step"] == 4


@pytest.mark.parametrize("damage", ["optimizer", "state", "weights"])
def test_incomplete_checkpoint_is_skipped_for_the_last_complete_one(tiny, tmp_path, uninterrupted, capsys, damage):
    profile, out = smoke(max_steps=6), tmp_path / "sft"
    with pytest.raises(KeyboardInterrupt):
        train_sft(profile, RUN, RUN[:2], tiny, out, callbacks=[StepRecorder(crash_at=5)])
    assert (out / "checkpoint-4" / CHECKPOINT_MARKER).exists()
    if damage == "optimizer":
        (out / "checkpoint-4/optimizer.pt").unlink()
    elif damage == "state":  # a save killed while writing the state: and so no marker yet
        (out / "checkpoint-4" / CHECKPOINT_MARKER).unlink()
        (out / "checkpoint-4/trainer_state.json").write_text('{"global_st')
    else:  # a full disk: the weights cut short
        w = out / "checkpoint-4/model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    capsys.readouterr()
    again = StepRecorder()
    train_sft(profile, RUN, RUN[:2], tiny, out, callbacks=[again])
    said = capsys.readouterr().out
    assert again.start_step == 2 and again.steps == [3, 4, 5, 6]
    assert "checkpoint-4 is incomplete" in said and "resuming from checkpoint-2" in said
    assert (out / "incomplete-checkpoint-4").is_dir()  # moved aside, not deleted
    done = read(out / "done.json")
    whole_done, whole_history = uninterrupted
    assert done["global_step"] == 6 and done["num_tokens"] == whole_done["num_tokens"]
    assert done["train_loss"] == pytest.approx(whole_done["train_loss"], rel=1e-4)
    assert [e["loss"] for e in read(out / "log_history.json") if "loss" in e] == pytest.approx(
        [e["loss"] for e in whole_history if "loss" in e], rel=1e-4)


def test_checkpoints_are_marked_complete_and_rotated(tiny, tmp_path):
    out = tmp_path / "sft"
    train_sft(smoke(max_steps=6, save_total_limit=2), RUN, RUN[:2], tiny, out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    marker = read(out / "checkpoint-6" / CHECKPOINT_MARKER)
    assert marker["global_step"] == 6 and "optimizer.pt" in marker["files"] and "model.safetensors" in marker["files"]
    with pytest.raises(Exception, match="save_total_limit: 1 leaves no complete checkpoint"):
        train_sft(smoke(max_steps=2, save_total_limit=1), RUN, RUN[:2], tiny, tmp_path / "b")


def test_model_only_checkpoints_restart_instead_of_resuming_with_a_fresh_optimizer(tiny, tmp_path, capsys):
    profile, out = smoke(max_steps=4, save_only_model=True), tmp_path / "sft"
    with pytest.raises(KeyboardInterrupt):
        train_sft(profile, RUN, RUN[:2], tiny, out, callbacks=[StepRecorder(crash_at=3)])
    assert not (out / "checkpoint-2/optimizer.pt").exists()
    again = StepRecorder()
    train_sft(profile, RUN, RUN[:2], tiny, out, callbacks=[again])
    assert again.steps == [1, 2, 3, 4] and "training restarts from step 0" in capsys.readouterr().out


def test_a_copied_run_directory_resumes(tmp_path):
    run = tmp_path / "run"
    base = build_tiny(run / "models")
    profile = smoke(max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        train_sft(profile, RUN, RUN[:2], base, run / "artifacts/04_sft", callbacks=[StepRecorder(crash_at=3)])
    copy = shutil.copytree(run, tmp_path / "elsewhere" / "copy")
    shutil.rmtree(run)  # moved, not only copied
    again = StepRecorder()
    train_sft(profile, RUN, RUN[:2], str(copy / "models/policy"), copy / "artifacts/04_sft", callbacks=[again])
    assert again.start_step == 2 and again.steps == [3, 4]
    assert not list((copy / "artifacts").glob("04_sft.old*"))  # resumed, not moved aside and retrained
