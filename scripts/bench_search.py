#!/usr/bin/env python3
"""The driver of scripts/bench-search (see there for the whole picture). Standard library only.

Subcommands:
  run      load the Synthea data replicated to --patients patients into the server at
           --base-url, VACUUM (ANALYZE) the database at --analyze-database-url (PostgreSQL) if given, run
           the query mix, print its table and append a JSON line of results to --results. The
           bearer token is read from CUSTODIAN_BENCH_TOKEN. With --no-load it skips the load and
           queries data an earlier run left in the server (A/B of two builds on one data set).
  explain  ANALYZE the PostgreSQL database at --database-url, then EXPLAIN (ANALYZE, BUFFERS) the
           candidate SQL of four query kinds; exits 1 if a plan scans search_terms,
           search_dates or resource_heads sequentially.
  summary  the tables of all runs in --results, per backend, with p95 ratios between scales;
           exits 1 if any query failed.

Nothing of the data is printed: queries are named by kind; a failure shows its kind, HTTP status
and the server's OperationOutcome diagnostics, never the resource or the query's values.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import re
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

LOG_TAG = "bench-search"
PATIENTS_PER_COPY = 8
# Namespace of the replicated ids: copy c of the resource with original id X gets
# uuid5(uuid5(BENCH_NAMESPACE, c), X), the same on every run.
BENCH_NAMESPACE = uuid.UUID("6f1d4c2e-5b3a-4e8f-9c7d-2a1b0e9f8d7c")
LOINC = "http://loinc.org"
FHIR_JSON = "application/fhir+json"
PROGRESS_EVERY_SECS = 5.0
WARMUP_PER_KIND = 2
HTTP_TIMEOUT_SECS = 120


def log(message: str) -> None:
    print(f"{LOG_TAG}: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The data set and its replication


@dataclass
class PatientFacts:
    """What the query mix needs to know of one original patient (copies derive from it)."""

    original_id: str
    family: str
    birth_date: str
    gender: str
    record_number: tuple[str, str] | None  # (system, value) of the MR identifier
    observations: list[tuple[str, int]]  # (LOINC code, year of the effective date)
    encounter_years: list[int]


@dataclass
class PatientBundle:
    """One patient's transaction bundle, minus the shared resources it repeats."""

    entries: list[tuple[str, str, str]]  # (type, original id, resource JSON text)
    facts: PatientFacts


@dataclass
class Dataset:
    shared: list[tuple[str, str, str]]  # (type, id, resource JSON text), loaded once
    shared_references: dict[str, str]  # "urn:uuid:X" -> "Type/X" of the shared resources
    shared_by_identifier: dict[tuple[str, str, str], str]  # (type, system, value) -> id
    patient_bundles: list[PatientBundle]

    def resources_for(self, copies: int) -> int:
        per_copy = sum(len(bundle.entries) for bundle in self.patient_bundles)
        return len(self.shared) + copies * per_copy


def read_dataset(synthea_dir: Path) -> Dataset:
    shared: list[tuple[str, str, str]] = []
    shared_references: dict[str, str] = {}
    shared_by_identifier: dict[tuple[str, str, str], str] = {}
    patient_files = []
    for path in sorted(synthea_dir.glob("*.json")):
        if path.name.startswith(("hospitalInformation", "practitionerInformation")):
            for entry in json.loads(path.read_text())["entry"]:
                resource = entry["resource"]
                kind, resource_id = resource["resourceType"], resource["id"]
                shared.append((kind, resource_id, json.dumps(resource)))
                shared_references[entry["fullUrl"]] = f"{kind}/{resource_id}"
                for identifier in resource.get("identifier", []):
                    key = (kind, identifier.get("system", ""), identifier.get("value", ""))
                    shared_by_identifier[key] = resource_id
        else:
            patient_files.append(path)
    if len(patient_files) != PATIENTS_PER_COPY:
        raise SystemExit(
            f"expected {PATIENTS_PER_COPY} patient bundles in {synthea_dir}, found {len(patient_files)}"
        )
    bundles = []
    for path in patient_files:
        entries = []
        patient = None
        observations = []
        encounter_years = []
        for entry in json.loads(path.read_text())["entry"]:
            resource = entry["resource"]
            kind = resource["resourceType"]
            if entry["fullUrl"] in shared_references:
                continue  # a copy of a shared Organization or Practitioner: referenced, not loaded
            original_id = entry["fullUrl"].removeprefix("urn:uuid:")
            entries.append((kind, original_id, json.dumps(resource)))
            if kind == "Patient":
                patient = (original_id, resource)
            elif kind == "Observation":
                year = year_of(resource.get("effectiveDateTime") or resource.get("issued"))
                for coding in resource.get("code", {}).get("coding", []):
                    if coding.get("system") == LOINC and coding.get("code") and year:
                        observations.append((coding["code"], year))
            elif kind == "Encounter":
                year = year_of(resource.get("period", {}).get("start"))
                if year:
                    encounter_years.append(year)
        if patient is None or not observations or not encounter_years:
            raise SystemExit(f"{path.name}: no Patient, LOINC Observation or dated Encounter")
        # The Patient first, so that a copy's other resources never reference a missing one.
        entries.sort(key=lambda item: item[0] != "Patient")
        bundles.append(PatientBundle(entries, patient_facts(*patient, observations, encounter_years)))
    return Dataset(shared, shared_references, shared_by_identifier, bundles)


def year_of(text: str | None) -> int | None:
    return int(text[:4]) if text and text[:4].isdigit() else None


def patient_facts(original_id, resource, observations, encounter_years) -> PatientFacts:
    names = resource.get("name", [])
    official = next((name for name in names if name.get("use") == "official"), names[0])
    record_number = None
    for identifier in resource.get("identifier", []):
        codes = [coding.get("code") for coding in identifier.get("type", {}).get("coding", [])]
        if "MR" in codes and identifier.get("system") and identifier.get("value"):
            record_number = (identifier["system"], identifier["value"])
    return PatientFacts(
        original_id=original_id,
        family=official["family"],
        birth_date=resource["birthDate"],
        gender=resource["gender"],
        record_number=record_number,
        observations=observations,
        encounter_years=encounter_years,
    )


def copy_id(copy: int, original_id: str) -> str:
    return str(uuid.uuid5(uuid.uuid5(BENCH_NAMESPACE, str(copy)), original_id))


def copy_family(family: str, copy: int) -> str:
    return f"{family}{copy}"


def copy_identifier_value(value: str, copy: int) -> str:
    return f"{value}-{copy}"


class Replicator:
    """Makes copy `copy` of a patient bundle: new ids, references rewritten to Type/id."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def resolve_conditional(self, reference: str) -> str | None:
        """`Organization?identifier=system|value` -> `Organization/<id>` of a shared resource."""
        kind, _, query = reference.partition("?")
        if not query.startswith("identifier="):
            return None
        system, _, value = query.removeprefix("identifier=").rpartition("|")
        resource_id = self.dataset.shared_by_identifier.get((kind, system, value))
        return f"{kind}/{resource_id}" if resource_id else None

    def rewrite_references(self, node, references: dict[str, str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    if value.startswith("urn:uuid:"):
                        target = references.get(value) or self.dataset.shared_references.get(value)
                        if target is None:
                            raise SystemExit("a reference to a resource missing from the bundles")
                        node[key] = target
                    elif "?" in value:
                        target = self.resolve_conditional(value)
                        if target is None:
                            raise SystemExit("a conditional reference matching no shared resource")
                        node[key] = target
                else:
                    self.rewrite_references(value, references)
        elif isinstance(node, list):
            for item in node:
                self.rewrite_references(item, references)

    def copy(self, bundle: PatientBundle, copy: int):
        """Yields (type, id, JSON bytes) of the copy, the Patient first."""
        references = {
            f"urn:uuid:{original_id}": f"{kind}/{copy_id(copy, original_id)}"
            for kind, original_id, _ in bundle.entries
        }
        for kind, original_id, text in bundle.entries:
            resource = json.loads(text)
            resource["id"] = copy_id(copy, original_id)
            self.rewrite_references(resource, references)
            if kind == "Patient":
                for name in resource.get("name", []):
                    if "family" in name:
                        name["family"] = copy_family(name["family"], copy)
                for identifier in resource.get("identifier", []):
                    if "value" in identifier:
                        identifier["value"] = copy_identifier_value(identifier["value"], copy)
            yield kind, resource["id"], json.dumps(resource).encode()


# ---------------------------------------------------------------------------------------------
# HTTP


class RequestFailed(Exception):
    pass


class Client:
    """One keep-alive connection per thread, to one server, with a bearer token."""

    def __init__(self, base_url: str, token: str):
        match = re.fullmatch(r"http://([^/:]+):(\d+)/?", base_url)
        if not match:
            raise SystemExit(f"--base-url must be http://host:port, not {base_url}")
        self.host, self.port = match.group(1), int(match.group(2))
        self.token = token
        self.local = threading.local()
        # Connections opened so far: more than the threads using the client means the server
        # closed some.
        self.connections_opened = 0
        self.opened_lock = threading.Lock()

    def connection(self) -> http.client.HTTPConnection:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT_SECS)
            self.local.connection = connection
            with self.opened_lock:
                self.connections_opened += 1
        return connection

    def drop_connection(self) -> None:
        connection = getattr(self.local, "connection", None)
        if connection is not None:
            connection.close()
            self.local.connection = None

    def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = None
    ) -> tuple[int, bytes]:
        """`token` overrides the client's own (one connection pool for many callers)."""
        headers = {"Authorization": f"Bearer {token or self.token}", "Accept": FHIR_JSON}
        if body is not None:
            headers["Content-Type"] = FHIR_JSON
        for attempt in (1, 2):
            try:
                connection = self.connection()
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                if response.will_close:
                    self.drop_connection()
                return response.status, data
            except (http.client.HTTPException, OSError):
                # A keep-alive connection the server closed: reconnect once (GET and PUT are
                # idempotent).
                self.drop_connection()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def diagnostics(body: bytes) -> str:
    """The OperationOutcome's diagnostics (never anything else of a response)."""
    try:
        outcome = json.loads(body)
    except ValueError:
        return "(not JSON)"
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return "(no OperationOutcome)"
    texts = [
        issue.get("diagnostics") or issue.get("details", {}).get("text") or issue.get("code", "?")
        for issue in outcome.get("issue", [])
    ]
    return "; ".join(texts)[:400] or "(no diagnostics)"


# ---------------------------------------------------------------------------------------------
# Loading


def load(client: Client, dataset: Dataset, copies: int, workers: int, label: str) -> tuple[int, float]:
    replicator = Replicator(dataset)
    total = dataset.resources_for(copies)
    loaded = 0
    lock = threading.Lock()
    stop = threading.Event()
    failure: list[str] = []

    def put(kind: str, resource_id: str, body: bytes) -> None:
        nonlocal loaded
        status, data = client.request("PUT", f"/{kind}/{resource_id}", body)
        if not 200 <= status < 300:
            raise RequestFailed(f"PUT /{kind}/<id> answered {status}: {diagnostics(data)}")
        with lock:
            loaded += 1

    def load_shared(item) -> None:
        if not stop.is_set():
            kind, resource_id, text = item
            put(kind, resource_id, text.encode())

    def load_copy(unit: tuple[int, PatientBundle]) -> None:
        copy, bundle = unit
        for kind, resource_id, body in replicator.copy(bundle, copy):
            if stop.is_set():
                return
            put(kind, resource_id, body)

    def report_progress() -> None:
        while not stop.wait(PROGRESS_EVERY_SECS):
            elapsed = time.monotonic() - started
            log(f"[{label}] loading: {loaded}/{total} resources ({loaded / elapsed:.0f}/s)")

    started = time.monotonic()
    progress = threading.Thread(target=report_progress, daemon=True)
    progress.start()
    units = [(copy, bundle) for copy in range(1, copies + 1) for bundle in dataset.patient_bundles]
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # Shared Organizations and Practitioners first: patient resources reference them.
            for phase, items in ((load_shared, dataset.shared), (load_copy, units)):
                futures = [pool.submit(phase, item) for item in items]
                for future in futures:
                    try:
                        future.result()
                    except (RequestFailed, OSError, http.client.HTTPException) as error:
                        stop.set()
                        failure.append(str(error))
                if failure:
                    break
    finally:
        stop.set()
        progress.join()
    if failure:
        raise RequestFailed(f"loading failed: {failure[0]}")
    return loaded, time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# The query mix


@dataclass(frozen=True)
class QueryKind:
    label: str  # what the table shows: the shape of the query, no values
    make: Callable[[random.Random, "PatientRef"], str]  # the query for one loaded patient


@dataclass
class PatientRef:
    """One loaded patient: copy `copy` of an original."""

    copy: int
    facts: PatientFacts

    @property
    def id(self) -> str:
        return copy_id(self.copy, self.facts.original_id)

    @property
    def family(self) -> str:
        return copy_family(self.facts.family, self.copy)


def encode(value: str) -> str:
    return quote(value, safe="")


def query_record_number(rng, patient):
    system, value = patient.facts.record_number
    return f"Patient?identifier={encode(system + '|' + copy_identifier_value(value, patient.copy))}&_count=50"


def query_observation_code_date(rng, patient):
    code, year = rng.choice(patient.facts.observations)
    return (
        f"Observation?patient=Patient/{patient.id}&code={encode(LOINC + '|' + code)}"
        f"&date=ge{year}&_count=50"
    )


def query_encounter_year(rng, patient):
    year = rng.choice(patient.facts.encounter_years)
    return (
        f"Encounter?patient={patient.id}&date=ge{year}-01-01&date=lt{year + 1}-01-01&_count=50"
    )


def query_has_observation(rng, patient):
    code, _ = rng.choice(patient.facts.observations)
    return f"Patient?_has:Observation:patient:code={encode(code)}&family={encode(patient.family)}&_count=50"


QUERY_KINDS = [
    QueryKind("1  Patient?family", lambda rng, p: f"Patient?family={encode(p.family)}&_count=50"),
    QueryKind("2  Patient?birthdate", lambda rng, p: f"Patient?birthdate={p.facts.birth_date}&_count=50"),
    QueryKind("3  Patient?identifier=sys|MRN", query_record_number),
    QueryKind("4  Patient?gender=female (broad)", lambda rng, p: "Patient?gender=female&_count=10"),
    QueryKind("5  Observation?patient&code&date=ge", query_observation_code_date),
    QueryKind(
        "6  Condition?patient&clinical-status",
        lambda rng, p: f"Condition?patient={p.id}&clinical-status=active&_count=50",
    ),
    QueryKind("7  Encounter?patient&date=ge&date=lt", query_encounter_year),
    QueryKind(
        "8  MedicationRequest?patient&status",
        lambda rng, p: f"MedicationRequest?patient={p.id}&status=active&_count=50",
    ),
    QueryKind(
        "9  Observation?subject:Patient.name",
        lambda rng, p: f"Observation?subject:Patient.name={encode(p.family)}&_count=20",
    ),
    QueryKind("10 Patient?_has:Observation:patient:code", query_has_observation),
    QueryKind(
        "11 Observation?patient&_include",
        lambda rng, p: f"Observation?patient={p.id}&_include=Observation:patient&_count=20",
    ),
    QueryKind(
        "12 Observation?patient&_sort=-date",
        lambda rng, p: f"Observation?patient={p.id}&_sort=-date&_count=20",
    ),
]


@dataclass
class KindResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    matches: int = 0
    first_failure: str | None = None


def percentile(values: list[float], percent: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def matches_in(body: bytes) -> int:
    try:
        bundle = json.loads(body)
    except ValueError:
        return 0
    return sum(
        1
        for entry in bundle.get("entry", [])
        if entry.get("search", {}).get("mode", "match") == "match"
    )


def run_queries(client: Client, dataset: Dataset, copies: int, rounds: int, clients: int, seed: int):
    rng = random.Random(seed)
    patients = [
        PatientRef(copy, bundle.facts)
        for copy in range(1, copies + 1)
        for bundle in dataset.patient_bundles
        if bundle.facts.record_number
    ]

    def plan(per_kind: int) -> list[tuple[int, str]]:
        queries = [
            (index, kind.make(rng, rng.choice(patients)))
            for index, kind in enumerate(QUERY_KINDS)
            for _ in range(per_kind)
        ]
        rng.shuffle(queries)
        return queries

    def send(item: tuple[int, str]) -> tuple[int, float, int, bytes]:
        index, query = item
        started = time.perf_counter()
        status, body = client.request("GET", "/" + query)
        elapsed_ms = (time.perf_counter() - started) * 1000
        return index, elapsed_ms, status, body

    results = [KindResult() for _ in QUERY_KINDS]
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(send, plan(WARMUP_PER_KIND)))  # warm-up: caches, connections, plans
        for index, elapsed_ms, status, body in pool.map(send, plan(rounds)):
            result = results[index]
            result.latencies_ms.append(elapsed_ms)
            if status == 200:
                result.matches += matches_in(body)
            else:
                result.errors += 1
                if result.first_failure is None:
                    result.first_failure = f"status {status}: {diagnostics(body)}"
    return results


def summarize(latencies: list[float], errors: int, matches: int) -> dict:
    successes = len(latencies) - errors
    return {
        "count": len(latencies),
        "errors": errors,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "mean_matches": matches / successes if successes else None,
    }


def command_run(arguments) -> int:
    token = os.environ.get("CUSTODIAN_BENCH_TOKEN", "")
    if not token:
        raise SystemExit("CUSTODIAN_BENCH_TOKEN is not set")
    if arguments.patients % PATIENTS_PER_COPY:
        raise SystemExit(f"--patients must be a multiple of {PATIENTS_PER_COPY}")
    copies = arguments.patients // PATIENTS_PER_COPY
    label = f"{arguments.backend} x{arguments.scale}"
    dataset = read_dataset(Path(arguments.synthea_dir))
    client = Client(arguments.base_url, token)

    if arguments.no_load:
        # Re-measuring a server whose data an earlier run with the same --patients loaded.
        loaded, load_secs = dataset.resources_for(copies), math.nan
        log(f"[{label}] not loading: {loaded} resources are expected to be there")
    else:
        log(f"[{label}] loading {arguments.patients} patients ({dataset.resources_for(copies)} resources)")
        try:
            loaded, load_secs = load(client, dataset, copies, arguments.load_workers, label)
        except RequestFailed as error:
            log(f"[{label}] {error}")
            return 1
        log(f"[{label}] loaded {loaded} resources in {load_secs:.1f} s ({loaded / load_secs:.0f}/s)")
    if arguments.analyze_database_url:
        # What autovacuum does in time after a bulk load (PostgreSQL 13+ vacuums after inserts
        # too): statistics, without which the planner assumes near-empty tables (and picks
        # nested loops over whole index ranges, seconds per query), and the visibility map,
        # without which every index-only scan still visits the heap (a code's 3,500 index rows
        # took 37 ms instead of under 1 ms).
        log(f"[{label}] VACUUM (ANALYZE) before the query mix")
        Psql(arguments.analyze_database_url).run("VACUUM (ANALYZE);")

    log(f"[{label}] query mix: {len(QUERY_KINDS)} kinds x {arguments.rounds}, {arguments.query_clients} clients")
    started = time.monotonic()
    results = run_queries(client, dataset, copies, arguments.rounds, arguments.query_clients, seed=arguments.patients)
    query_secs = time.monotonic() - started

    kinds = []
    for kind, result in zip(QUERY_KINDS, results):
        kinds.append({"kind": kind.label, **summarize(result.latencies_ms, result.errors, result.matches)})
        if result.first_failure:
            log(f"[{label}] FAILED {kind.label}: {result.errors}/{len(result.latencies_ms)} errors; first: {result.first_failure}")
    overall = summarize(
        [value for result in results for value in result.latencies_ms],
        sum(result.errors for result in results),
        sum(result.matches for result in results),
    )
    record = {
        "backend": arguments.backend,
        "scale": arguments.scale,
        "patients": arguments.patients,
        "resources": loaded,
        "load_secs": load_secs,
        "query_secs": query_secs,
        "kinds": kinds,
        "overall": overall,
        "failures": [
            {"kind": kind.label, "errors": result.errors, "first": result.first_failure}
            for kind, result in zip(QUERY_KINDS, results)
            if result.first_failure
        ],
    }
    print(f"== {label}: {arguments.patients} patients, {loaded} resources, "
          f"loaded at {loaded / load_secs:.0f}/s; queries over {query_secs:.1f} s ==")
    print_run_table(record)
    with open(arguments.results, "a", encoding="utf-8") as results_file:
        results_file.write(json.dumps(record) + "\n")
    return 0


def milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_run_table(record: dict) -> None:
    print(f"{'query kind':<40} {'count':>6} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'matches':>8}")
    for row in record["kinds"] + [{"kind": "overall", **record["overall"]}]:
        mean = "-" if row["mean_matches"] is None else f"{row['mean_matches']:.1f}"
        print(f"{row['kind']:<40} {row['count']:>6} {row['errors']:>6} "
              f"{milliseconds(row['p50_ms']):>8} {milliseconds(row['p95_ms']):>8} {mean:>8}")
    print(flush=True)


# ---------------------------------------------------------------------------------------------
# Summary


GOAL_P95_MS = 50.0
GOAL_RATIO = 1.5


def command_summary(arguments) -> int:
    records = [json.loads(line) for line in Path(arguments.results).read_text().splitlines() if line]
    if not records:
        print("no run completed")
        return 1
    by_backend: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_backend[record["backend"]].append(record)
    failed = False
    for backend, runs in by_backend.items():
        runs.sort(key=lambda record: record["scale"])
        print()
        header = f"{backend:<40}"
        for run in runs:
            header += f" | x{run['scale']} ({run['patients']} patients)".ljust(35)
        if len(runs) > 1:
            header += f" | p95 x{runs[-1]['scale']}/x{runs[0]['scale']}"
        print(header)
        columns = f"{'query kind':<40}" + f" | {'count':>6} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8}" * len(runs)
        print(columns)
        rows = [(kind["kind"], [run["kinds"][index] for run in runs]) for index, kind in enumerate(runs[0]["kinds"])]
        rows.append(("overall", [run["overall"] for run in runs]))
        for name, cells in rows:
            line = f"{name:<40}"
            for cell in cells:
                line += (f" | {cell['count']:>6} {cell['errors']:>6} "
                         f"{milliseconds(cell['p50_ms']):>8} {milliseconds(cell['p95_ms']):>8}")
                failed = failed or cell["errors"] > 0
            if len(cells) > 1:
                line += f" | {ratio_text(cells[0]['p95_ms'], cells[-1]['p95_ms']):>8}"
            print(line)
        for run in runs:
            print(f"  x{run['scale']}: {run['resources']} resources loaded in {run['load_secs']:.0f} s "
                  f"({run['resources'] / run['load_secs']:.0f}/s)")
        base = runs[0]["overall"]["p95_ms"]
        if base is not None:
            verdict = "met" if base < GOAL_P95_MS else "NOT met"
            print(f"  goal p95 < {GOAL_P95_MS:.0f} ms at x{runs[0]['scale']}: overall p95 {base:.1f} ms — {verdict}")
        if len(runs) > 1 and base and runs[-1]["overall"]["p95_ms"] is not None:
            ratio = runs[-1]["overall"]["p95_ms"] / base
            verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
            print(f"  goal p95 x{runs[-1]['scale']} <= {GOAL_RATIO}× p95 x{runs[0]['scale']}: ratio {ratio:.2f} — {verdict}")
        for run in runs:
            for failure in run["failures"]:
                print(f"  FAILED x{run['scale']} {failure['kind']}: {failure['errors']} errors; first: {failure['first']}")
    return 1 if failed else 0


def ratio_text(base: float | None, scaled: float | None) -> str:
    if not base or scaled is None:
        return "-"
    return f"{scaled / base:.2f}"


# ---------------------------------------------------------------------------------------------
# EXPLAIN on PostgreSQL
#
# The server narrows a search with one statement per chunk of candidates, built by
# candidate_statement/filter_condition in src/store/sql.rs; statement_of below builds the same
# text with the same placeholders. sqlx prepares it, so PostgreSQL may plan it for the bound
# values (a custom plan) or, after a few executions, once for all values (a generic plan): both
# are explained.

CHUNK = 200  # src/search/engine.rs: candidates read per statement
MAX_INCLUDED = 1_000  # src/search/engine.rs: the limit of an _include/_revinclude lookup
LATEST_QUERY_YEAR = 2200  # src/search/engine.rs query_years: a `ge` date enumerates years to it
EARLIEST_QUERY_YEAR = 1800
TYPICAL_QUERY_YEAR = 2015
INDEXED_TABLES = ("search_terms", "search_dates", "resource_heads")


@dataclass
class Filter:
    """CandidateFilter::Terms — the only kind the explained queries produce."""

    param: str
    terms: list[str]


def statement_of(resource_types: list[str], filters: list[Filter], limit: int) -> tuple[str, list[tuple[str, object]]]:
    """The SQL of candidate_statement (no `after`: the first chunk) and its binds (type, value);
    $1 is the tenant."""
    binds: list[tuple[str, object]] = [("text", None)]

    def bind(kind: str, value) -> str:
        binds.append((kind, value))
        return f"${len(binds)}"

    tenant = "$1"
    conditions = [f"h.tenant = {tenant}", "h.deleted = 0"]
    types = ", ".join(bind("text", name) for name in resource_types)
    conditions.append(f"h.resource_type IN ({types})")
    for item in filters:
        param = bind("text", item.param)
        terms = ", ".join(bind("text", term) for term in item.terms)
        conditions.append(
            f"(h.resource_type, h.resource_id) IN (SELECT x.resource_type, x.resource_id FROM search_terms x "
            f"WHERE x.tenant = {tenant} AND x.resource_type IN ({types}) AND x.param = {param} "
            f"AND (x.term IN ({terms})))"
        )
    limit_placeholder = bind("bigint", limit)
    statement = (
        f"SELECT h.resource_type, h.resource_id FROM resource_heads h WHERE {' AND '.join(conditions)} "
        f"ORDER BY h.resource_type, h.resource_id LIMIT {limit_placeholder}"
    )
    return statement, binds


def sql_literal(value) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


class Psql:
    def __init__(self, database_url: str):
        self.database_url = database_url

    def run(self, script: str, tuples_only: bool = False) -> str:
        command = ["psql", self.database_url, "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        if tuples_only:
            command += ["-A", "-t"]
        completed = subprocess.run(
            command, input=script, capture_output=True, text=True,
            env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
        )
        if completed.returncode != 0:
            raise SystemExit(f"psql failed: {completed.stderr.strip()}")
        return completed.stdout

    def values(self, query: str) -> list[str]:
        return [line for line in self.run(query + ";", tuples_only=True).splitlines() if line]

    def value(self, query: str) -> str:
        found = self.values(query)
        if not found:
            raise SystemExit(f"no data for the EXPLAIN terms: {query.split(' WHERE ')[0]} …")
        return found[0]


def absent_blinded_terms(count: int) -> list[str]:
    """Blinded terms that match nothing, like those of years no resource has (shape padding)."""
    return [f"h:{secrets.token_hex(8)}" for _ in range(max(0, count))]


def explain_cases(psql: Psql, tenant: str) -> list[tuple[str, list[str], list[Filter], int]]:
    t = sql_literal(tenant)

    def terms_of(resource_type: str, resource_id: str, param: str) -> list[str]:
        return psql.values(
            f"SELECT term FROM search_terms WHERE tenant = {t} AND resource_type = {sql_literal(resource_type)} "
            f"AND resource_id = {sql_literal(resource_id)} AND param = {sql_literal(param)} AND term <> '?' ORDER BY term"
        )

    # A patient with Observations and Encounters (their `patient` reference term).
    patient_term = psql.value(
        f"SELECT e.term FROM search_terms e WHERE e.tenant = {t} AND e.resource_type = 'Encounter' "
        f"AND e.param = 'patient' AND e.term LIKE 'r:Patient/%' AND EXISTS (SELECT 1 FROM search_terms o "
        f"WHERE o.tenant = {t} AND o.resource_type = 'Observation' AND o.param = 'patient' AND o.term = e.term) "
        f"ORDER BY e.resource_id LIMIT 1"
    )
    patient_id = patient_term.removeprefix("r:Patient/")

    # 1. Patient?family=…: the patient's most selective blinded family term (its longest prefix).
    family_term = psql.value(
        f"SELECT p.term FROM search_terms p WHERE p.tenant = {t} AND p.resource_type = 'Patient' "
        f"AND p.resource_id = {sql_literal(patient_id)} AND p.param = 'family' AND p.term <> '?' "
        f"ORDER BY (SELECT count(*) FROM search_terms q WHERE q.tenant = {t} AND q.resource_type = 'Patient' "
        f"AND q.param = 'family' AND q.term = p.term), p.term LIMIT 1"
    )

    # 5. One of the patient's LOINC-coded Observations: its code term and blinded year terms.
    observation_id = psql.value(
        f"SELECT o.resource_id FROM search_terms o WHERE o.tenant = {t} AND o.resource_type = 'Observation' "
        f"AND o.param = 'patient' AND o.term = {sql_literal(patient_term)} AND EXISTS (SELECT 1 FROM search_terms c "
        f"WHERE c.tenant = {t} AND c.resource_type = 'Observation' AND c.resource_id = o.resource_id "
        f"AND c.param = 'code' AND c.term LIKE 's:http://loinc.org|%') ORDER BY o.resource_id LIMIT 1"
    )
    code_term = next(term for term in terms_of("Observation", observation_id, "code")
                     if term.startswith(f"s:{LOINC}|"))
    observation_years = terms_of("Observation", observation_id, "date")
    # date=ge<year>: one blinded term per year up to 2200, and the "wide" term.
    ge_terms = LATEST_QUERY_YEAR - TYPICAL_QUERY_YEAR + 2
    lt_terms = TYPICAL_QUERY_YEAR + 1 - EARLIEST_QUERY_YEAR + 2

    # 7. One of the patient's Encounters: its blinded year terms, for both date criteria.
    encounter_id = psql.value(
        f"SELECT resource_id FROM search_terms WHERE tenant = {t} AND resource_type = 'Encounter' "
        f"AND param = 'patient' AND term = {sql_literal(patient_term)} ORDER BY resource_id LIMIT 1"
    )
    encounter_years = terms_of("Encounter", encounter_id, "date")

    return [
        ("1  Patient?family=<family>", ["Patient"], [Filter("family", [family_term])], CHUNK),
        ("5  Observation?patient=Patient/<id>&code=http://loinc.org|<code>&date=ge<year>", ["Observation"], [
            Filter("patient", [patient_term]),
            Filter("code", [code_term]),
            Filter("date", observation_years + absent_blinded_terms(ge_terms - len(observation_years))),
        ], CHUNK),
        ("7  Encounter?patient=<id>&date=ge<year>-01-01&date=lt<year+1>-01-01", ["Encounter"], [
            Filter("patient", [patient_term]),
            Filter("date", encounter_years + absent_blinded_terms(ge_terms - len(encounter_years))),
            Filter("date", encounter_years + absent_blinded_terms(lt_terms - len(encounter_years))),
        ], CHUNK),
        ("11 Observations referencing Patient/<id> (the _revinclude/_has lookup; also the match step)",
         ["Observation"], [Filter("patient", [patient_term])], MAX_INCLUDED),
    ]


SEQ_SCAN = re.compile(r"Seq Scan on (" + "|".join(INDEXED_TABLES) + r")\b")
# An index scan that filters most of what it reads is a scan in disguise (an index used by its
# leading tenant column only): as bad as a sequential one once the data grows.
ROWS_FILTERED = re.compile(r"Rows Removed by (?:Filter|Join Filter): (\d+)")
MAX_ROWS_FILTERED = 10_000
PLAN_LINE_CHARS = 160


def command_explain(arguments) -> int:
    psql = Psql(arguments.database_url)
    log("ANALYZE, then EXPLAIN (ANALYZE, BUFFERS) of the candidate statements")
    psql.run("ANALYZE;")
    tenant = psql.value("SELECT tenant FROM resource_heads LIMIT 1")
    sequential = []
    print("== EXPLAIN on PostgreSQL (values: real index terms; long lines cut) ==")
    for number, (title, resource_types, filters, limit) in enumerate(explain_cases(psql, tenant)):
        statement, binds = statement_of(resource_types, filters, limit)
        binds[0] = ("text", tenant)
        name = f"bench_candidates_{number}"
        parameter_types = ", ".join(kind for kind, _ in binds)
        values = ", ".join(sql_literal(value) for _, value in binds)
        for mode in ("force_custom_plan", "force_generic_plan"):
            plan = psql.run(
                f"SET plan_cache_mode = {mode};\n"
                f"PREPARE {name} ({parameter_types}) AS {statement};\n"
                f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE {name} ({values});\n",
                tuples_only=True,
            )
            print(f"-- {title} [{mode.removeprefix('force_').replace('_', ' ')}]")
            for line in plan.splitlines():
                print("   " + (line if len(line) <= PLAN_LINE_CHARS else line[:PLAN_LINE_CHARS] + " …"))
            for match in SEQ_SCAN.finditer(plan):
                sequential.append(f"{title.split()[0]} ({mode}): Seq Scan on {match.group(1)}")
            for match in ROWS_FILTERED.finditer(plan):
                if int(match.group(1)) > MAX_ROWS_FILTERED:
                    sequential.append(f"{title.split()[0]} ({mode}): {match.group(0)}")
    print(flush=True)
    if sequential:
        for item in sequential:
            log(f"EXPLAIN: a selective query scans a table (sequentially or through a filter): query {item}")
        return 1
    log("EXPLAIN: every plan reads search_terms, search_dates and resource_heads through indexes")
    return 0


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="load, then run the query mix")
    run.add_argument("--base-url", required=True)
    run.add_argument("--synthea-dir", required=True)
    run.add_argument("--patients", type=int, required=True)
    run.add_argument("--backend", required=True)
    run.add_argument("--scale", type=int, required=True)
    run.add_argument("--rounds", type=int, default=200)
    run.add_argument("--query-clients", type=int, default=8)
    run.add_argument("--load-workers", type=int, default=16)
    run.add_argument("--results", required=True)
    run.add_argument("--analyze-database-url", help="PostgreSQL to VACUUM (ANALYZE) between load and queries")
    run.add_argument("--no-load", action="store_true",
                     help="skip the load: the server already holds this data (A/B runs of the query mix)")
    explain = commands.add_parser("explain", help="PostgreSQL plans of the candidate statements")
    explain.add_argument("--database-url", required=True)
    summary = commands.add_parser("summary", help="tables of all runs")
    summary.add_argument("--results", required=True)
    arguments = parser.parse_args()
    handlers = {"run": command_run, "explain": command_explain, "summary": command_summary}
    return handlers[arguments.command](arguments)


if __name__ == "__main__":
    sys.exit(main())
