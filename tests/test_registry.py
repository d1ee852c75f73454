"""The strategy registry: entry-point discovery, broken plugins, plan validation, a real installed plugin."""

from __future__ import annotations

import importlib
import json
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppkit.adapters import get_adapter
from ppkit.errors import InputError, PluginError
from ppkit.flops import plan_flops
from ppkit.hookspecs import hookimpl
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.registry import PruningContext, Registry, Strategy

REPO = Path(__file__).resolve().parents[1]
BUILTINS = {"dual-cp", "fisher", "kcm", "random", "worst"}


def test_builtins_come_from_entry_points():
    infos = {i.name: i for i in Registry().list_strategies()}
    assert BUILTINS <= set(infos)
    assert {infos[n].package for n in BUILTINS} == {"ppkit-prune"}
    assert "activations" in infos["dual-cp"].needs and not infos["random"].needs
    assert all(i.description and i.version for i in infos.values())


def test_unknown_strategy_lists_available():
    with pytest.raises(InputError, match=r"unknown strategy 'nope'; available strategies: dual-cp, fisher, kcm, random, worst"):
        Registry().get_strategy("nope")


def make_plugin(name: str, prune):
    class Plugin:
        @hookimpl
        def ppkit_strategies(self):
            return [Strategy(name=name, description="test strategy", prune=prune)]

    return Plugin()


@pytest.fixture
def tiny_ctx(tiny_bert):
    adapter = get_adapter(tiny_bert)
    return PruningContext(tiny_bert, adapter, adapter.shape(), None, 0.7, 12.0, 5.0, 0, {})


def keep(shape, heads, neurons, layers=None):
    n = shape.num_layers if layers is None else layers
    return PruningPlan([LayerPlan(tuple(heads), tuple(neurons))] * n, shape.num_heads, shape.ffn_dim)


@pytest.mark.parametrize(
    "case, message",
    [
        ("raises", r"strategy 'bad' \(package my-plugins 9.9\) failed: ZeroDivisionError"),
        ("not_a_plan", r"strategy 'bad' \(package my-plugins 9.9\) returned dict, not a PruningPlan"),
        ("layers", r"strategy 'bad' \(package my-plugins 9.9\) returned an invalid plan: plan has 2 layers but the model has 3"),
        ("range", r"strategy 'bad' \(package my-plugins 9.9\) returned an invalid plan: layer 0 neurons: index 64 is out of range"),
        ("budget", r"strategy 'bad' \(package my-plugins 9.9\) returned a plan that keeps 1.000000 of the FLOPs, over the budget 0.700000"),
    ],
)
def test_bad_strategy_is_a_plugin_error_naming_it(tiny_ctx, case, message):
    shape = tiny_ctx.shape

    def prune(ctx):
        if case == "raises":
            return 1 / 0
        if case == "not_a_plan":
            return {"layers": []}
        if case == "layers":
            return keep(shape, range(4), range(64), layers=2)
        if case == "range":
            return keep(shape, range(4), range(65))
        return keep(shape, range(4), range(64))

    reg = Registry()
    reg.register_plugin(make_plugin("bad", prune), name="bad-plugin", package="my-plugins", version="9.9")
    with pytest.raises(PluginError, match=message):
        reg.run_strategy("bad", tiny_ctx)


def test_valid_programmatic_plugin_runs_and_is_recorded(tiny_ctx):
    shape = tiny_ctx.shape
    reg = Registry()
    name = reg.register_plugin(make_plugin("half", lambda ctx: keep(shape, [0, 1], range(32))), package="nb")
    assert reg.get_strategy("half").package == "nb"
    plan = reg.run_strategy("half", tiny_ctx)
    assert plan.meta["strategy"] == "half" and plan.meta["strategy_package"] == "nb"
    assert plan.meta["flops_ratio"] == pytest.approx(plan_flops(plan, shape, 12.0).ratio)
    reg.unregister_plugin(name)
    with pytest.raises(InputError):
        reg.get_strategy("half")


def test_plugin_whose_hook_fails_is_skipped_with_a_warning():
    class Broken:
        @hookimpl
        def ppkit_strategies(self):
            raise RuntimeError("boom")

    reg = Registry()
    reg.register_plugin(Broken(), name="broken-hook", package="broken-pkg")
    with pytest.warns(RuntimeWarning, match=r"'broken-hook' from package broken-pkg .*boom"):
        names = {i.name for i in reg.list_strategies()}
    assert BUILTINS <= names


def test_duplicate_strategy_name_is_ignored_with_a_warning(tiny_ctx):
    reg = Registry()
    reg.register_plugin(make_plugin("random", lambda ctx: None), package="impostor")
    with pytest.warns(RuntimeWarning, match="strategy 'random' from package impostor is ignored"):
        assert reg.get_strategy("random").package == "ppkit-prune"


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """A distribution on sys.path whose 'ppkit' entry point names a module that does not exist."""
    dist = tmp_path / "ppkit_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ppkit-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ppkit]\nbroken = ppkit_no_such_module_xyz\ntypo = ppkit_typo_plugin_xyz\n")
    (tmp_path / "ppkit_typo_plugin_xyz.py").write_text("def ppkit_strategy():\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def test_entry_point_that_fails_to_import_is_named_and_others_load(fake_distribution):
    reg = Registry()
    with pytest.warns(RuntimeWarning) as record:
        names = {i.name for i in reg.list_strategies()}
    messages = [str(w.message) for w in record]
    assert any("plugin 'broken' (ppkit_no_such_module_xyz) from package ppkit-broken 1.0" in m for m in messages)
    assert any("plugin 'typo' from package ppkit-broken 1.0 defines ppkit_strategy(), which is not a ppkit hook" in m for m in messages)
    assert BUILTINS <= names


def test_third_party_package_installs_and_prunes(tmp_path, tiny_bert):
    """Install examples/ppkit-magnitude with pip like a user, discover it via its entry point, prune with it."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "examples" / "ppkit-magnitude", src)  # builds write into the source tree
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check", "-q",
           "--target", str(target), str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # offline: build with the setuptools already installed
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        reg = Registry()
        info = reg.get_strategy("magnitude")
        assert (info.package, info.version, info.needs) == ("ppkit-magnitude", "0.1.0", frozenset())
        adapter = get_adapter(tiny_bert)
        shape = adapter.shape()
        ctx = PruningContext(tiny_bert, adapter, shape, None, 0.6, 12.0, 5.0, 0, {})
        plan = reg.run_strategy("magnitude", ctx)
        assert plan.meta["strategy_package"] == "ppkit-magnitude"
        assert plan_flops(plan, shape, 12.0).ratio <= 0.6
        # it prunes what it says: the kept neurons of layer 0 have larger output-weight norms than the pruned ones
        norms = adapter.ffn_output_weight(0)[0].detach().norm(dim=1)
        kept = torch.tensor(plan.layers[0].neurons)
        pruned = torch.tensor(sorted(set(range(shape.ffn_dim)) - set(plan.layers[0].neurons)))
        if len(pruned) and len(kept) > 1:
            assert norms[pruned].max() <= norms[kept].max()
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("ppkit_magnitude", None)
        importlib.invalidate_caches()
    # "uninstalled": the target directory is the whole installation
    shutil.rmtree(target)
    assert "magnitude" not in {i.name for i in Registry().list_strategies()}


def test_example_plugin_requires_this_distribution_not_the_unrelated_ppkit(tmp_path):
    """The example plugin's requirements resolve against this project as installed, with no index: it asks for
    the distribution ``ppkit-prune`` (``ppkit`` on PyPI is an unrelated project)."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "examples" / "ppkit-magnitude", src)
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-input", "--disable-pip-version-check",
           "--quiet", "--report", str(tmp_path / "report.json"), str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [item["metadata"]["name"] for item in report["install"]] == ["ppkit-magnitude"]
    assert any(req.startswith("ppkit-prune") for req in report["install"][0]["metadata"]["requires_dist"])


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists packages explicitly (cli/ and plugins/ install as ppkit.cli / ppkit.plugins), so a new
    subpackage must be added there or the wheel silently lacks it."""
    import re

    line = re.search(r"^packages = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    listed = {name.strip().strip('"') for name in line.split(",")}
    found = {"ppkit." + p.parent.name for p in (REPO / "ppkit").glob("*/__init__.py")} | {"ppkit", "ppkit.cli", "ppkit.plugins"}
    assert found <= listed, sorted(found - listed)
