"""The fast demo end to end: `bash scripts/demo.sh --fast` runs every stage through the real CLIs for two
paired seeds, writes report.md whose intervals and verdicts follow from the per-seed measurements, its
plots, readable (carriage-return free) logs, and a second run skips what is done. Plus the pieces the
report rests on: the paired t-interval and the plain progress lines."""
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO_ROOT
from demo.report import NO_DIFFERENCE, direction, paired_interval
from demo.run_demo import needed_for
from demo.stages import FAST, RUNS, build_stages, make_config
from util.errors import UserError
from util import progress as progress_module
from util.progress import PlainProgress, progress_bar

T_975 = {1: 12.706, 2: 4.303, 3: 3.182}  # Student t quantiles, from a printed table

pytestmark = pytest.mark.slow  # end-to-end runs (subprocesses / training loops): `pytest -m "not slow"` skips them


def run_demo(out: Path, *flags, check: bool = True, timeout: float = 2400) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "demo.sh"), "--out", str(out), *flags],
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"demo exited {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    return out, run_demo(out, "--fast")


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def table_row(report: str, title: str) -> list:
    line = next(line for line in report.splitlines() if line.startswith(f"| {title}"))
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


# ----------------------------------------------------------------------------------------------
# The paired interval and the progress lines (fast)
# ----------------------------------------------------------------------------------------------

def test_paired_t_interval_hand_worked():
    # d = 1, 2, 3: mean 2, sd 1, half-width 4.303 / sqrt(3) = 2.484 -> [-0.484, 4.484], contains 0.
    interval = paired_interval([1.0, 2.0, 3.0])
    assert (interval.mean, interval.low, interval.high) == pytest.approx((2.0, -0.4843, 4.4843), abs=1e-3)
    assert direction(interval) == NO_DIFFERENCE
    # d = 1.8, 2.0, 2.2: sd 0.2, half-width 0.497 -> [1.503, 2.497]: ahead; the mirror image: behind.
    assert direction(paired_interval([1.8, 2.0, 2.2])) == "ahead"
    assert paired_interval([1.8, 2.0, 2.2]).low == pytest.approx(2.0 - 4.303 * 0.2 / math.sqrt(3), abs=1e-3)
    assert direction(paired_interval([-1.8, -2.0, -2.2])) == "behind"
    one = paired_interval([5.0])
    assert one.low is None and direction(one) == NO_DIFFERENCE  # one seed never claims anything


def test_plain_progress_prints_every_n_steps_without_carriage_returns():
    stream = io.StringIO()
    for _ in PlainProgress(range(25), desc="toy", every=10, file=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert [re.search(r"(\d+)/25 \[", line).group(1) for line in lines] == ["10", "20", "25"]
    assert "\r" not in stream.getvalue() and all(line.startswith("toy: ") for line in lines)
    stream = io.StringIO()
    bar = PlainProgress(total=100, desc="mirror", file=stream)  # default: ten lines per loop
    bar.total, bar.n = 100, 35
    bar.refresh()
    bar.n = 38
    bar.refresh()
    bar.close()
    assert [re.search(r"(\d+)/100", line).group(1) for line in stream.getvalue().splitlines()] == ["35", "38"]


def test_progress_bar_is_tqdm_only_in_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert not isinstance(progress_bar(range(3), file=Terminal()), PlainProgress)
    assert isinstance(progress_bar(range(3), file=io.StringIO()), PlainProgress)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert isinstance(progress_bar(range(3), file=Terminal()), PlainProgress)
    assert progress_module.is_interactive(Terminal()) is False


# ----------------------------------------------------------------------------------------------
# The fast demo (slow: it runs the whole pipeline)
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_report_and_plots_exist(fast_demo):
    out, result = fast_demo
    assert "finished in" in result.stdout
    report = (out / "report.md").read_text()
    for section in ("## What this run shows", "## Generation: USP init vs scratch", "## Understanding: linear probe",
                    "## Toy metrics", "loss_curves.png", "samples.png",
                    "recon/reconstruction.png", "convergence_dit.png", "convergence_sit.png"):
        assert section in report
    for picture in ("loss_curves.png", "samples.png", "recon/reconstruction.png", "convergence_dit.png",
                    "convergence_sit.png"):
        with Image.open(out / picture) as image:
            assert min(image.size) >= 64  # a real picture, not an empty placeholder


@pytest.mark.slow
def test_logs_have_no_carriage_return_frames(fast_demo):
    """Nothing here is a terminal, so every stage writes plain progress lines, not tqdm frames."""
    out, result = fast_demo
    assert "\r" not in result.stdout and "\r" not in result.stderr
    logs = sorted((out / "logs").glob("*.log"))
    assert len(logs) >= 10
    for log in logs:
        assert b"\r" not in log.read_bytes(), log.name
    assert re.search(r"tiny VAE: \d+/\d+ \[", (out / "logs" / "vae.log").read_text())


@pytest.mark.slow
def test_pairs_differ_only_in_the_init_and_seeds_differ(fast_demo):
    """Within a seed the USP and scratch runs have the same arguments but --finetune (so the same batches
    and noise); across seeds the global seed changes."""
    out, _ = fast_demo
    seeds = make_config(FAST, []).seed_list
    assert len(seeds) >= 2

    def run_args(seed, run):
        return json.loads(next((out / f"seed{seed}" / "gen" / run).glob("*/args.json")).read_text())

    for seed in seeds:
        for family in ("dit", "sit"):
            usp, scratch = run_args(seed, f"{family}_usp"), run_args(seed, f"{family}_scratch")
            assert usp["finetune"] and f"seed{seed}" in usp["finetune"] and not scratch["finetune"]
            differing = {key for key in usp if usp[key] != scratch.get(key)}
            assert differing <= {"finetune", "exp_name", "results_dir"}, differing
            assert usp["global_seed"] == seed
    assert run_args(seeds[0], "dit_usp")["global_seed"] != run_args(seeds[1], "dit_usp")["global_seed"]


def expected_interval(values: list) -> tuple:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@pytest.mark.slow
def test_report_intervals_and_verdicts_follow_from_the_seeds(fast_demo):
    """The mean row and the sentence of each comparison, recomputed here from the per-seed files."""
    out, _ = fast_demo
    report = (out / "report.md").read_text()
    seeds = make_config(FAST, []).seed_list
    for family, name in (("dit", "DiT"), ("sit", "SiT")):
        curves = {(seed, init): json.loads((out / f"seed{seed}" / "heldout" / f"{family}_{init}.json").read_text())
                  for seed in seeds for init in ("usp", "scratch")}
        for key, title in (("loss", "held-out loss"), ("ema_loss", "held-out loss of the EMA weights")):
            gains = [100 * (curves[seed, "scratch"][key][-1] - curves[seed, "usp"][key][-1]) /
                     curves[seed, "scratch"][key][-1] for seed in seeds]
            mean, low, high = expected_interval(gains)
            step = curves[seeds[0], "usp"]["steps"][-1]
            line = next(line for line in report.splitlines() if line.startswith(f"- **{name}, {title} after {step}"))
            numbers = [float(x) for x in re.findall(r"[-+]\d+\.\d", line.split(":", 2)[-1])]
            assert numbers[0] == pytest.approx(mean, abs=0.051)
            assert numbers[-2:] == pytest.approx([low, high], abs=0.051)
            word = "ahead" if low > 0 else "behind" if high < 0 else None
            assert (f"USP is {word}." in line) if word else (f"{NO_DIFFERENCE}." in line), line
    probes = []
    for seed in seeds:
        accuracy = {}
        for init in ("usp", "random"):
            log = (out / f"seed{seed}" / "probe" / init / "log.txt").read_text().splitlines()
            accuracy[init] = [json.loads(l)["acc1"] for l in log if '"acc1"' in l][-1]
        probes.append(accuracy["usp"] - accuracy["random"])
    mean, low, high = expected_interval(probes)
    row = next(line for line in report.splitlines() if line.startswith("| mean, 95% t-interval") and "points" in line)
    numbers = [float(x) for x in re.findall(r"[-+]\d+\.\d", row)]
    assert numbers == pytest.approx([mean, low, high], abs=0.051)


@pytest.mark.slow
def test_report_numbers_are_finite(fast_demo):
    out, _ = fast_demo
    report = (out / "report.md").read_text()
    for title in ("toy FD of samples",):
        cells = table_row(report, title)
        assert len(cells) == len(RUNS)
        assert all(finite(float(cell)) for cell in cells), (title, cells)
    accuracies = table_row(report, "toy class accuracy of samples")
    assert all(re.fullmatch(r"\d+\.\d%", cell) for cell in accuracies), accuracies
    for seed in make_config(FAST, []).seed_list:
        assert re.search(rf"\| {seed} \| \d+\.\d% \| \d+\.\d% \| [-+]\d+\.\d points \|", report)
        for run in RUNS:
            curve = json.loads((out / f"seed{seed}" / "heldout" / f"{run}.json").read_text())
            assert curve["steps"] and all(finite(v) for v in curve["loss"] + curve["ema_loss"])
    toy = json.loads((out / "toy_metrics.json").read_text())
    assert set(toy["samples"]) == set(RUNS)
    for metrics in [toy["real_val"], toy["vae_reconstruction"], *toy["samples"].values()]:
        assert finite(metrics["class_accuracy"]) and finite(metrics["toy_fd"]) and metrics["toy_fd"] >= 0
    convergence = json.loads((out / "convergence_dit.json").read_text())
    assert set(convergence["runs"]) == {f"s{seed}/{init}" for seed in make_config(FAST, []).seed_list for init in ("usp", "scratch")}


@pytest.mark.slow
def test_measured_vae_scale_reaches_the_pipeline(fast_demo):
    """The tiny VAE's 1/std scale travels through --vae_path (config.json) into the latent cache."""
    out, _ = fast_demo
    stats = json.loads((out / "vae" / "vae_stats.json").read_text())
    assert finite(stats["scale"]) and stats["scale"] > 0
    assert stats["scale"] == pytest.approx(1.0 / stats["latent_std"])
    for split in ("train", "val"):
        manifest = json.loads((out / "cache" / split / "manifest.json").read_text())
        assert manifest["scale"] == pytest.approx(stats["scale"])


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_redo_reruns_downstream(fast_demo):
    out, _ = fast_demo
    markers = {path.name: path.stat().st_mtime_ns for path in (out / ".stages").glob("*.json")}
    bookkeeping = {".stages", "demo_config.json"}  # the runner's own records, rewritten each call
    outputs = {path: path.stat().st_mtime_ns for path in out.rglob("*")
               if path.is_file() and not bookkeeping & set(path.relative_to(out).parts)}
    again = run_demo(out, "--fast")
    assert "everything is up to date" in again.stdout
    assert markers == {path.name: path.stat().st_mtime_ns for path in (out / ".stages").glob("*.json")}
    # No stage ran again: every file a stage wrote is untouched (instead of a wall-clock bound, which is noise).
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in outputs.items() if path.exists())

    redo = run_demo(out, "--fast", "--redo", "toy_metrics")
    assert re.findall(r"\[demo\] (\S+) done in", redo.stdout) == ["toy_metrics", "report"]
    rewritten = {path.name for path in (out / ".stages").glob("*.json") if path.stat().st_mtime_ns != markers[path.name]}
    assert rewritten == {"toy_metrics.json", "report.json"}
    log = (out / "logs" / "toy_metrics.log").read_text().splitlines()
    assert log[0].startswith("$ ") and "-m demo.toy_metrics" in log[0] and "toy FD" in "\n".join(log[1:])
    assert "skipping finished stages" in redo.stdout


def test_only_runs_the_named_stages_and_what_they_need():
    stages = build_stages(Path("/nowhere"), make_config(FAST, []))
    by_name = {stage.name: stage for stage in stages}
    # Written out from the pipeline in demo/stages.py: a seed's held-out scoring needs its four generators,
    # the USP ones need that seed's pretraining, everything needs the caches, the VAE and the data.
    upstream = {"data", "vae", "cache_train", "cache_val"}
    assert needed_for(stages, ["heldout_s0"]) == upstream | {"pretrain_s0", "heldout_s0"} | {f"{run}_s0" for run in RUNS}
    every_seed = needed_for(stages, ["heldout"])
    assert every_seed == upstream | {f"{kind}_s{seed}" for seed in make_config(FAST, []).seed_list
                                     for kind in ("pretrain", "heldout", *RUNS)}
    assert needed_for(stages, ["probe_random_s1"]) == {"data", "vae", "cache_train", "probe_random_s1"}
    assert "report" not in every_seed and all(need in every_seed for name in every_seed for need in by_name[name].needs)
    with pytest.raises(UserError, match="--only heldouts is not a stage"):
        needed_for(stages, ["heldouts"])


@pytest.mark.slow
def test_bad_flags_fail_with_one_sentence(fast_demo):
    out, _ = fast_demo
    mixed = run_demo(out, check=False)  # a full run into the --fast run's folder
    assert mixed.returncode != 0 and "--redo all" in mixed.stderr and "Traceback" not in mixed.stderr
    unknown = run_demo(out, "--fast", "--redo", "nonsense", check=False)
    assert unknown.returncode != 0 and "is not a stage" in unknown.stderr
    for flags, message in ((["--seeds", "0"], "--seeds 0"), (["--set", "gen_lr=fast"], "not a valid float"),
                           (["--set", "colour=red"], "expected KEY=VALUE")):
        bad = run_demo(out, "--fast", *flags, check=False)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
