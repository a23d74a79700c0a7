"""recipe.py / experiments/recipes.py: flag merging, every recipe's commands accepted by the real
scripts' parsers at both scales, skipping finished steps and resuming interrupted ones, and a small
recipe run end to end with its report."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from common.errors import DataError, UserError
from experiments.recipes import Recipe, merge_flags, run_recipe, split_flags, step_command

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
TOY = str(ROOT / "tests" / "sweep_toy_script.py")

pytestmark = pytest.mark.usefixtures("one_thread_subprocesses")

def test_merge_replaces_flags_with_their_values_and_appends_new_ones():
    base = ["generate", "--model", "gpt2", "--corpus", "a.txt", "b.txt", "--use_cache", "--lr", "1e-5"]
    assert merge_flags(base, ["--corpus", "c.txt", "--lr", "-3", "--epochs", "1"]) == \
        ["generate", "--model", "gpt2", "--corpus", "c.txt", "--use_cache", "--lr", "-3", "--epochs", "1"]
    assert split_flags(["sub", "--a", "--b", "1"]) == [("", ["sub"]), ("--a", []), ("--b", ["1"])]


def test_the_recipes_cover_the_report_and_the_handout():
    names = {p.stem for p in RECIPES}
    assert {"baseline_sentiment", "baseline_paraphrase", "baseline_sonnet", "decoding", "lora_ranks",
            "sparse_attention", "poetry_pretraining", "impossible_distillation", "kd_losses"} <= names


def parse_with_script(command: list[str], smoke: bool) -> None:
    """The command's flags through its script's own parser (and the decoding / sweep checks)."""
    from training.cli import UsageError, generation_config

    script, flags = command[1], command[2:]
    if script == "sweep.py":
        import sweep
        from experiments.space import flags_for, grid_points, parse_space

        from experiments.sweep_spec import SweepSpec

        args = sweep.parse_args(flags)
        SweepSpec(script=args.script, space=args.space, metric=args.metric, out="x", fixed=args.fixed,
                  trials=args.trials, sampler=args.sampler).validate()  # e.g. a fixed flag that is a parameter
        space = parse_space(args.space)
        point = grid_points(space)[0] if args.sampler == "grid" else {k: p.args[0] for k, p in space.items()}
        script, flags = args.script, [*args.fixed, *flags_for(point), "--run_dir", "x"]
    module = importlib.import_module(Path(script).stem)
    try:
        args = module.parse_args(flags)
    except UsageError as exc:  # GPU-scale data (quora-train.csv, the Kaggle poems) is not on this machine
        if smoke or "no such file" not in str(exc):
            raise
        return
    if hasattr(args, "decoding"):
        generation_config(args)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("smoke", [False, True], ids=["gpu", "smoke"])
def test_every_recipe_command_parses(path, smoke, tmp_path):
    recipe = Recipe.load(path)
    assert recipe.about and recipe.report.get("metric")
    for step in recipe.steps:
        command = step_command(recipe, step, tmp_path, smoke)
        parse_with_script(command, smoke)
        if smoke and step.kind != "command":
            assert "cpu" in command and "cuda" not in command
        if not smoke and step.kind != "command":
            assert "cuda" in command


def test_recipe_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("out = 'x'\n[[steps]]\nname = 'a'\n")
    with pytest.raises(DataError, match="bad.toml: step 1 needs name and script"):
        Recipe.load(bad)
    bad.write_text("out = 'x'\n[[steps]\n")
    with pytest.raises(DataError, match="not valid TOML"):
        Recipe.load(bad)


def toy_recipe(tmp_path) -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(f"""
title = "toy"
about = "two learning rates"
out = "{tmp_path / 'gpu'}"
[smoke]
out = "{tmp_path / 'smoke'}"
flags = ["--device", "cpu", "--epochs", "1"]
[[steps]]
name = "low"
script = "{TOY}"
flags = ["--lr", "1e-4", "--epochs", "3", "--device", "cuda"]
[[steps]]
name = "best"
script = "{TOY}"
flags = ["--lr", "1e-3", "--epochs", "3", "--device", "cuda"]
[report]
metric = "dev_score"
""")
    return path


def test_a_recipe_runs_skips_finished_steps_and_ends_with_its_table(tmp_path, capsys):
    path = toy_recipe(tmp_path)
    tables = run_recipe(path, smoke=True)
    lines = [ln for ln in tables.splitlines() if ln.startswith("| low") or ln.startswith("| best")]
    assert [ln.split(" | ")[:2] for ln in lines] == [["| low", "0.0001"], ["| best", "0.001"]]
    assert lines[1].split(" | ")[4] == "4"  # dev score after 1 epoch at lr 1e-3: 1 * (4 - 0)
    assert (tmp_path / "smoke" / "report" / "report.md").is_file()
    capsys.readouterr()
    run_recipe(path, smoke=True)
    assert capsys.readouterr().out.count("finished already") == 2


def test_an_interrupted_step_is_resumed(tmp_path):
    path = toy_recipe(tmp_path)
    recipe = Recipe.load(path)
    target = tmp_path / "smoke" / "low"
    target.mkdir(parents=True)
    (target / "last.pt").write_bytes(b"")
    assert step_command(recipe, recipe.steps[0], tmp_path / "smoke", True)[-2:] == ["--resume", str(target)]


def test_a_failing_step_stops_the_recipe_naming_it(tmp_path):
    path = toy_recipe(tmp_path)
    path.write_text(path.read_text().replace(f'script = "{TOY}"', 'script = "no_such_script.py"', 1))
    with pytest.raises(UserError, match="step low failed \\(exit status 2\\)"):
        run_recipe(path, smoke=True)
    assert not (tmp_path / "smoke" / "best").exists()  # later steps do not run
