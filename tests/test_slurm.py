"""The cluster path: the tiny workflow through a real SLURM controller with the slurm profile.

Needs a running SLURM (CI starts one on the machine with ``tests/slurm/start_local_slurm.sh``);
skipped with the reason when ``sinfo`` is missing or the controller does not answer, unless
``NODULEFLOW_REQUIRE_SLURM=1`` (CI), where that is a failure instead.

The run uses ``profiles/slurm/config.yaml`` as shipped, with only what a one-node test cluster
needs changed in the temporary copy: GPU requests set to 0, cores and memory capped to the node,
a 2 s first status poll, squeue as status command when the cluster keeps no accounting, successful
SLURM logs kept, no retries. Then it checks that every job of the workflow was a SLURM job that
completed, that each scan's preprocessing ran as one group job, that the per-rule time limits of the
profile reached sbatch (summed over a group job's rules), and that the reports exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE = REPO_ROOT / "profiles" / "slurm" / "config.yaml"
RUN_TIMEOUT_S = 600

#: the tiny configuration (4 small synthetic scans, 2 folds, 1 epoch)
TINY_CONFIG = {
    "synthetic": {"n_scans": 4, "full_size": False},
    "cv": {"folds": 2},
    "sampling": {"patches_per_scan": 32},
    "train": {"epochs": 1, "device": "cpu"},
    "evaluate": {"bootstrap": 20},
}

#: rules that must each run as at least one SLURM job (the target rules run locally)
SLURM_RULES = {"synthesize", "synthesize_annotations", "resample", "lung_mask", "extract_slices",
               "split_folds", "sample_patches", "train", "predict", "evaluate", "report"}

#: a rule's job has a number, a group job (several jobs of one scan run in one SLURM job) a uuid
SUBMITTED_RE = re.compile(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")


# ------------------------------------------------------------------ cluster discovery


def _cmd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def slurm_skip_reason() -> str | None:
    """Why the SLURM test cannot run here, or None when a controller answers with a usable node."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM here: sinfo/sbatch not on PATH (start one: tests/slurm/start_local_slurm.sh)"
    try:
        ping = _cmd("scontrol", "ping")
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"SLURM controller does not answer: scontrol ping: {exc}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        first = next((ln.strip() for ln in (ping.stdout + ping.stderr).splitlines() if ln.strip()), "")
        return f"SLURM controller does not answer (scontrol ping: {first})"
    nodes = _cmd("sinfo", "-h", "-N", "-o", "%T")
    if not any(s.strip().rstrip("*") in {"idle", "mixed"} for s in nodes.stdout.splitlines()):
        return f"SLURM has no idle node: sinfo says {nodes.stdout.split() or nodes.stderr.strip()}"
    return None


def node_limits() -> tuple[int, int]:
    """(CPUs, memory MB) of the smallest responding node: the most one test job may ask for."""
    out = _cmd("sinfo", "-h", "-N", "-o", "%c %m %T").stdout
    sizes = [(int(c), int(m.rstrip("+"))) for c, m, s in (line.split() for line in out.splitlines())
             if s.rstrip("*") in {"idle", "mixed", "allocated"}]
    return min(c for c, _ in sizes), min(m for _, m in sizes)


def accounting_enabled() -> bool:
    """True when slurmdbd keeps accounting (sacct answers); False for accounting_storage/none."""
    out = _cmd("scontrol", "show", "config").stdout
    match = re.search(r"^AccountingStorageType\s*=\s*(\S+)", out, re.M)
    return bool(match) and match.group(1) != "accounting_storage/none"


# ------------------------------------------------------------------ the workflow copy


def copy_workflow(dest: Path) -> Path:
    """What a user runs (Snakefile, config, workflow/, profiles/, config/, envs/); src/ is
    installed. envs/ is needed even without conda: snakemake records each rule's `conda:` file."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    for name in ("workflow", "profiles", "config", "envs"):
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, dest / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def fit_profile(profile: dict, cpus: int, mem_mb: int, accounting: bool) -> dict:
    """The shipped profile, fitted to a small test cluster; nothing else changed."""
    out = yaml.safe_load(yaml.safe_dump(profile))
    mem_cap = max(500, mem_mb // 2)          # two jobs fit side by side
    for res in [out.get("default-resources", {}), *out.get("set-resources", {}).values()]:
        if "gpu" in res:
            res["gpu"] = 0                    # no GPU on the test node
        res.pop("gres", None)
        res.pop("gpu_model", None)
        res.pop("slurm_partition", None)      # the cluster's default partition
        res.pop("slurm_account", None)
        if "cpus_per_task" in res:
            res["cpus_per_task"] = min(int(res["cpus_per_task"]), cpus)
        if "mem_mb" in res:
            res["mem_mb"] = min(int(res["mem_mb"]), mem_cap)
    for rule, threads in out.get("set-threads", {}).items():
        out["set-threads"][rule] = min(int(threads), cpus)
    out["slurm-init-seconds-before-status-checks"] = 2
    out["slurm-keep-successful-logs"] = True
    if not accounting:
        # sacct exists but answers "accounting storage is disabled": the plugin would poll forever
        out["slurm-status-command"] = "squeue"
    out["retries"] = 0
    out["keep-going"] = False
    return out


def test_profile_fits_node_and_drops_gpus():
    """Pure: the fitting above keeps the per-rule values that fit and removes every GPU request."""
    profile = yaml.safe_load(PROFILE.read_text(encoding="utf-8"))
    fitted = fit_profile(profile, cpus=2, mem_mb=8000, accounting=False)
    res = fitted["set-resources"]
    assert profile["set-resources"]["train"]["gpu"] == 1 and profile["set-resources"]["predict"]["gpu"] == 1
    assert res["train"]["gpu"] == 0 and res["predict"]["gpu"] == 0
    assert res["train"]["runtime"] == profile["set-resources"]["train"]["runtime"]
    assert all(r.get("cpus_per_task", 1) <= 2 and r["mem_mb"] <= 4000 for r in res.values())
    assert all(threads <= 2 for threads in fitted["set-threads"].values())
    assert fitted["slurm-status-command"] == "squeue" and fitted["executor"] == "slurm"


def test_cpus_asked_follow_the_threads_a_job_runs():
    """Pure: train and predict ask no fixed cpus_per_task in the profile (it would override their
    rules', which follow set-threads and train.num_workers); every other rule the profile sizes
    runs one thread and asks one CPU."""
    profile = yaml.safe_load(PROFILE.read_text(encoding="utf-8"))
    res = profile["set-resources"]
    for rule in ("train", "predict"):
        assert "cpus_per_task" not in res[rule] and rule in profile["set-threads"], rule
    assert all(r.get("cpus_per_task", 1) == 1 for rule, r in res.items() if rule not in profile["set-threads"])
    rules = (REPO_ROOT / "workflow" / "rules" / "train.smk").read_text(encoding="utf-8")
    assert "cpus_per_task=train_cpus" in rules and "cpus_per_task=cpus_of_threads" in rules


def expected_cpus(fitted: dict, rule: str) -> int:
    """CPUs a job of ``rule`` asks under the fitted profile and TINY_CONFIG: the profile's
    cpus_per_task, else the rule's: set-threads (+ train.num_workers, 0 here, for train)."""
    res = fitted["set-resources"].get(rule, {})
    if "cpus_per_task" in res:
        return int(res["cpus_per_task"])
    return int(fitted["set-threads"][rule]) + (TINY_CONFIG["train"].get("num_workers", 0) if rule == "train" else 0)


# ------------------------------------------------------------------ running and inspecting


def run_snakemake(workdir: Path, args: list[str], timeout: float) -> tuple[int, str]:
    """Run snakemake in ``workdir``; on timeout stop it with SIGTERM (it cancels its SLURM jobs)."""
    log_path = workdir / "snakemake-slurm.out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)                          # a test run inside a SLURM job must not inherit it
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=workdir,
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = -1
    text = log_path.read_text(encoding="utf-8")
    if rc == -1:
        run_id = re.search(r"SLURM run ID: (\S+)", text)
        if run_id:
            _cmd("scancel", "--name", run_id.group(1))
        text += f"\n*** snakemake timed out after {timeout:.0f} s and was stopped ***"
    return rc, text


def submitted_jobs(output: str) -> dict[str, tuple[str, str]]:
    """SLURM job id -> (rule, or ``group:<name>`` for a group job, SLURM log file) for every job
    the plugin submitted."""
    jobs = {}
    for _, slurm_id, log in SUBMITTED_RE.findall(output):
        rule = re.search(r"/rule_([A-Za-z0-9_]+)/", log)
        group = re.search(r"/group_([A-Za-z0-9_]+)/", log)
        jobs[slurm_id] = (rule.group(1) if rule else f"group:{group.group(1)}" if group else "?", log)
    return jobs


def rules_of(name: str, groups: dict[str, str]) -> set[str]:
    """The rules a submitted job ran: its rule, or the rules of its group in the profile that the
    plugin lists in the group job's log folder (``group_<group>_<its rules, sorted, joined by _>``)."""
    if not name.startswith("group:"):
        return {name}
    label = name.removeprefix("group:")
    found = set()
    for rule, group in groups.items():
        if label.startswith(f"{group}_") and f"_{rule}_" in f"{label[len(group):]}_":
            found.add(rule)
    return found


def _minutes(limit: str) -> int:
    """SLURM time limit '[D-]HH:MM:SS' / 'MM:SS' -> minutes."""
    days, _, hms = limit.rpartition("-")
    parts = [int(p) for p in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + (parts[2] > 0)


def job_records(ids: list[str], accounting: bool) -> dict[str, dict]:
    """id -> {state, minutes, cpus} from squeue (kept for MinJobAge) and, if kept, accounting."""
    records = {}
    out = _cmd("squeue", "--states=all", "-h", "-j", ",".join(ids), "-o", "%i|%T|%l|%C").stdout
    for line in out.splitlines():
        jid, state, limit, cpus = line.split("|")
        records[jid] = {"state": state, "minutes": _minutes(limit), "cpus": int(cpus)}
    missing = [i for i in ids if i not in records]
    if missing and accounting:
        out = _cmd("sacct", "-X", "-n", "-P", "-j", ",".join(missing),
                   "-o", "JobIDRaw,State,Timelimit,AllocCPUS").stdout
        for line in out.splitlines():
            jid, state, limit, cpus = line.split("|")
            records[jid] = {"state": state.split()[0], "minutes": _minutes(limit), "cpus": int(cpus)}
    return records


def failure_context(workdir: Path, output: str) -> str:
    parts = [output[-8000:]]
    for log in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))[-6:]:
        parts.append(f"--- {log.relative_to(workdir)}\n{log.read_text(encoding='utf-8')[-2500:]}")
    for log in sorted((workdir / "results" / "logs").rglob("*.log")):
        text = log.read_text(encoding="utf-8")
        if "Error" in text or "Traceback" in text:
            parts.append(f"--- {log.relative_to(workdir)}\n{text[-2500:]}")
    return "\n".join(parts)


# ------------------------------------------------------------------ the test


def test_tiny_workflow_on_slurm(tmp_path):
    reason = slurm_skip_reason()
    if reason:
        if os.environ.get("NODULEFLOW_REQUIRE_SLURM") == "1":
            pytest.fail(f"NODULEFLOW_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cpus, mem_mb = node_limits()
    accounting = accounting_enabled()

    workdir = copy_workflow(tmp_path / "repo")
    shipped = yaml.safe_load(PROFILE.read_text(encoding="utf-8"))
    fitted = fit_profile(shipped, cpus, mem_mb, accounting)
    (workdir / "profiles" / "slurm" / "config.yaml").write_text(yaml.safe_dump(fitted, sort_keys=False), encoding="utf-8")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG, sort_keys=False), encoding="utf-8")

    start = time.monotonic()
    rc, output = run_snakemake(
        workdir, ["--executor", "slurm", "--workflow-profile", "profiles/slurm",
                  "--configfile", "tiny.yaml"], timeout=RUN_TIMEOUT_S)
    seconds = time.monotonic() - start
    assert rc == 0, f"snakemake on SLURM failed (rc {rc}):\n{failure_context(workdir, output)}"

    # every workflow job was a SLURM job, and all of them completed
    jobs = submitted_jobs(output)
    groups = fitted.get("groups", {})
    rules = set().union(*(rules_of(name, groups) for name, _ in jobs.values()))
    assert SLURM_RULES <= rules, f"rules never submitted to SLURM: {sorted(SLURM_RULES - rules)}"
    # the preprocessing of a scan is one SLURM job (the profile's group), one per scan
    scan_jobs = [name for name, _ in jobs.values() if name.startswith("group:scan_")]
    assert len(scan_jobs) == TINY_CONFIG["synthetic"]["n_scans"], sorted(name for name, _ in jobs.values())
    assert not {"resample", "lung_mask", "extract_slices"} & {name for name, _ in jobs.values()}
    assert sum(rule == "train" for rule, _ in jobs.values()) == TINY_CONFIG["cv"]["folds"]
    assert "localrule train" not in output and "localrule resample" not in output
    records = job_records(list(jobs), accounting)
    assert set(records) == set(jobs), f"SLURM does not know jobs {sorted(set(jobs) - set(records))}"
    not_done = {i: r["state"] for i, r in records.items() if r["state"] != "COMPLETED"}
    assert not not_done, f"SLURM jobs not COMPLETED: {not_done}"
    for slurm_id, (_, log) in jobs.items():       # kept by slurm-keep-successful-logs
        assert Path(log).is_file(), f"no SLURM log {log} for job {slurm_id}"

    # the profile's per-rule resources reached sbatch
    res = fitted["set-resources"]
    for slurm_id, (name, _) in jobs.items():
        members = rules_of(name, groups) & set(res)
        if members:
            # a group job runs its rules one after the other: their time limits add up
            assert records[slurm_id]["minutes"] == sum(res[r]["runtime"] for r in members), (name, records[slurm_id])
            # >=: a node with several threads per core allocates whole cores
            assert records[slurm_id]["cpus"] >= max(expected_cpus(fitted, r) for r in members), (name, records[slurm_id])

    # the reports
    reports = workdir / "results" / "reports"
    for k in range(TINY_CONFIG["cv"]["folds"]):
        metrics = json.loads((reports / f"fold{k}" / "metrics.json").read_text(encoding="utf-8"))
        assert metrics["fold"] == k and 0.0 <= metrics["cpm"] <= 1.0
        assert (reports / f"fold{k}" / "froc.csv").is_file()
    summary = (reports / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert summary[0].startswith("fold,") and any(line.startswith("pooled,") for line in summary)
    assert (reports / "report.html").stat().st_size > 0
    print(f"{len(jobs)} SLURM jobs, workflow done in {seconds:.0f} s")
