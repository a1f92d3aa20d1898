#!/usr/bin/env python3
"""Patient/$everything throughput and Patient/$erase time against a running server.

Usage: scripts/bench_everything.py --base-url http://127.0.0.1:PORT --token-file FILE
           --erase-token-file FILE [--requests 2000] [--clients 8]
           [--erasure-resources 1000] [--erasures 3]

1. Loads the shared Synthea Organizations and Practitioners and one typical Synthea patient
   (the first patient bundle, ids as scripts/bench-search makes them) with PUT.
2. `$everything`: after a warm-up, `--requests` GET /Patient/{id}/$everything?_count=500 (the
   whole record in one page, with the shared resources it refers to) from `--clients` concurrent
   clients; prints requests/s and p50/p95 latency. Goal (issue 9): >= 100 requests/s.
3. `$erase`: `--erasures` times, a fresh patient with `--erasure-resources` resources (the
   Patient and Observations, loaded as transaction Bundles of 100), then one timed
   POST /Patient/{id}/$erase (the compliance-officer token); prints each time and the median,
   and checks the patient then reads 404.

Standard library only; nothing about the data is printed.
"""
import argparse
import json
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search  # noqa: E402  (the Synthea data set and the HTTP client live there)

BATCH = 100


def load_typical_patient(client: bench_search.Client, dataset) -> tuple[str, int]:
    """Loads the shared resources and the first patient bundle; returns the Patient's id and
    how many resources its bundle holds."""
    for kind, resource_id, text in dataset.shared:
        status, _ = client.request("PUT", f"/{kind}/{resource_id}", text.encode())
        if status not in (200, 201):
            raise SystemExit(f"loading a shared {kind} answered {status}")
    replicator = bench_search.Replicator(dataset)
    patient_id = None
    count = 0
    for kind, resource_id, body in replicator.copy(dataset.patient_bundles[0], 0):
        status, _ = client.request("PUT", f"/{kind}/{resource_id}", body)
        if status not in (200, 201):
            raise SystemExit(f"loading a {kind} answered {status}")
        count += 1
        if kind == "Patient":
            patient_id = resource_id
    if patient_id is None:
        raise SystemExit("the first Synthea bundle has no Patient")
    return patient_id, count


def measure_everything(client, patient_id: str, requests: int, clients: int) -> int:
    path = f"/Patient/{patient_id}/$everything?_count=500"
    status, body = client.request("GET", path)
    if status != 200:
        raise SystemExit(f"$everything answered {status}: {bench_search.diagnostics(body)}")
    bundle = json.loads(body)
    entries = bundle.get("entry", [])
    matches = sum(1 for entry in entries if entry["search"]["mode"] == "match")
    print(f"$everything: {matches} resources of the patient, {len(entries) - matches} shared resources referred to, "
          f"{len(body) / 1024:.0f} KiB per response")
    for _ in range(50):
        client.request("GET", path)

    def one(_):
        started = time.perf_counter()
        status, _ = client.request("GET", path)
        return status, (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    failures = sum(1 for status, _ in results if status != 200)
    latencies = sorted(ms for _, ms in results)
    print(
        f"$everything: {requests} requests from {clients} clients in {elapsed:.1f} s: "
        f"{requests / elapsed:.0f} requests/s, p50 {bench_search.percentile(latencies, 50):.1f} ms, "
        f"p95 {bench_search.percentile(latencies, 95):.1f} ms, failed {failures}"
    )
    return failures


def large_patient(client, resources: int) -> str:
    """A Patient with `resources - 1` Observations, loaded as transaction Bundles."""
    patient_id = str(uuid.uuid4())
    status, body = client.request(
        "PUT", f"/Patient/{patient_id}",
        json.dumps({"resourceType": "Patient", "id": patient_id, "gender": "other"}).encode(),
    )
    if status not in (200, 201):
        raise SystemExit(f"creating the Patient answered {status}")
    remaining = resources - 1
    while remaining > 0:
        entries = [
            {
                "resource": {
                    "resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": f"Patient/{patient_id}"},
                    "effectiveDateTime": "2024-01-01",
                    "valueQuantity": {"value": 60 + index % 40, "unit": "/min"},
                },
                "request": {"method": "POST", "url": "Observation"},
            }
            for index in range(min(BATCH, remaining))
        ]
        status, body = client.request(
            "POST", "/", json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}).encode()
        )
        if status != 200:
            raise SystemExit(f"a transaction answered {status}: {bench_search.diagnostics(body)}")
        remaining -= len(entries)
    return patient_id


def measure_erasure(client, eraser, resources: int, erasures: int) -> int:
    times = []
    failures = 0
    for _ in range(erasures):
        patient_id = large_patient(client, resources)
        started = time.perf_counter()
        status, body = eraser.request("POST", f"/Patient/{patient_id}/$erase")
        seconds = time.perf_counter() - started
        erased = 0
        if status == 200:
            for parameter in json.loads(body)["parameter"]:
                if parameter["name"] == "resourcesErased":
                    erased = parameter["valueInteger"]
        after, _ = client.request("GET", f"/Patient/{patient_id}")
        if status != 200 or erased != resources or after != 404:
            failures += 1
            print(f"$erase: answered {status}, erased {erased}, then read {after}", file=sys.stderr)
        times.append(seconds * 1000)
    print(
        f"$erase: a patient with {resources} resources, {erasures} times: "
        + ", ".join(f"{ms:.0f}" for ms in times)
        + f" ms (median {statistics.median(times):.0f} ms), failed {failures}"
    )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--erase-token-file", required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--erasure-resources", type=int, default=1000)
    parser.add_argument("--erasures", type=int, default=3)
    parser.add_argument(
        "--synthea-dir",
        default=str(Path(__file__).resolve().parents[2] / "shared/testdata/synthea-r4-bundles"),
    )
    arguments = parser.parse_args()
    client = bench_search.Client(arguments.base_url, Path(arguments.token_file).read_text().strip())
    eraser = bench_search.Client(arguments.base_url, Path(arguments.erase_token_file).read_text().strip())
    dataset = bench_search.read_dataset(Path(arguments.synthea_dir))
    patient_id, loaded = load_typical_patient(client, dataset)
    print(f"loaded a typical Synthea patient ({loaded} resources in its bundle)")
    failures = measure_everything(client, patient_id, arguments.requests, arguments.clients)
    failures += measure_erasure(client, eraser, arguments.erasure_resources, arguments.erasures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
