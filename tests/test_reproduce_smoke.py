"""Smoke test of benchmarks/reproduce.py: one real cell (MiniLM, SST-2, Dual-CP at 60% FLOPs) end to
end through ``run_cell`` on a tiny subset (with ``--compensate lstsq``), then the cache skip on rerun."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_bench(script: str):
    """Import a script of benchmarks/ as a module (they are scripts, not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))  # for the scripts' own imports of each other
    name = f"{script}_bench"
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod



def test_cell_end_to_end_and_cache_skip(tmp_path, minilm_path):
    rp = _load_bench("reproduce")
    recipe = rp.Recipe(name="smoke", calibration_samples=64, train_limit={"sst2": 48}, eval_limit=48,
                       batch_size=16, fidelity_sentences=24)
    cell = rp.Cell.parse("sst2/dual-cp-lstsq/0.6/0")  # Dual-CP + --compensate lstsq: the whole prune path
    results, cache = tmp_path / "results", tmp_path / "cache"
    start = time.perf_counter()
    res, computed = rp.run_cell(cell, recipe=recipe, results_dir=results, cache_dir=cache, model_path=Path(minilm_path))
    assert computed
    assert time.perf_counter() - start < 60

    path = results / "sst2__dual-cp-lstsq__0.6__s0.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["cell"] == "sst2/dual-cp-lstsq/0.6/0" and on_disk["recipe_key"] == recipe.key()
    comp = on_disk["prune"]["compensation"]
    assert comp["method"] == "lstsq" and comp["accepted"] > 0 and comp["mean_error_after"] < comp["mean_error_before"]
    assert on_disk["prune"]["flops_ratio"] <= 0.6 + 1e-9
    assert on_disk["prune"]["params_after"] < on_disk["prune"]["params_before"]
    # pruning changes the embeddings, but the pruned model still resembles the dense one
    assert 0.0 < on_disk["fidelity"]["mean_cosine"] < 0.9999
    ft = on_disk["finetune"]
    assert ft["metric"] == "accuracy" and 0.0 <= ft["best_metric"] <= 1.0
    assert ft["train_examples"] == 48 and ft["eval_examples"] == 48 and ft["train_seconds"] > 0
    # weights are deleted from the cache; only the small JSON stays
    assert not any(p.suffix == ".safetensors" for p in cache.rglob("*"))

    # rerun: skipped from the cache, instantly, same numbers; a forced run recomputes
    start = time.perf_counter()
    again, computed = rp.run_cell(cell, recipe=recipe, results_dir=results, cache_dir=cache, model_path=Path(minilm_path))
    assert not computed and again == on_disk
    assert time.perf_counter() - start < 1.0

    # a budget the strategy cannot reach (KCM prunes FFN neurons only) is recorded as infeasible, not a crash
    kcm, computed = rp.run_cell(rp.Cell.parse("sst2/kcm/0.2/0"), recipe=recipe, results_dir=results, cache_dir=cache,
                                model_path=Path(minilm_path))
    assert computed and kcm["finetune"] is None and "cannot be reached" in kcm["infeasible"]
    assert (results / "sst2__kcm__0.2__s0.json").is_file()

    # a recipe change that concerns the task makes the cached cell stale (recomputed on a plain rerun);
    # one that concerns another task only does not
    import dataclasses

    kcm_cell = rp.Cell.parse("sst2/kcm/0.2/0")
    other_task = dataclasses.replace(recipe, train_limit={"sst2": 48, "mrpc": 10})
    _, computed = rp.run_cell(kcm_cell, recipe=other_task, results_dir=results, cache_dir=cache, model_path=Path(minilm_path))
    assert not computed
    this_task = dataclasses.replace(recipe, learning_rate=2e-5)
    again, computed = rp.run_cell(kcm_cell, recipe=this_task, results_dir=results, cache_dir=cache, model_path=Path(minilm_path))
    assert computed and again["recipe"]["learning_rate"] == 2e-5

    # a cell another live runner holds is skipped; a lock left by a dead runner is taken over
    import subprocess

    busy = rp.Cell.parse("sst2/worst/0.2/0")
    lock = cache / "reproduce" / f"{busy.slug}.lock"
    lock.write_text(str(os.getppid()))  # a live process that is not this one
    assert rp.run_cell(busy, recipe=recipe, results_dir=results, cache_dir=cache, model_path=Path(minilm_path)) == (None, False)
    assert lock.is_file() and not (results / f"{busy.slug}.json").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))
    assert rp.claim(lock) == lock and lock.read_text() == str(os.getpid())
    lock.unlink()

    # the CLI's cell parsing and grid ordering
    assert rp.Cell.parse("mrpc/dense/0.3").budget == 1.0
    g = rp.grid(tasks=["sst2"], seeds=[0])
    assert g[0].strategy == "dense" and g[1].budget == 0.6
    assert sum(c.strategy == "dual-cp-mc" for c in g) == 1
    assert {(c.strategy, c.budget) for c in g if c.strategy.endswith("-lstsq")} == {
        (s, b) for s in ("dual-cp-lstsq", "random-lstsq") for b in (0.6, 0.4)}
    assert len(g) == 1 + 6 * 4 + 1 + 4


def test_report_marks_fine_tunes_that_did_not_learn_and_counts_with_and_without_them():
    """make_report: a cell whose dev score is closer to the trivial predictor than to dense is marked †;
    the win / tie / loss counts take every point as measured and are repeated without the † points."""
    mr = _load_bench("make_report")

    def row(strategy, budget, spearman):
        return {"cell": f"stsb/{strategy}/{budget:g}/0", "task": "stsb", "strategy": strategy, "budget": budget,
                "seed": 0, "finetune": {"best_metric": spearman, "metric": "spearman", "eval_examples": 1500}}

    rows = [row("dense", 1.0, 0.84), row("dual-cp", 0.6, 0.24), row("random", 0.6, 0.27), row("kcm", 0.6, 0.71),
            row("dual-cp", 0.9, 0.76), row("random", 0.9, 0.80)]
    failed = mr.failed_cells(rows)
    assert failed == {"stsb/dual-cp/0.6/0", "stsb/random/0.6/0"}  # floor (84 + 0) / 2 = 42
    lines, counts = mr.compare(mr.index(rows), rows, failed)
    # every point counts as measured; the points with a † fine-tune are counted again without them
    assert counts["random"]["all"] == {"loss": 2} and counts["random"]["learned"] == {"loss": 1}
    assert counts["random"]["cells"] == ["STS-B 0.9: -4.0 (loss)", "STS-B 0.6: -3.0 (loss) †"]
    assert counts["kcm"]["all"] == {"loss": 1} and not counts["kcm"]["learned"]  # Dual-CP 0.6 did not learn
    text = "\n".join(lines)
    assert "in 2 cells (STS-B 2)" in next(line for line in lines if line.startswith("- **†"))
    # the verdict grid: random / KCM / worst per point, "–" where the baseline has no result
    assert "| STS-B | L / – / – | L / L / – † |" in lines
    assert "stsb/dual-cp/0.6/0, stsb/random/0.6/0" in text  # the full list, folded
    vs_random = next(line for line in lines if line.startswith("- **vs random**"))
    assert "**0 wins, 0 ties, 2 losses**; without the † points (1 left): **0 wins, 0 ties, 1 loss**" in vs_random
    assert mr.fmt([rows[1]], failed=failed).endswith("†") and not mr.fmt([rows[3]], failed=failed).endswith("†")


def test_report_says_when_even_dense_barely_beats_the_majority_class(monkeypatch):
    """make_report: a task whose dense fine-tune is within 1.5 tie bands of the majority class is named as
    one whose points cannot tell the strategies apart; a task that learns is not."""
    mr = _load_bench("make_report")
    monkeypatch.setattr(mr, "majority_rate", {"rte": 52.7, "sst2": 50.9}.get)

    def dense(task, acc, n):
        return {"cell": f"{task}/dense/1/0", "task": task, "strategy": "dense", "budget": 1.0, "seed": 0,
                "finetune": {"best_metric": acc, "metric": "accuracy", "eval_examples": n}}

    lines = mr.weak_tasks([dense("rte", 0.570, 277), dense("sst2", 0.830, 872)])
    assert len(lines) == 1 and lines[0].startswith("- **RTE barely learns even dense:**")
    assert "4.3 points above" in lines[0] and "±4.2" in lines[0]  # sqrt(2 * .57 * .43 / 277) = 4.2 points


def test_report_names_each_package_version_once_and_counts_cells_only_where_they_differ():
    """make_report: a grid run in pieces across sessions may straddle a package upgrade; the versions line
    says how many cells ran under each version instead of repeating the whole list per combination."""
    mr = _load_bench("make_report")
    old = {"versions": {"torch": "2.13.0+cpu", "transformers": "5.23.0"}}
    new = {"versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0"}}
    assert mr.versions_line([old, old]) == "torch 2.13.0+cpu, transformers 5.23.0"
    assert mr.versions_line([old, new, old]) == "torch 2.13.0+cpu, transformers 5.23.0 (2 cells) / 5.24.0 (1 cell)"


def test_finetune_diagnosis_traces_a_real_plan_and_the_report_renders_it(tmp_path, minilm_path, monkeypatch):
    """benchmarks/diagnose_finetune.py on a tiny SST-2 subset: the plan is pruned as in the grid, the
    frozen probe and the step trace are real metrics, and make_report turns the JSON into a table + plot."""
    dg = _load_bench("diagnose_finetune")
    recipe = dg.Recipe(name="smoke", calibration_samples=32, train_limit={"sst2": 40}, batch_size=16)
    row = dg.diagnose("sst2", 0.6, "dual-cp", epochs=1, every=2, eval_limit=24, work=tmp_path / "work",
                      recipe=recipe, model_path=Path(minilm_path))
    assert [p["step"] for p in row["trace"]] == [0, 2, 3]  # 40 rows / batch 16 = 3 steps; every 2 + the last
    assert row["trace"][0]["train_loss"] is None and all(p["train_loss"] > 0 for p in row["trace"][1:])
    assert all(0.0 <= p["dev"] <= 1.0 and 0.0 < p["majority_share"] <= 1.0 for p in row["trace"])
    assert 0.0 <= row["frozen_probe"]["accuracy"] <= 1.0 and row["frozen_probe"]["ridge"] > 0
    assert sum(row["heads_per_layer"]) < 72  # the pruned plan, not the dense model

    mr = _load_bench("make_report")
    dense = {**row, "strategy": "dense", "budget": 1.0, "heads_per_layer": None}
    (tmp_path / "finetune_diagnosis.json").write_text(json.dumps(
        {"task": "sst2", "metric": "accuracy", "budget": 0.6, "epochs": 1, "every": 2, "eval_examples": 24,
         "recipe": recipe.to_dict(), "command": "python benchmarks/diagnose_finetune.py --task sst2",
         "rows": [dense, row]}))
    monkeypatch.setattr(mr, "RESULTS", tmp_path)
    lines = mr.diagnosis_section([], tmp_path / "plots" / "diag.png")
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| strategy | heads per layer | frozen probe | step 0 | step 2 | step 3 |")
    assert table[2].startswith("| dense | all |") and table[3].startswith("| Dual-CP | ")
    assert f"{100 * row['trace'][-1]['dev']:.1f} | — |" in table[3]  # no grid cell for it in this report
    assert (tmp_path / "plots" / "diag.png").stat().st_size > 0


def test_lm_grid_rerun_over_cached_results_needs_no_weights(tmp_path):
    """reproduce_lm: with every requested cell cached, a rerun finishes without the small GPT-2's weights
    (they live outside the repo and a fresh clone has none); a cell still to compute asks for them."""
    lm = _load_bench("reproduce_lm")
    results = tmp_path / "results"
    (results / "small-gpt2-here").mkdir(parents=True)
    cached = REPO / "benchmarks" / "results" / "reproduce_lm" / "small-gpt2-here" / "ptb__dense__1__s0.json"
    (results / "small-gpt2-here" / cached.name).write_text(cached.read_text(encoding="utf-8"), encoding="utf-8")
    common = ["--results", str(results), "--cache", str(tmp_path / "no-cache-here")]

    assert lm.main(["--strategies", "dense", *common]) == 0
    with pytest.raises(SystemExit, match=r"not found \(1 cell\(s\) to compute, e.g. dual-cp/0.6/0\).*train_small_gpt2"):
        lm.main(["--strategies", "dense,dual-cp", "--budgets", "0.6", *common])


@pytest.mark.slow
def test_lm_v2_kd_cell_distils_the_dense_model_fine_tuned_first_and_the_v2_report_shows_it(tmp_path, shared_data):
    """reproduce_lm's lm-cpu-v2 cells (random-kd here) prune and fine-tune with the dense model fine-tuned by
    the same recipe as teacher (the dense cell, computed first when missing), and land in the GPT-2 table
    of the v2 section; on a tiny GPT-2 with tiny budgets for speed."""
    import dataclasses

    from conftest import make_tiny_gpt2
    from transformers import AutoTokenizer

    lm = _load_bench("reproduce_lm")
    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    model = tmp_path / "tiny-gpt2"
    make_tiny_gpt2(vocab_size=len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    recipe = dataclasses.replace(lm.RECIPE_V2, name="smoke-lm-v2", calibration_samples=8, eval_tokens=256,
                                 max_context=32, ft_train_blocks=16, ft_eval_blocks=4)
    cell = lm.LMCell.parse("random-kd/0.5")

    res, computed = lm.run_lm_cell(cell, model_path=str(model), tag="small-gpt2-here", recipe=recipe,
                                   results_dir=tmp_path / "results", cache_dir=tmp_path / "cache")

    assert computed and res["strategy"] == "random-kd" and res["prune"]["flops_ratio"] <= 0.5 + 1e-6
    teacher = lm.lm_teacher_dir("small-gpt2-here", recipe, tmp_path / "cache")
    assert res["finetune"]["teacher"] == str(teacher) and res["finetune"]["distill"]["weight"] == 0.5
    dense = json.loads(lm.result_path(tmp_path / "results", "small-gpt2-here", lm.LMCell.parse("dense/1")).read_text())
    assert dense["finetune"]["teacher"] is None and (teacher / "model.safetensors").is_file()
    # the teacher is the dense model after its epoch, not the model it started from
    assert dense["ppl_after_ft"]["ptb/test"] != dense["ppl_before_ft"]["ptb/test"]
    assert res["finetune"]["train_blocks"] == 16
    for stage in ("ppl_before_ft", "ppl_after_ft"):
        assert set(res[stage]) == {"ptb/valid", "ptb/test", "wikitext-2/valid", "wikitext-2/test"}
    text = "\n".join(_load_bench("report_v2").render_lm([{**res, "cell": "random-kd/0.5/0"}, dense]))
    assert f"| random-kd/0.5 | {res['ppl_before_ft']['ptb/test']:.1f} | {res['ppl_after_ft']['ptb/test']:.1f} |" in text
    assert "| dual-cp/0.5 | · | · | · | · |" in text
    assert f"| dense/1 | {dense['ppl_before_ft']['ptb/test']:.1f} | {dense['ppl_after_ft']['ptb/test']:.1f} |" in text
    rv2 = _load_bench("report_v2")
    assert set(rv2.LM_NAMES) == set(lm.V2_CELLS)
    said = rv2.verdict([], [{**res, "cell": "random-kd/0.5/0"}, dense])
    assert (f"dense {dense['ppl_after_ft']['ptb/test']:.1f} ({dense['ppl_before_ft']['ptb/test']:.1f}), random + "
            f"--teacher {res['ppl_after_ft']['ptb/test']:.1f} ({res['ppl_before_ft']['ptb/test']:.1f}).") in said


def test_teacher_cell_trains_its_dense_teacher_first_and_the_v2_report_shows_it(tmp_path, minilm_path):
    import dataclasses

    rp = _load_bench("reproduce")
    recipe = dataclasses.replace(rp.RECIPE_V2, name="smoke-v2", calibration_samples=64, train_limit={"stsb": 64},
                                 epochs={"stsb": 1}, eval_limit=32, fidelity_sentences=16)
    results, cache = tmp_path / "results", tmp_path / "cache"
    cell = rp.Cell.parse("stsb/dual-cp-kd/0.6/0/ft1")
    assert cell.teacher and cell.ft_seed == 1 and cell.slug == "stsb__dual-cp-kd__0.6__s0__ft1"

    res, computed = rp.run_cell(cell, recipe=recipe, results_dir=results, cache_dir=cache, model_path=Path(minilm_path))

    assert computed and res["ft_seed"] == 1
    settings = res["finetune"]["settings"]
    assert settings["distill"] == {"weight": 0.5, "temperature": 2.0, "hidden_weight": 0.0} and settings["seed"] == 1
    assert settings["pooling"] == "mean" and settings["head_init"]["bias"] == "label mean"
    dense = json.loads((results / "stsb__dense__1__s0.json").read_text())  # the teacher's own cell
    teacher = rp.teacher_dir("stsb", recipe, cache)
    assert (teacher / "model.safetensors").is_file()
    # a fresh machine: the dense cell's JSON is there (committed) but not its weights -> fine-tuned again
    shutil.rmtree(teacher)
    assert rp.ensure_teacher("stsb", recipe, results, cache, Path(minilm_path)) == teacher
    assert (teacher / "model.safetensors").is_file()
    text = _load_bench("report_v2").render([dense, res])
    assert "| STS-B | 1 | 16 | 0.0001 |" in text
    assert "| Dual-CP + --teacher | · | · | " in text and f"of {len(rp.grid_v2())} cells" in text


def test_v2_report_pairs_strategies_over_tasks_budgets_and_fine_tune_seeds():
    """The paired test compares only (task, budget, fine-tune seed) both strategies ran, with pruning seed 0."""
    rv2 = _load_bench("report_v2")

    def row(task, strategy, budget, ft, value, seed=0):
        return {"cell": f"{task}/{strategy}/{budget}/{seed}/ft{ft}", "task": task, "strategy": strategy, "budget": budget,
                "seed": seed, "ft_seed": ft, "finetune": {"best_metric": value / 100}}

    rows = [row(t, "dual-cp", b, ft, 80 + ft + 2) for t in ("mrpc", "stsb") for b in (0.6, 0.4) for ft in (0, 1)]
    rows += [row(t, "random", b, ft, 80 + ft) for t in ("mrpc", "stsb") for b in (0.6, 0.4) for ft in (0, 1)]
    rows += [row("rte", "random", 0.6, 0, 99.0), row("mrpc", "random", 0.6, 0, 10.0, seed=1)]  # unpaired
    t = rv2.paired(rows, "dual-cp", "random")
    assert (t["n"], t["wins"], t["losses"]) == (8, 8, 0) and abs(t["mean"] - 2.0) < 1e-9
    assert t["p"] < 0.01  # 8 of 8 the same way: exact two-sided p = 2 / 2^8
    assert rv2.paired(rows, "dual-cp", "kcm") is None
    assert "Dual-CP (ours / +CS) vs random: +2.0 points over 8 pairs (8–0, p = 0.0078)" in rv2.render(rows)


def test_v2_facts_in_hand_written_prose_follow_the_grid_and_a_stale_marker_is_an_error(tmp_path):
    """report_v2 rewrites each <!-- fact:NAME --> span of the READMEs' prose from the JSON cells (so a number
    quoted in a sentence cannot go stale), leaves the text around it alone, and refuses a marker it cannot fill."""
    rv2 = _load_bench("report_v2")

    def row(task, strategy, budget, ft, value):
        return {"cell": f"{task}/{strategy}/{budget}/0/ft{ft}", "task": task, "strategy": strategy, "budget": budget,
                "seed": 0, "ft_seed": ft, "finetune": {"best_metric": value / 100}}

    rows = [row("stsb", "dense", 1.0, ft, 85.0 + ft) for ft in (0, 1)]
    rows += [row(t, s, b, 0, 70.0 + (3 if s.startswith("dual-cp-lstsq") else 0) + (1 if s.endswith("-kd") else 0))
             for t in ("mrpc", "stsb") for b in (0.6, 0.4) for s in ("dual-cp", "dual-cp-lstsq", "dual-cp-kd",
                                                                     "dual-cp-lstsq-kd")]
    rows.append(row("stsb", "dual-cp", 0.6, 1, 72.0))
    values = rv2.facts(rows)
    assert values["compensation-gain"] == "+3.0 dev points after fine-tuning over 8 paired cells"
    assert values["teacher-gain"] == "+1.0 points over 8 pairs"
    assert values["expect-0.6"] == "STS-B: dense 85.5, 71.0 (n=2) / 73.0 / 74.0"
    assert values["selection-plain"].startswith("random · (fewer than 3 pairs)")

    readme = tmp_path / "README.md"
    readme.write_text("Compensation adds <!-- fact:compensation-gain -->+9.9 over 1<!-- /fact --> (see below).\n")
    rv2.write_facts(readme, values)
    assert readme.read_text() == ("Compensation adds <!-- fact:compensation-gain -->+3.0 dev points after "
                                  "fine-tuning over 8 paired cells<!-- /fact --> (see below).\n")
    # every fact the report produces is written, whatever its name holds ("expect-0.6" has a dot)
    readme.write_text("".join(f"<!-- fact:{name} -->stale<!-- /fact -->\n" for name in values))
    rv2.write_facts(readme, values)
    assert readme.read_text() == "".join(f"<!-- fact:{n} -->{v}<!-- /fact -->\n" for n, v in values.items())
    readme.write_text("<!-- fact:expect-0.6 -->no closing marker")
    with pytest.raises(SystemExit, match="without its"):
        rv2.write_facts(readme, values)
    readme.write_text("<!-- fact:no-such-fact -->old<!-- /fact -->")
    with pytest.raises(SystemExit, match="unknown generated fact.*no-such-fact"):
        rv2.write_facts(readme, values)
    assert readme.read_text() == "<!-- fact:no-such-fact -->old<!-- /fact -->"


def test_retraining_free_cell_prunes_a_fine_tuned_source_and_the_report_renders(tmp_path, monkeypatch):
    """benchmarks/retraining_free.py on a tiny fine-tuned regression model: a cell records the dev
    metric, the dense reference and the CPU-time cost ratio, and the report turns cells into a table."""
    from conftest import make_tiny_bert
    from transformers import AutoTokenizer

    rf = _load_bench("retraining_free")
    tok = AutoTokenizer.from_pretrained(REPO.parent / "shared" / "data" / "models" / "all-MiniLM-L6-v2")
    source = tmp_path / "stsb-ft"
    make_tiny_bert("BertForSequenceClassification", vocab_size=tok.vocab_size, num_labels=1).save_pretrained(source)
    tok.save_pretrained(source)
    monkeypatch.setattr(rf, "source", lambda task: source)
    monkeypatch.setattr(rf, "SAMPLES", 32)
    monkeypatch.setattr(rf, "PLOT", tmp_path / "rf.png")
    monkeypatch.setattr(rf, "RESULTS", tmp_path / "cells")
    monkeypatch.setattr(rf, "_DENSE", {})
    (tmp_path / "cells").mkdir()

    rows = [rf.run(("stsb", "fisher", 0.6, 0, "lstsq-seq")), rf.run(("stsb", "random", 0.6, 0, "none"))]
    for r in rows:
        assert r["flops_ratio"] <= 0.6 + 1e-9 and 0.0 < r["prune_cpu_seconds"]
        assert set(r["dev"]) >= {"spearman"} and r["dense"]["forward_cpu_seconds"] > 0
    assert rows[0]["compensation_report"]["method"] == "lstsq-seq" and rows[1]["compensation_report"]["method"] == "none"
    text = rf.render(rows)
    assert "| fisher | lstsq-seq |" in text and "| random | none |" in text and (tmp_path / "rf.png").is_file()

    # resuming with a source model that is not the one the finished cells were pruned from stops at once
    (tmp_path / "cells" / "stsb__random__0.6__s0__none.json").write_text(json.dumps(rows[1]))
    monkeypatch.setattr(rf, "_DENSE", {})
    rf.run(("stsb", "random", 0.4, 0, "none"))  # same source: runs
    other = {**rows[1], "dense": {**rows[1]["dense"], "dev": {**rows[1]["dense"]["dev"],
                                                      "spearman": rows[1]["dense"]["dev"]["spearman"] + 0.01}}}
    (tmp_path / "cells" / "stsb__random__0.6__s0__none.json").write_text(json.dumps(other))
    monkeypatch.setattr(rf, "_DENSE", {})
    with pytest.raises(SystemExit, match="the dense stsb model here scores .* on dev, but the cells already"):
        rf.run(("stsb", "random", 0.4, 0, "none"))


def test_v2_verdict_names_the_best_strategy_and_recommends_a_default_only_on_a_significant_gain():
    rv2 = _load_bench("report_v2")

    def row(task, strategy, budget, value, ft=0):
        return {"cell": f"{task}/{strategy}/{budget}/0/ft{ft}", "task": task, "strategy": strategy, "budget": budget,
                "seed": 0, "ft_seed": ft, "finetune": {"best_metric": value / 100}}

    rows = [row("mrpc", "dense", 1.0, 83.0), row("stsb", "dense", 1.0, 84.0)]
    rows += [row("stsb", "dual-cp", 0.6, 80.0), row("stsb", "random", 0.6, 81.5), row("stsb", "kcm", 0.6, 79.0)]
    text = rv2.verdict(rows)
    assert "met on 1 of 2" in text
    assert "STS-B 0.6: random 81.5, Dual-CP 80.0 (3 strategies run)" in text
    assert ("`--teacher` (Dual-CP + --teacher vs Dual-CP (ours / +CS) and Dual-CP + lstsq + --teacher vs Dual-CP + "
            "--compensate lstsq): fewer than 3 paired cells so far.") in text

    # the teacher wins 8 of 8 pairs: significant, so the verdict recommends it
    rows += [row(t, s, b, 70 + (2 if s == "dual-cp-kd" else 0) + ft, ft) for t in ("mrpc", "rte") for b in (0.6, 0.4)
             for ft in (0, 1) for s in ("dual-cp", "dual-cp-kd")]
    text = rv2.verdict(rows)
    assert "+2.0 points over 8 pairs (8–0, p = 0.0078), a significant gain: use it whenever" in text

    # lstsq is judged with the teacher held fixed: 2 pairs without a teacher and 2 with it pool into one
    # test of 4 pairs (too few for p < 0.05 whatever the signs: it stays opt-in)
    rows += [row("mrpc", "dual-cp-lstsq", b, 75.0) for b in (0.6, 0.4)]
    rows += [row("rte", "dual-cp-lstsq-kd", b, 75.0) for b in (0.6, 0.4)]
    text = rv2.verdict(rows)
    assert ("`--compensate lstsq` (Dual-CP + --compensate lstsq vs Dual-CP (ours / +CS) and Dual-CP + lstsq + "
            "--teacher vs Dual-CP + --teacher): +4.0 points over 4 pairs (4–0, p = 0.12), no significant gain") in text

    # hidden-state distillation is judged against the same cells with predictions only
    rows += [row(t, "dual-cp-lstsq-kd", 0.6, 70.0 + ft, ft) for t in ("mrpc", "rte") for ft in (0, 1)]
    rows += [row(t, "dual-cp-lstsq-kdh", 0.6, 73.0 + ft, ft) for t in ("mrpc", "rte") for ft in (0, 1)]
    text = rv2.verdict(rows)
    assert ("`--distill-hidden 1` on top of `--teacher` (Dual-CP + lstsq + --teacher --distill-hidden 1 vs Dual-CP + "
            "lstsq + --teacher): +3.0 points over 4 pairs (4–0, p = 0.12), no significant gain") in text


def test_v2_verdict_is_provisional_until_every_cell_is_in():
    rv2 = _load_bench("report_v2")
    finetune = {"best_metric": 0.8, "settings": {}, "train_seconds": 60.0, "epochs": [{}]}
    rows = [{"cell": c.id, "task": c.task, "strategy": c.strategy, "budget": c.budget, "seed": c.seed,
             "ft_seed": c.ft_seed, "finetune": finetune} for c in rv2.grid_v2()]
    assert rv2.verdict(rows).startswith(f"All {len(rows)} cells of the grid.")
    assert "**Verdict.** All" in rv2.render(rows)
    assert rv2.verdict(rows[1:]).startswith(f"{len(rows) - 1} of {len(rows)} cells, so every statement is provisional.")
    assert "**Verdict so far.**" in rv2.render(rows[1:])


def test_v2_status_prices_the_remaining_cells_by_task_and_teacher_on_the_latest_cpu():
    rv2, rp = _load_bench("report_v2"), _load_bench("reproduce")

    def row(cell, wall, cpu, finished):
        c = rp.Cell.parse(cell)
        return {"cell": c.id, "task": c.task, "strategy": c.strategy, "wall_seconds": wall,
                "machine": {"cpu": cpu}, "finished": finished}

    rows = [row("rte/dual-cp/0.6/0", 9000, "old", "2026-01-01"), row("rte/dual-cp/0.4/0", 1800, "new", "2026-02-01"),
            row("rte/dual-cp-kd/0.6/0", 5400, "new", "2026-02-02")]
    todo = [rp.Cell.parse(c) for c in ("rte/random/0.6/0", "rte/random-lstsq-kd/0.4/0")]
    # plain cell: 0.5 h (the new CPU's plain RTE cell, not the old one's); teacher cell: 1.5 h
    assert rv2.remaining_time(rows, todo) == (", about 2.0 h of one-thread cell time at the speed of new where "
                                              "measured (1.0 h as two runners)")
    assert rv2.remaining_time(rows, [rp.Cell.parse("mrpc/random/0.6/0")]) == ""  # nothing comparable ran


def test_v2_issue17_bars_count_plans_that_learn_and_compare_the_teacher_cell_with_the_dense_mean():
    rv2 = _load_bench("report_v2")
    rp = _load_bench("reproduce")
    kdh, kd = rp.Cell.parse("mrpc/dual-cp-lstsq-kdh/0.6/0/ft1"), rp.Cell.parse("mrpc/dual-cp-lstsq-kd/0.6/0")
    assert (kdh.teacher, kdh.distill_hidden, kd.teacher, kd.distill_hidden) == (True, 1.0, True, 0.0)
    assert rp.PRUNE_ARGS["dual-cp-lstsq-kdh"] == rp.PRUNE_ARGS["dual-cp-lstsq-kd"]  # the same plan, paired

    def row(task, strategy, budget, value, ft=0):
        return {"cell": f"{task}/{strategy}/{budget}/0/ft{ft}", "task": task, "strategy": strategy, "budget": budget,
                "seed": 0, "ft_seed": ft, "finetune": {"best_metric": value / 100}}

    # STS-B: trivial predictor 0, dense mean 84 -> "did not learn" below 42
    rows = [row("stsb", "dense", 1.0, 85.0), row("stsb", "dense", 1.0, 83.0, ft=1)]
    rows += [row("stsb", "dual-cp", 0.6, 80.0), row("stsb", "random", 0.6, 30.0), row("stsb", "random", 0.4, 20.0, ft=1)]
    rows += [row("stsb", "random-lstsq", 0.6, 78.0)]
    rows += [row("stsb", "dual-cp-lstsq-kd", 0.6, 83.0), row("stsb", "dual-cp-lstsq-kd", 0.6, 81.0, ft=1)]
    text = "\n".join(rv2.issue17_bars(rows, rv2.failed_cells(rows)))
    # only fine-tune seed 0 counts: random 0.4 ran with seed 1 alone, so it is "not run"
    assert "`--compensate none`): 1 of 2 cells run learned; did not learn (†): STS-B random 0.6; 30 not run yet." in text
    assert "encoder): 1 of 1 cells run learned; 31 not run yet." in text
    # mean of the two teacher seeds (82.0) against the dense mean (84.0); vs plain Dual-CP on seed 0 only
    assert "STS-B 82.0 (n=2) vs dense 84.0: -2.0, within 2 points; vs Dual-CP (ours / +CS) +3.0 (seeds [0])." in text
