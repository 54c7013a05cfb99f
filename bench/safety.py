"""Safety evaluation throughput on the `tiny` preset (CPU): `regap safety` with batch 16 vs batch 1.

Runs the real runner (conditions, generation, keyword judge, summary) twice on the same items
in one process, each into a fresh folder, and reports items/s, the ratio, and the fractions of
identical responses and identical verdicts; `--dtype float32` checks identical responses.
`--advbench PATH` runs the full text/blank/noise/natural/typo comparison over AdvBench with
batch 16 and reports its wall time (the <= 60 min goal).

    python bench/safety.py [--n 16] [--dtype bfloat16] [--max-new-tokens 32]
    python bench/safety.py --advbench ../shared/data/advbench/advbench_behaviors.csv --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from regap.models import load_model
from regap.safety.runner import SafetyRun, run_safety


def _results(folder: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    return {(r["condition"], r["request_id"]): r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="starter harmful requests per condition")
    parser.add_argument("--conditions", default="text,blank")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--advbench", default=None)
    args = parser.parse_args()
    model = load_model("tiny", dtype=args.dtype)
    report = {"dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.advbench:
            run = SafetyRun(model="tiny", out=Path(tmp) / "advbench", prompts=[f"advbench:{args.advbench}"],
                            conditions=["text", "blank", "noise", "natural", "typo"], max_new_tokens=args.max_new_tokens,
                            batch_size=16, dtype=args.dtype)
            start = time.perf_counter()
            summary = run_safety(run, progress=True, model=model)
            report["advbench_all_conditions_minutes"] = (time.perf_counter() - start) / 60
            report["advbench_rows"] = summary["n_rows"]
        else:
            timings = {}
            for batch in (1, 16):
                run = SafetyRun(model="tiny", out=Path(tmp) / f"b{batch}", prompts=["starter-harmful"], limit=args.n,
                                conditions=args.conditions.split(","), max_new_tokens=args.max_new_tokens,
                                batch_size=batch, dtype=args.dtype)
                start = time.perf_counter()
                run_safety(run, progress=False, model=model)
                timings[batch] = time.perf_counter() - start
            one, sixteen = _results(Path(tmp) / "b1"), _results(Path(tmp) / "b16")
            keys = sorted(one)
            report.update({
                "items": len(keys), "seconds_batch1": timings[1], "seconds_batch16": timings[16],
                "items_per_s_batch1": len(keys) / timings[1], "items_per_s_batch16": len(keys) / timings[16],
                "throughput_ratio": timings[1] / timings[16],
                "identical_responses": sum(one[k]["response"] == sixteen[k]["response"] for k in keys) / len(keys),
                "identical_verdicts": sum(one[k]["verdicts"]["keyword"]["unsafe"] == sixteen[k]["verdicts"]["keyword"]["unsafe"]
                                          for k in keys) / len(keys),
            })
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
