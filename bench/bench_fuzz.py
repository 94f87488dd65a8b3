"""Fuzzing with a large budget: every MQTT input of the registrar and the agents, and every HTTP endpoint.

The same inputs and properties as tests/unit/test_fuzz_inputs.py and tests/integration/test_api_fuzz.py (from
tests/fuzzing.py and tests/fuzzing_http.py), run for --inputs MQTT inputs in all (shared evenly by the targets:
single messages to the registrar, sequences of messages and clock ticks, single messages to an agent in sync and
to one resynchronising, sequences to an agent, the agent reading enrollment answers) and --http requests to a
running registrar's API. Hypothesis runs in rounds of --round examples, each with its own seed (--seed + round),
so a failure names the seed that reproduces it and one failure does not end the run.

    python bench/bench_fuzz.py [--inputs 100000] [--http 5000] [--round 2000] [--seed 0] [--json out.json]

Prints inputs/s per target and every failure (the shrunk example hypothesis reports); exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
# starlette's TestClient asks for its httpx fork at import; pyproject silences the same warning for pytest.
warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")

from brokers import free_port  # noqa: E402
from fuzzing import TARGETS  # noqa: E402
from fuzzing_http import ApiHarness, check_response, requests_for  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BENCH = settings(
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.generate, Phase.shrink),  # no explain phase: it re-runs a failure many times to annotate it
    report_multiple_bugs=False,
)


@dataclass
class Result:
    """One target's run."""

    name: str
    inputs: int = 0
    examples: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def inputs_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def run_target(
    name: str,
    inputs: st.SearchStrategy,
    check: Callable[[object], None],
    *,
    count: Callable[[object], int],
    budget: int,
    per_example: float,
    round_size: int,
    base_seed: int,
) -> Result:
    """Run `check` on examples of `inputs` until `budget` inputs were checked, in seeded rounds."""
    result = Result(name)

    def counted(example: object) -> None:
        result.examples += 1
        result.inputs += count(example)
        check(example)

    started = time.perf_counter()
    rounds = 0
    while result.inputs < budget:
        remaining = budget - result.inputs
        examples = max(1, min(round_size, math.ceil(remaining / per_example)))
        round_seed = base_seed + rounds
        rounds += 1
        test = seed(round_seed)(settings(BENCH, max_examples=examples)(given(inputs)(counted)))
        try:
            test()
        except Exception as exc:  # a property broke: keep it (hypothesis has shrunk it) and go on
            lines = [line for line in str(exc).splitlines() if line.strip()]
            result.failures.append({"seed": round_seed, "error": type(exc).__name__, "detail": "\n".join(lines[:12])})
        if rounds > 10 * budget:  # hypothesis stopped producing examples (a search space used up): do not spin
            break
    result.seconds = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="MQTT inputs in all (registrar and agents)")
    parser.add_argument("--http", type=int, default=5_000, help="requests to the registrar's HTTP API")
    parser.add_argument("--round", type=int, default=2_000, help="examples per hypothesis run (one seed each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results (JSON)")
    args = parser.parse_args()
    # The code under test logs every refusal at WARNING: that is its job, not this report's.
    logging.disable(logging.CRITICAL)

    results = []
    share = math.ceil(args.inputs / len(TARGETS))
    for target in TARGETS:
        result = run_target(
            target.name, target.inputs, target.check, count=target.count, budget=share,
            per_example=target.inputs_per_example, round_size=args.round, base_seed=args.seed,
        )  # fmt: skip
        results.append(result)
        print(f"{result.name:28} {result.inputs:8,d} inputs {result.seconds:7.1f} s {result.inputs_per_s:8,.0f}/s "
              f"{len(result.failures)} failures", flush=True)  # fmt: skip
    if args.http:
        harness = ApiHarness(broker_port=free_port())
        try:
            result = run_target(
                "http-api", requests_for(harness.spec), lambda request: check_response(harness, request),
                count=lambda _: 1, budget=args.http, per_example=1.0, round_size=args.round, base_seed=args.seed,
            )  # fmt: skip
        finally:
            harness.close()
        results.append(result)
        print(f"{result.name:28} {result.inputs:8,d} inputs {result.seconds:7.1f} s {result.inputs_per_s:8,.0f}/s "
              f"{len(result.failures)} failures ({harness.restarts} registrar restarts to the baseline)", flush=True)  # fmt: skip

    mqtt = [r for r in results if r.name != "http-api"]
    total_inputs, total_s = sum(r.inputs for r in mqtt), sum(r.seconds for r in mqtt)
    failures = [(r.name, f) for r in results for f in r.failures]
    print(f"{'MQTT inputs in all':28} {total_inputs:8,d} inputs {total_s:7.1f} s {total_inputs / total_s:8,.0f}/s")
    for name, failure in failures:
        print(f"\nFAILURE in {name} (seed {failure['seed']}): {failure['error']}\n{failure['detail']}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "mqtt_inputs": total_inputs,
                    "mqtt_seconds": total_s,
                    "targets": [{**asdict(r), "inputs_per_s": r.inputs_per_s} for r in results],
                    "failures": len(failures),
                },
                indent=1,
            )
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
