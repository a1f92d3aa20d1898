#!/usr/bin/env python3
"""Ingest throughput of transaction Bundles through `POST /` (issue: EHR-grade data exchange).

Usage: scripts/bench_ingest.py --base-url http://127.0.0.1:PORT --token-file FILE
           [--patients 1000] [--clients 8]

Loads the shared Synthea Organizations and Practitioners once (PUT), then sends each copy of
each Synthea patient bundle (new ids per copy, as scripts/bench-search makes them) as one
transaction Bundle of PUT entries, from `--clients` concurrent clients, and prints resources/s
and the p50/p95 latency of a transaction. Standard library only; nothing about the data is
printed. The server must already run (see scripts/bench for how to start one).

With --write-dir DIR nothing is sent: the same Bundles are written to DIR (the shared resources
first, as 0-shared.json) for timing `custodian import DIR`, which prints its own rate.
"""
import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search  # noqa: E402  (the Synthea replication and HTTP client live there)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url")
    parser.add_argument("--token-file")
    parser.add_argument("--write-dir", help="write the Bundles here instead of sending them")
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--synthea-dir",
        default=str(Path(__file__).resolve().parents[2] / "shared/testdata/synthea-r4-bundles"),
    )
    arguments = parser.parse_args()
    dataset = bench_search.read_dataset(Path(arguments.synthea_dir))
    replicator = bench_search.Replicator(dataset)
    copies = max(1, arguments.patients // bench_search.PATIENTS_PER_COPY)

    def transaction(entries) -> bytes:
        return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}).encode()

    def bundles():
        for copy in range(copies):
            for bundle in dataset.patient_bundles:
                entries = [
                    {
                        "resource": json.loads(body),
                        "request": {"method": "PUT", "url": f"{kind}/{resource_id}"},
                    }
                    for kind, resource_id, body in replicator.copy(bundle, copy)
                ]
                yield len(entries), transaction(entries)

    if arguments.write_dir:
        directory = Path(arguments.write_dir)
        directory.mkdir(parents=True, exist_ok=True)
        shared = [
            {"resource": json.loads(text), "request": {"method": "PUT", "url": f"{kind}/{resource_id}"}}
            for kind, resource_id, text in dataset.shared
        ]
        (directory / "0-shared.json").write_bytes(transaction(shared))
        written = len(shared)
        for number, (count, body) in enumerate(bundles(), start=1):
            (directory / f"{number:06d}.json").write_bytes(body)
            written += count
        print(f"bench-ingest: wrote {written} resources in {number + 1} Bundles to {directory}", file=sys.stderr)
        return 0

    if not arguments.base_url or not arguments.token_file:
        parser.error("--base-url and --token-file are required unless --write-dir is given")
    token = Path(arguments.token_file).read_text().strip()
    client = bench_search.Client(arguments.base_url, token)
    for kind, resource_id, text in dataset.shared:
        status, _ = client.request("PUT", f"/{kind}/{resource_id}", text.encode())
        if status not in (200, 201):
            raise SystemExit(f"loading a shared {kind} answered {status}")

    latencies: list[float] = []
    failures = 0

    def send(item):
        count, body = item
        started = time.perf_counter()
        status, _ = client.request("POST", "/", body)
        return count, status, time.perf_counter() - started

    started = time.perf_counter()
    resources = 0
    with ThreadPoolExecutor(max_workers=arguments.clients) as pool:
        for count, status, seconds in pool.map(send, bundles()):
            if status == 200:
                resources += count
                latencies.append(seconds * 1000)
            else:
                failures += 1
                print(f"bench-ingest: a transaction answered {status}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(percent: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * percent / 100))]

    print(
        f"transactions {len(latencies)} (failed {failures}), resources {resources}, "
        f"{elapsed:.1f} s, {resources / elapsed:.0f} resources/s, "
        f"transaction p50 {percentile(50):.0f} ms, p95 {percentile(95):.0f} ms"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
