#!/usr/bin/env python3
"""The driver of scripts/bench-consent (see there for the whole picture). Standard library only.

  bench_consent.py --base-url URL --label LABEL --results FILE [--patients N] [--observations M]
                   [--clients C] [--seconds S] [--rounds R] [--consents "0 1 10"]

For each consent count k it loads a cohort of N patients with M Observations each (one
transaction Bundle per patient, every patient naming Practitioner/bench-doc as general
practitioner) and gives every patient of that cohort k active Consents. Each Consent denies a
different other practitioner, so none applies to bench-doc: every access evaluates all k
directives (the worst case) and still answers 200, which the driver checks.

It then measures, as Practitioner/bench-doc, reads (GET Observation/{id}) and searches
(GET Observation?subject=Patient/{id}&_count=10) of each cohort from C threads, in R rounds
that visit the cohorts in a rotating order, S/R seconds per cohort and kind per round, after a
warm-up. Interleaving is what makes the cohorts comparable: the server's data (its audit log
above all) grows with every request, and this shared machine's speed drifts by tens of percent
from one minute to the next, so cohorts measured one after the other would measure the drift.

Tokens come from the environment: CUSTODIAN_BENCH_TOKEN (ehr-system, for loading) and
CUSTODIAN_BENCH_READER_TOKEN (the practitioner). Appends one JSON line per (cohort, kind) to
--results.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid

FHIR_JSON = "application/fhir+json"
DOCTOR = "Practitioner/bench-doc"


class Client:
    """One keep-alive connection per thread."""

    def __init__(self, base_url: str, token: str):
        match = re.fullmatch(r"http://([^/:]+):(\d+)/?", base_url)
        if not match:
            raise SystemExit(f"--base-url must be http://host:port, not {base_url}")
        self.host, self.port, self.token = match.group(1), int(match.group(2)), token
        self.local = threading.local()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": FHIR_JSON}
        if body is not None:
            headers["Content-Type"] = FHIR_JSON
        for attempt in (1, 2):
            connection = getattr(self.local, "connection", None)
            if connection is None:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
                self.local.connection = connection
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                if response.will_close:
                    connection.close()
                    self.local.connection = None
                return response.status, data
            except (http.client.HTTPException, OSError):
                connection.close()
                self.local.connection = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def log(message: str) -> None:
    print(f"bench-consent: {message}", file=sys.stderr, flush=True)


def load(client: Client, patients: int, observations: int) -> list[tuple[str, list[str]]]:
    """Creates the patients and their Observations; returns (patient id, observation ids)."""
    loaded = []
    for _ in range(patients):
        patient_id = str(uuid.uuid4())
        entries = [{
            "resource": {"resourceType": "Patient", "id": patient_id, "active": True,
                         "generalPractitioner": [{"reference": DOCTOR}]},
            "request": {"method": "PUT", "url": f"Patient/{patient_id}"},
        }]
        observation_ids = []
        for number in range(observations):
            observation_id = str(uuid.uuid4())
            observation_ids.append(observation_id)
            entries.append({
                "resource": {
                    "resourceType": "Observation", "id": observation_id, "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": f"Patient/{patient_id}"},
                    "effectiveDateTime": f"2024-{1 + number % 12:02d}-{1 + number % 28:02d}",
                    "valueQuantity": {"value": 60 + number, "unit": "/min"},
                },
                "request": {"method": "PUT", "url": f"Observation/{observation_id}"},
            })
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        status, body = client.request("POST", "/", json.dumps(bundle).encode())
        if status != 200:
            raise SystemExit(f"loading a patient failed with {status}")
        loaded.append((patient_id, observation_ids))
    return loaded


def consent(patient_id: str, number: int) -> bytes:
    """A Consent that denies one other practitioner everything (it never applies to the reader)."""
    return json.dumps({
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": f"2026-01-01T00:00:{number:02d}Z",
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                   "code": "OPTIN"}]},
        "provision": {
            "type": "deny",
            "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                            "code": "IRCP"}]},
                       "reference": {"reference": f"Practitioner/bench-other-{number}"}}],
        },
    }).encode()


def timed_requests(client: Client, paths: list[str], clients: int, seconds: float
                   ) -> tuple[list[float], int]:
    """Sends GETs of random `paths` from `clients` threads for `seconds`; returns the latencies
    (seconds) of the answers that were 200 and the count of the others."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        mine = []
        failures = 0
        rng = random.Random()
        while time.monotonic() < stop_at:
            path = rng.choice(paths)
            started = time.perf_counter()
            status, _ = client.request("GET", path)
            elapsed = time.perf_counter() - started
            if status == 200:
                mine.append(elapsed)
            else:
                failures += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failures

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def summarize(latencies: list[float], errors: int, seconds: float) -> dict:
    latencies = sorted(latencies)

    def percentile(fraction: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] * 1000

    return {"requests": len(latencies), "errors": errors,
            "per_second": len(latencies) / seconds if seconds else float("nan"),
            "p50_ms": percentile(0.50), "p95_ms": percentile(0.95)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--patients", type=int, default=40, help="patients per cohort")
    parser.add_argument("--observations", type=int, default=25)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10,
                        help="measured seconds per cohort and kind, over all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--consents", default="0 1 10")
    parser.add_argument("--analyze-database-url",
                        help="PostgreSQL to ANALYZE after loading (as autovacuum would, in time)")
    arguments = parser.parse_args()
    loader = Client(arguments.base_url, os.environ["CUSTODIAN_BENCH_TOKEN"])
    reader = Client(arguments.base_url, os.environ["CUSTODIAN_BENCH_READER_TOKEN"])
    counts = [int(count) for count in arguments.consents.split()]
    paths: dict[tuple[int, str], list[str]] = {}
    for count in counts:
        log(f"[{arguments.label}] loading a cohort of {arguments.patients} patients x "
            f"{arguments.observations} Observations with {count} Consents each")
        loaded = load(loader, arguments.patients, arguments.observations)
        for patient_id, _ in loaded:
            for number in range(count):
                status, _ = loader.request("POST", "/Consent", consent(patient_id, number))
                if status != 201:
                    raise SystemExit(f"creating a Consent failed with {status}")
        paths[(count, "read")] = [f"/Observation/{oid}" for _, ids in loaded for oid in ids]
        paths[(count, "search")] = [f"/Observation?subject=Patient/{pid}&_count=10"
                                    for pid, _ in loaded]
    if arguments.analyze_database_url:
        # Fresh tables have no statistics yet: without them the planner assumes they are
        # empty, and the first minute would measure that rather than the server.
        subprocess.run(["psql", arguments.analyze_database_url, "-X", "-q", "-c", "ANALYZE"],
                       check=True, env={**os.environ, "PGCONNECT_TIMEOUT": "5"})
    slice_seconds = arguments.seconds / arguments.rounds
    failed = False
    for kind in ("read", "search"):
        warm_up = [path for count in counts for path in paths[(count, kind)]]
        timed_requests(reader, warm_up, arguments.clients, min(2.0, arguments.seconds / 4))
        gathered = {count: ([], 0) for count in counts}
        for round_number in range(arguments.rounds):
            shift = round_number % len(counts)
            for count in counts[shift:] + counts[:shift]:
                latencies, errors = timed_requests(
                    reader, paths[(count, kind)], arguments.clients, slice_seconds)
                previous_latencies, previous_errors = gathered[count]
                gathered[count] = (previous_latencies + latencies, previous_errors + errors)
        for count in counts:
            latencies, errors = gathered[count]
            result = summarize(latencies, errors, arguments.seconds)
            result.update({"label": arguments.label, "consents": count, "kind": kind})
            failed |= errors > 0
            log(f"[{arguments.label}] {count:>2} consents {kind:<6} {result['per_second']:8.1f} req/s "
                f"p50 {result['p50_ms']:6.2f} ms p95 {result['p95_ms']:6.2f} ms errors {errors}")
            with open(arguments.results, "a", encoding="utf-8") as out:
                out.write(json.dumps(result) + "\n")
    if failed:
        raise SystemExit("some requests failed")


def summary(results: str) -> None:
    rows = [json.loads(line) for line in open(results, encoding="utf-8") if line.strip()]
    base = {(row["label"], row["kind"]): row for row in rows if row["consents"] == 0}
    print(f"{'run':<22} {'consents':>8} {'kind':<7} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p50 vs 0':>9} {'p95 vs 0':>9}")
    for row in rows:
        zero = base.get((row["label"], row["kind"]))

        def change(key: str) -> float:
            return (row[key] / zero[key] - 1) * 100 if zero else float("nan")

        print(f"{row['label']:<22} {row['consents']:>8} {row['kind']:<7} {row['per_second']:>9.1f} "
              f"{row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} {change('p50_ms'):>+8.1f}% "
              f"{change('p95_ms'):>+8.1f}%")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        main()
