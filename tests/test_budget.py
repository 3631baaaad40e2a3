"""Training to a budget: the pure arithmetic at its edges (training/budget.py), and train.py's
--budget-hours as a user runs it (fewer epochs for less, more for more; on time; kept across a
stop and resume, bit for bit; a budget too small refused in one line)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import EXACT, records, train

from dali_imagenet.config import load_config
from dali_imagenet.training import budget
from standins.imds import StandInIMDS, install_notice_hook

FFCV_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}  # their yamls


def l4_recipe() -> budget.Recipe:
    return budget.Recipe.of(load_config("configs/l4-16h.yaml"))


def rates(recipe: budget.Recipe, rate: float, **changes) -> budget.Rates:
    sizes = {recipe.min_image_size or recipe.image_size, recipe.image_size}
    values = dict(train={px: rate for px in sizes}, warmup_s={px: 60.0 for px in sizes}, val=rate, checkpoint_s=2.0,
                  train_images=1_281_167, val_images=50_000)
    return budget.Rates(**{**values, **changes})


NO_OVERHEADS = budget.Overheads(spent_s=0.0, reserve_share=0.0, relaunches=0.0, relaunch_s=0.0)


def test_ffcv_ramps_come_out_exactly_from_the_40_epoch_recipe():
    recipe = l4_recipe()
    for epochs, ramp in FFCV_RAMPS.items():
        schedule = budget.scaled(recipe, epochs)
        assert (schedule.ramp_start_epoch, schedule.ramp_end_epoch) == ramp
        assert schedule.warmup_epochs == 2  # FFCV's lr_peak_epoch at every count
    assert budget.ladder(recipe) == [*range(1, 16), 16, 24, 32, 40, 56, 88]
    tiny = budget.scaled(recipe, 1)  # ramp inside the run, warm-up at most a quarter of it
    assert 0 <= tiny.ramp_start_epoch <= tiny.ramp_end_epoch <= 1 and tiny.warmup_epochs == 0.25


def test_a_derived_ladder_for_other_recipes():
    recipe = budget.Recipe.of(load_config("configs/imagenette-cpu.yaml"))  # 8 epochs, ramp 4-7
    assert budget.ladder(recipe) == list(range(1, 18))
    assert budget.scaled(recipe, 8) == budget.Schedule(8, 4, 7, 1.0)  # the recipe itself
    sizes = [recipe.size(budget.scaled(recipe, 4), e) for e in range(4)]
    assert sizes[0] == 64 and sizes[-1] == 96  # a shorter run still ends at the largest size


def test_the_longest_schedule_that_fits_and_its_edges():
    recipe = l4_recipe()
    at_900 = rates(recipe, 900.0)
    exact = budget.predict(recipe, budget.scaled(recipe, 40), at_900, NO_OVERHEADS, 1.0)
    assert exact.total_s == pytest.approx(sum(exact.epoch_s))
    train_s = 40 * 1_281_167 / 900
    extras = exact.total_s - train_s  # two warm-ups, 10 validations, 40 x (1 + 2 mid-epoch at 10 min) checkpoints
    assert extras == pytest.approx(2 * 60 + 10 * 50_000 / 900 + 40 * 3 * 2.0)
    # the budget exactly the prediction fits; a second less does not
    assert budget.choose(recipe, at_900, NO_OVERHEADS, exact.total_s).schedule.epochs == 40
    assert budget.choose(recipe, at_900, NO_OVERHEADS, exact.total_s - 1).schedule.epochs == 32
    assert budget.choose(recipe, at_900, NO_OVERHEADS, 1e9).schedule.epochs == 88  # the ladder's top
    # the reserve and the relaunches take from the budget
    reserved = budget.Overheads(spent_s=100.0, reserve_share=0.05, relaunches=2, relaunch_s=600.0)
    with_reserve = budget.predict(recipe, budget.scaled(recipe, 40), at_900, reserved, 20 * 3600)
    assert with_reserve.total_s == pytest.approx(exact.total_s + 100 + 1200)
    assert with_reserve.reserve_s == pytest.approx(3600)
    smaller, larger = (budget.choose(recipe, at_900, reserved, h * 3600).schedule.epochs for h in (8, 30))
    assert smaller < 40 < larger


def test_a_budget_too_small_for_one_epoch_is_refused_in_one_line():
    recipe = l4_recipe()
    one = budget.predict(recipe, budget.scaled(recipe, 1), rates(recipe, 700.0), NO_OVERHEADS, 1.0)
    with pytest.raises(budget.TooSmall) as refused:
        budget.choose(recipe, rates(recipe, 700.0), NO_OVERHEADS, one.total_s - 1)
    assert "too small for one epoch" in str(refused.value) and "\n" not in str(refused.value)
    assert budget.choose(recipe, rates(recipe, 700.0), NO_OVERHEADS, one.total_s).schedule.epochs == 1


def test_budget_seconds_and_measuring_share():
    assert budget.budget_seconds(16, 0, 0.8) == 16 * 3600
    assert budget.budget_seconds(16, 8.0, 0.8) == 10 * 3600  # $8 at $0.80/h: the smaller
    assert budget.budget_seconds(0, 8.0, 0.8) == 10 * 3600
    with pytest.raises(budget.TooSmall, match="price"):
        budget.budget_seconds(0, 8.0, 0.0)
    assert budget.measure_seconds(300, 0.03, 2) == pytest.approx(3.0)
    assert budget.measure_seconds(16 * 3600, 0.03, 2) == 20.0  # capped


def test_projection_behind_ahead_and_on_plan():
    record = {"epoch_s": [100.0, 100.0, 200.0], "total_s": 10 + 400 + 50, "reserve_s": 20.0}
    on_plan = budget.projection(record, 10.0, 1, 110.0, 500.0)
    assert on_plan["behind_s"] == 0 and on_plan["finish_s"] == pytest.approx(460.0) and not on_plan["late"]
    assert on_plan["over_s"] == pytest.approx(-40.0)
    slow = budget.projection(record, 10.0, 1, 160.0, 500.0)  # 50 % slower: the rest taken at that pace
    assert slow["late"] and slow["behind_s"] == pytest.approx(50.0)
    assert slow["finish_s"] == pytest.approx(160 + 300 * 1.5 + 50) and slow["over_s"] > 0
    fast = budget.projection(record, 10.0, 1, 90.0, 500.0)  # ahead: the plan, never faster
    assert fast["behind_s"] < 0 and fast["finish_s"] == pytest.approx(90 + 300 + 50)
    mid = budget.projection(record, 10.0, 2.5, 310.0, 500.0)  # half of the last epoch done, as planned
    assert mid["behind_s"] == pytest.approx(0.0) and mid["finish_s"] == pytest.approx(460.0)
    assert budget.planned_s([1.0, 2.0], 5) == 3.0


# train.py: the tiny recipe of the other train tests, at 3 epochs' worth of budget or so.
# Its ladder: 1 to 88 epochs of 24 steps, ~0.3-1 s each here: 20 s never buys the 88 that 60 s does on
# a quiet machine, nor as many on a loaded one.
BUDGETED = ("image_size=32", "min_image_size=16", "ramp_start_epoch=9", "ramp_end_epoch=15", "image_size_step=16",
            "epochs=40", "val_every=0", "batch_size=4")


def chosen(run_dir) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def started(run_dir) -> dict:
    return [r for r in records(run_dir) if r.get("event") == "started"][0]


@pytest.mark.slow
def test_budget_runs_pick_by_budget_end_on_time_and_refuse_too_little(sample_shards, tmp_path):
    """A small and a large budget on the same machine: fewer epochs for the smaller; each ends
    within its budget, start to end (the prediction comes from rates measured seconds before on
    the same machine; the margin, 25 % or 10 s, whichever is more, is for a shared CPU's stalls:
    one of a few seconds is a third of the small budget); a budget below one epoch: one line,
    nothing written."""
    small, large = tmp_path / "small", tmp_path / "large"
    # 0.2 s: less than measuring alone takes on any machine (an idle one fits an epoch in 2 s)
    refused = train(sample_shards, tmp_path / "none", *BUDGETED, extra=["--budget-hours", str(0.2 / 3600)],
                    check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("error: a budget of 0 s is")
    assert "too small for one epoch" in refused.stderr and not (tmp_path / "none").exists()
    train(sample_shards, large, *BUDGETED, extra=["--budget-hours", str(60 / 3600)])
    # The small budget from what the large run measured on this machine (an idle one trains all 88 epochs in
    # 20 s, a loaded one a few): its start-up and about 40 % of the large schedule's training time.
    large_choice = started(large)["budget"]
    small_s = (large_choice["spent_s"] + 0.4 * (large_choice["total_s"] - large_choice["spent_s"])) / (1 - 0.05)
    train(sample_shards, small, *BUDGETED, extra=["--budget-hours", str(small_s / 3600)])
    picked = {}
    for run_dir, budget_s in ((small, small_s), (large, 60.0)):
        record = started(run_dir)["budget"]
        config = chosen(run_dir)
        assert config["epochs"] == record["schedule"]["epochs"] and config["budget_hours"] * 3600 == pytest.approx(
            budget_s)
        assert record["rates"]["train"] and record["total_s"] + record["reserve_s"] <= budget_s
        end = [r for r in records(run_dir) if r.get("event") == "finished"][0]
        assert end["step"] == config["epochs"] * 24  # every epoch of the schedule chosen, none cut
        notes = [r for r in records(run_dir) if r.get("event") == "budget"]
        assert [n["epoch"] for n in notes] == list(range(1, config["epochs"] + 1))
        assert record["spent_s"] + end["cost"]["wall_hours"] * 3600 <= budget_s + max(0.25 * budget_s, 10)
        picked[budget_s] = config["epochs"]
    assert picked[small_s] < picked[60.0]


def test_a_sigterm_while_the_budget_is_measured_leaves_at_the_next_step(sample_shards, tmp_path, monkeypatch):
    """The measuring takes minutes on a real run (a compile per size): a spot notice or SIGTERM in
    it is heard at the next measured step, exit 75 and nothing written, not after it."""
    import os
    import signal

    from dali_imagenet.run import budgeting

    synced = budgeting._sync
    syncs = []  # one after each size's warm-up and each timed window: many in a whole measuring

    def sigterm_after_the_first_warm_up(device):
        synced(device)
        syncs.append(device)
        if len(syncs) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(budgeting, "_sync", sigterm_after_the_first_warm_up)
    run_dir = tmp_path / "run"
    stopped = train(sample_shards, run_dir, *BUDGETED, extra=["--budget-hours", str(60 / 3600)], check=False)
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == "SIGTERM: stopped during start-up, nothing trained; exit 75"
    assert len(syncs) == 1 and not run_dir.exists()  # left in the first timed window, measuring nothing more


@pytest.mark.slow
def test_a_budget_run_keeps_its_choice_across_a_stop_and_resume_bit_for_bit(sample_shards, tmp_path):
    """Stopped mid-run and resumed with the same command (a spot relaunch): the schedule chosen at
    the start is kept without measuring again, and the weights equal a run given that schedule
    outright: measuring left the run's random state as it was and the resume is exact."""
    split, straight = tmp_path / "split", tmp_path / "straight"
    budget_args = ["--budget-hours", str(40 / 3600)]
    train(sample_shards, split, *EXACT, "max_steps=4", extra=budget_args)
    first = chosen(split)
    record = started(split)["budget"]
    resumed = train(sample_shards, split, *EXACT, extra=[*budget_args, "--resume", "auto"])
    assert "resumed with the schedule chosen at the start" in resumed.stdout
    assert "budget" not in started(split) or started(split)["budget"] == record
    assert [r.get("budget") for r in records(split) if r.get("event") == "started"][-1] == record  # not measured again
    assert {k: chosen(split)[k] for k in record["schedule"]} == record["schedule"] == {k: first[k] for k in
                                                                                       record["schedule"]}
    schedule = [f"{k}={v}" for k, v in record["schedule"].items()]
    train(sample_shards, straight, *EXACT, *schedule)
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (split, straight))
    assert a["state"]["step"] == b["state"]["step"] == record["schedule"]["epochs"] * 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "raw weights differ"
    assert all(torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]) for k in a["ema"]["weights"])


def test_config_budget_fields_are_checked():
    cfg = load_config(None, ["budget_hours=2", "budget_reserve=0.1"])
    assert dataclasses.asdict(cfg)["budget_hours"] == 2.0
    from dali_imagenet.config import ConfigError

    for bad in ("budget_hours=-1", "budget_reserve=0.6", "budget_measure_share=0"):
        with pytest.raises(ConfigError, match="budget"):
            load_config(None, [bad])


def plan_table(*args) -> str:
    from conftest import run_in_process

    from benchmarks import plan as planner

    result = run_in_process(planner.main, ["plan", "--config", "configs/l4-16h.yaml", *map(str, args)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_plan_budget_table_from_a_given_rate():
    table = plan_table
    at_700 = table("--budget-hours", 16, "--rate", 700)
    rows = {line.split("|")[1].strip(): line for line in at_700.splitlines() if line.startswith("| ") and "---" not in
            line and "epochs" not in line}
    assert list(rows) == ["16", "24", "32"]  # what fits, and the first that does not
    assert "73.8 %" in rows["16"] and rows["24"].endswith("| yes |") and rows["32"].endswith("| no |")
    assert "| 160-192 |" in rows["16"] and "| 11-13 |" in rows["16"]  # FFCV's ramp for 16 epochs
    by_dollars = table("--budget-dollars", 16 * 0.8048, "--rate", 700)  # the same budget in dollars
    assert by_dollars.splitlines()[1:] == at_700.splitlines()[1:]
    assert "too small for one epoch" in table("--budget-hours", 0.1, "--rate", 700)


@pytest.mark.slow
def test_plan_budget_table_from_rates_measured_here():
    measured = plan_table("--budget-hours", 0.2, "--device", "cpu", "--seconds", 0.1, "--train-images", 64,
                     "--val-images", 16, "--shards-gb", 0, *[f"--set={item}" for item in (
                         "arch=resnet10", "width=16", "batch_size=4", "compile=false", "min_image_size=32",
                         "image_size=64", "val_image_size=32", "ema_decay=0")])
    assert "train rate measured on cpu (step only: no --data)" in measured and "| 88 |" in measured  # all fit


def test_rates_carried_by_pixels():
    measured = {64: 128.0, 96: 64.0}
    assert budget.interpolated_rate(measured, 64) == 128.0 and budget.interpolated_rate(measured, 112) == 64.0
    share = (80**2 - 64**2) / (96**2 - 64**2)  # an image's seconds, linear in its pixels
    assert budget.interpolated_rate(measured, 80) == pytest.approx(1 / ((1 - share) / 128 + share / 64))
    assert budget.pixel_rate(400.0, 64, 128) == pytest.approx(100.0)
    # raw + EMA with flips at 256 px against a train step at 192 px: 3 x (192/256)^2 / 4 of the train rate
    assert budget.validation_rate(700.0, 192, 256, 4) == pytest.approx(700 * 3 * 0.5625 / 4)


@pytest.fixture
def imds():
    server = StandInIMDS()
    yield server
    server.close()


@pytest.mark.slow
def test_a_budget_run_stopped_by_a_spot_notice_keeps_its_choice_on_a_new_machine(sample_shards, s3_bucket, imds,
                                                                                tmp_path, monkeypatch):
    """The notice at step 3 (exit 75, the checkpoint in S3), then SkyPilot's relaunch: the same
    command on a new machine (an empty --out, --resume auto from S3): the schedule comes from the
    checkpoint, nothing is measured again, and the run ends where one given that schedule outright does."""
    from conftest import child_env
    from test_spot import SETS

    from dali_imagenet.run import exits

    url, budget_args = f"s3://{s3_bucket}/runs/budget", ["--budget-hours", str(40 / 3600)]
    hooks = dict(NOTICE_URL=imds.notice_url, NOTICE_AT="step", NOTICE_STEP="3")
    on_spot = child_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url, AWS_EC2_METADATA_DISABLED="false", **hooks)
    install_notice_hook(hooks, monkeypatch.setattr)
    first = train(sample_shards, tmp_path / "first", *SETS, extra=[*budget_args, "--s3", url], env=on_spot, check=False)
    monkeypatch.undo()
    assert first.returncode == exits.RECLAIM, first.stderr[-3000:]
    record = started(tmp_path / "first")["budget"]
    second = train(sample_shards, tmp_path / "second", *SETS,
                   extra=[*budget_args, "--resume", "auto", "--s3", url, "--spot", "off"])
    assert "resumed with the schedule chosen at the start" in second.stdout
    assert started(tmp_path / "second")["budget"] == record  # from the checkpoint, not measured again
    schedule = [f"{k}={v}" for k, v in record["schedule"].items()]
    train(sample_shards, tmp_path / "straight", *SETS, *schedule)
    a, b = (torch.load(d / "final_weights.pt", weights_only=True) for d in (tmp_path / "second", tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a), "stopped on a notice + relaunched != the schedule run straight"
