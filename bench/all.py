"""Every benchmark in one run: prints each figure as fabfleet / baseline (medians, with
min-max over the repeats) and writes bench/results.json, which the README's table is
made from (`--markdown` prints that table).

    .venv/bin/python bench/all.py [--markdown]
"""

import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_startup.py", "bench_check_env.py", "bench_runs.py", "bench_gather.py", "bench_map.py",
           "bench_latency.py", "bench_keep.py",
           "bench_payload.py", "bench_tunnel.py", "bench_dask.py", "bench_ipp.py", "bench_scale.py"]
LINE = re.compile(r"^(?P<name>.+?)\s+fabfleet\s+(?P<ours>[\d.]+) ms\s+baseline\s+"
                  r"(?P<base>[\d.]+) ms\s+ratio\s+(?P<ratio>[\d.]+)x\s+\[fabfleet "
                  r"(?P<omin>[\d.]+)-(?P<omax>[\d.]+), baseline (?P<bmin>[\d.]+)-"
                  r"(?P<bmax>[\d.]+) ms\]")


def main() -> None:
    rows = []
    for bench in BENCHES:
        proc = subprocess.run([sys.executable, str(HERE / bench)], capture_output=True,
                              text=True, cwd=HERE)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stderr.write(f"{bench} failed:\n{proc.stderr[-2000:]}\n")
        for line in proc.stdout.splitlines():
            m = LINE.match(line)
            if m:
                rows.append({"bench": bench, "name": m["name"].strip(),
                             **{k: float(m[k]) for k in ("ours", "base", "ratio", "omin",
                                                         "omax", "bmin", "bmax")}})
    (HERE / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if "--markdown" in sys.argv:
        print("\n| benchmark | fabfleet ms (min–max) | baseline ms (min–max) | ratio |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['ours']:.1f} ({r['omin']:.1f}–{r['omax']:.1f}) | "
                  f"{r['base']:.1f} ({r['bmin']:.1f}–{r['bmax']:.1f}) | {r['ratio']:.2f}× |")


if __name__ == "__main__":
    main()
