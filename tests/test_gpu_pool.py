"""Local multi-GPU runs: parallel jobs each get their own GPU from the pool (tested without a GPU)."""

import os
import subprocess
import sys
import time

HOLD = (
    "import os, sys, time; from dfakd import gpu_pool; d = gpu_pool.claim(); "
    "print(d, os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(float(sys.argv[1]))"
)


CHECK = "import os; from dfakd import gpu_pool; print(gpu_pool.claim(), 'CUDA_VISIBLE_DEVICES' in os.environ)"


def _start(env, hold_s):
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(hold_s)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _env(tmp_path, pool, visible=None, slots=None):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "DFAKD_GPU_SLOTS")}
    env.update(DFAKD_GPU_POOL=str(pool), DFAKD_GPU_LOCK_DIR=str(tmp_path / "locks"))
    if slots is not None:
        env["DFAKD_GPU_SLOTS"] = str(slots)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env


def test_parallel_jobs_get_distinct_gpus_and_a_third_waits(tmp_path):
    env = _env(tmp_path, 2)
    first, second = _start(env, 6), _start(env, 6)
    ids = {first.stdout.readline().split()[1], second.stdout.readline().split()[1]}
    assert ids == {"0", "1"}
    t0 = time.monotonic()
    third = _start(env, 0)
    out, err = third.communicate(timeout=60)
    assert time.monotonic() - t0 > 2, "the third job must wait for a GPU to be released"
    assert "busy; waiting" in err and out.split()[1] in {"0", "1"}
    for p in (first, second):
        p.wait(timeout=30)


def test_k_slots_put_k_jobs_on_one_gpu_and_the_next_waits(tmp_path):
    env = _env(tmp_path, 1, slots=3)
    holders = [_start(env, 6) for _ in range(3)]
    assert [h.stdout.readline().split()[1] for h in holders] == ["0", "0", "0"]
    assert {p.name for p in (tmp_path / "locks").iterdir()} == {f"gpu0.slot{k}.lock" for k in range(3)}
    t0 = time.monotonic()
    fourth = _start(env, 0)
    out, err = fourth.communicate(timeout=60)
    assert time.monotonic() - t0 > 2, "the (K+1)-th job must wait for a slot to be released"
    assert "3 GPU slots of the pool are busy; waiting" in err and out.split()[1] == "0"
    for h in holders:
        h.wait(timeout=30)


def test_slots_spread_jobs_over_the_gpus_first(tmp_path):
    env = _env(tmp_path, 2, slots=2)
    holders = [_start(env, 4) for _ in range(4)]
    ids = sorted(h.stdout.readline().split()[1] for h in holders)
    assert ids == ["0", "0", "1", "1"]  # two jobs per GPU
    for h in holders:
        h.wait(timeout=30)


def test_a_killed_job_releases_its_gpu(tmp_path):
    env = _env(tmp_path, 1)
    holder = _start(env, 60)
    assert holder.stdout.readline().split()[1] == "0"
    holder.kill()
    holder.wait()
    out, _ = _start(env, 0).communicate(timeout=30)
    assert out.split()[1] == "0"


def test_pool_draws_from_already_visible_devices(tmp_path):
    env = _env(tmp_path, 2, visible="3,5")
    a, b = _start(env, 4), _start(env, 4)
    assert {a.stdout.readline().split()[1], b.stdout.readline().split()[1]} == {"3", "5"}
    a.wait(timeout=30)
    b.wait(timeout=30)


def test_no_pool_leaves_the_environment_alone(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", CHECK],
        env=_env(tmp_path, 0),
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["None", "False"]


def test_a_job_that_asks_for_no_gpu_takes_none(tmp_path):
    env = {**_env(tmp_path, 2), "DFAKD_JOB_GPUS": "0"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["None", "False"]


def test_cli_training_verbs_claim_a_gpu(tmp_path):
    env = _env(tmp_path, 2)
    proc = subprocess.run(
        [sys.executable, "-m", "dfakd", "evaluate", "--checkpoint", str(tmp_path / "missing.pt")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert "CUDA_VISIBLE_DEVICES=0" in proc.stderr
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
