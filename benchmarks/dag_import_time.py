"""Import time of the DAG file, in fresh interpreters (parse-time cost in the scheduler).

    python benchmarks/dag_import_time.py [--runs 5]

Prints, per run and as medians: the time to import airflow.sdk, the DAG file on top of
it, and which heavy modules (if any) the DAG file pulled in.  Last line:
``dag_file_s=<median> total_s=<median> heavy=<list>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "great_expectations", "mlflow", "pandas")
PROBE = f"""
import sys, time, json
sys.path.insert(0, 'plugins')
t0 = time.perf_counter()
import airflow.sdk
t1 = time.perf_counter()
import importlib.util as u
spec = u.spec_from_file_location('rlhf_tuning', 'dags/rlhf_tuning.py')
module = u.module_from_spec(spec); spec.loader.exec_module(module)
t2 = time.perf_counter()
print(json.dumps({{'sdk': t1 - t0, 'dag': t2 - t1,
                  'heavy': [n for n in {HEAVY!r} if n in sys.modules]}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    samples = []
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        sample = json.loads(out)
        samples.append(sample)
        print(f"run {i + 1}: airflow.sdk {sample['sdk']:.3f} s, dag file {sample['dag']:.3f} s")
    dag = statistics.median(s["dag"] for s in samples)
    total = statistics.median(s["sdk"] + s["dag"] for s in samples)
    heavy = sorted({n for s in samples for n in s["heavy"]})
    print(f"dag_file_s={dag:.3f} total_s={total:.3f} heavy={','.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
