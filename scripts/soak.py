#!/usr/bin/env python3
"""The driver of scripts/soak (see there for the whole picture). Standard library only.

Subcommands:
  patients  print the ids the first --count loaded patients will have, one per line (scripts/soak
            mints their patient tokens before the run)
  run       load the data set into the server at --base-url, calibrate, soak, print the report;
            exits 1 when any request failed or the server died

The data set: the Synthea bundles (the loader of scripts/bench-search) replicated to --patients
patients with new ids per copy; the shared Organizations and Practitioners as one transaction
Bundle, then each patient as one transaction Bundle of PUT entries. On PostgreSQL
(--analyze-database-url) the database is analyzed after loading.

The mix (percent of requests; every request type expects exactly one status, anything else is
an error, as is a connection error):

  read         50  GET Patient/{id} (15), GET Observation/{id} (35, including Observations
                   the soak's transactions created)                                     200
  search       25  Observation?subject=Patient/{id}&code={loinc} (10),
                   Patient?name={family} (8),
                   Encounter?patient={id}&date=ge{year}-01-01&date=lt{year+1}-01-01 (7)  200
                   (each must match at least one resource)
  transaction  10  POST / of a transaction Bundle: an Encounter and three vital-sign
                   Observations of an existing patient (see --writes)                    200
                   (every entry 201, or 200 where it replaces a version)
  update       10  PUT Observation/{id} of a loaded Observation: status amended, a note  200
  consent       5  a patient, with their own patient token, records a patient-privacy Consent
                   (201, or 200 where it replaces a version) or withdraws the one they recorded
                   last (PUT with status inactive, 200; see --writes); the Consent denies one
                   Synthea Practitioner, so it is evaluated on every access to the record but
                   hides nothing from the ehr-system token the other requests use

The transactions' Observations carry LOINC codes the Synthea data does not use and the searches
never ask for, and the Encounter search is bounded to one past year, so what the searches match
does not change during the soak.

What the writes do to the data (--writes):

  steady   (default) the data keeps its size, as on a server that has run for a while: each
           patient has --ring slots of (Encounter, three Observations) with fixed ids, and a
           transaction PUTs one slot (201 per entry while the slot is new, then 200: a new
           version); a consent patient has one Consent with a fixed id that they PUT active
           (201 the first time, then 200) and inactive in turn. What grows is only history
           (versions no request of the mix reads) and the audit log. Growth of the RSS here is
           what a leak would show.
  growing  every transaction POSTs a new Encounter and three new Observations (201 each) and
           every consent change POSTs a new Consent or withdraws the last one: with the
           default 48 patients the soak adds several times the loaded data in ten minutes, and
           the caches and per-request work that scale with a patient's record grow with it.

Calibration sends the mix back-to-back from --clients threads (closed loop) and takes the
completed requests per second as the capacity. The soak then schedules requests at a fixed rate
(--load times the capacity; request i is due at start + i / rate) and --workers threads send
each when it is due (open loop): a slow answer does not slow the schedule, it shows up as start
lag. Latencies are from send to answer. The server's VmRSS (/proc/PID/status) is sampled every
--sample-secs seconds.

Nothing of the data is printed: request types by name, failures by type, status and the
server's OperationOutcome diagnostics; ids at most.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search as bs  # noqa: E402  (the Synthea data set, its replication and the HTTP client)

LOG_TAG = "soak"
PROGRESS_EVERY_SECS = 60.0
FIRST_ERRORS_LOGGED = 5  # per request type
LOAD_WORKERS = 4

# The vital signs a transaction records (LOINC code: display, UCUM unit, low, high): none of
# them occurs in the Synthea bundles, so no search of the mix matches what transactions add.
TRANSACTION_VITALS = {
    "8867-4": ("Heart rate", "/min", 50, 110),
    "9279-1": ("Respiratory rate", "/min", 12, 22),
    "59408-5": ("Oxygen saturation in Arterial blood by Pulse oximetry", "%", 92, 100),
}
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
# Namespace of the fixed ids of steady writes (slots and Consents).
SLOT_NAMESPACE = uuid.UUID("5d3c7a0e-41f4-4b8e-9c55-0c2b1f6a9e11")

# Request types, in report order.
READ_PATIENT = "read Patient/{id}"
READ_OBSERVATION = "read Observation/{id}"
SEARCH_OBSERVATION = "search Observation?subject&code"
SEARCH_PATIENT = "search Patient?name"
SEARCH_ENCOUNTER = "search Encounter?patient&date"
TRANSACTION = "transaction (Encounter + 3 Obs.)"
UPDATE = "update Observation"
CONSENT_CREATE = "consent: patient records"
CONSENT_WITHDRAW = "consent: patient withdraws"
REQUEST_TYPES = [
    READ_PATIENT, READ_OBSERVATION, SEARCH_OBSERVATION, SEARCH_PATIENT, SEARCH_ENCOUNTER,
    TRANSACTION, UPDATE, CONSENT_CREATE, CONSENT_WITHDRAW,
]


def log(message: str) -> None:
    print(f"{LOG_TAG}: {message}", file=sys.stderr, flush=True)


def patient_refs(dataset: bs.Dataset, copies: int) -> list[bs.PatientRef]:
    """The loaded patients, in a fixed order (the first ones get patient tokens)."""
    return [bs.PatientRef(copy, bundle.facts) for copy in range(1, copies + 1) for bundle in dataset.patient_bundles]


def copies_for(patients: int) -> int:
    if patients <= 0 or patients % bs.PATIENTS_PER_COPY:
        raise SystemExit(f"--patients must be a positive multiple of {bs.PATIENTS_PER_COPY}")
    return patients // bs.PATIENTS_PER_COPY


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class TypeStats:
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # category -> count

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class Stats:
    """What one phase (calibration or soak) measured."""

    def __init__(self, phase: str):
        self.phase = phase
        self.lock = threading.Lock()
        self.types = {name: TypeStats() for name in REQUEST_TYPES}
        self.lags_ms: list[float] = []

    def success(self, kind: str, elapsed_ms: float) -> None:
        with self.lock:
            self.types[kind].latencies_ms.append(elapsed_ms)

    def error(self, kind: str, category: str, detail: str, elapsed_ms: float | None) -> None:
        with self.lock:
            stats = self.types[kind]
            if elapsed_ms is not None:
                stats.latencies_ms.append(elapsed_ms)
            stats.errors[category] = stats.errors.get(category, 0) + 1
            count = stats.error_count
        if count <= FIRST_ERRORS_LOGGED:
            log(f"[{self.phase}] ERROR {kind}: {detail}")

    def requests(self) -> int:
        with self.lock:
            return sum(len(stats.latencies_ms) + stats.errors.get("connection", 0) for stats in self.types.values())

    def errors(self) -> int:
        with self.lock:
            return sum(stats.error_count for stats in self.types.values())


# ---------------------------------------------------------------------------------------------
# The server process


class ServerProcess:
    def __init__(self, pid: int):
        self.pid = pid

    def rss_mib(self) -> float | None:
        """VmRSS in MiB, or None when the process is gone (or a zombie)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip()[:1] in ("Z", "X") or "VmRSS" not in fields:
            return None
        return int(fields["VmRSS"].split()[0]) / 1024

    def rss_parts_mib(self) -> dict[str, float]:
        """VmRSS split as the kernel counts it: RssAnon (the heap: Custodian's own memory,
        SQLite's page cache and statement caches, the allocator's free lists), RssFile (mapped
        files: the binary and libraries) and RssShmem (shared mappings: SQLite's WAL index)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return {}
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {name: int(fields[name].split()[0]) / 1024
                for name in ("RssAnon", "RssFile", "RssShmem") if name in fields}


class RssSampler(threading.Thread):
    """Samples the server's RSS every `every` seconds until stopped; sets `died` (and the soak's
    stop event) when the process is gone."""

    def __init__(self, server: ServerProcess, every: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.server, self.every, self.stop = server, every, stop
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.parts: list[dict[str, float]] = []  # RssAnon/RssFile/RssShmem of each sample
        self.died = False
        self.finished = threading.Event()
        self.started_at = time.monotonic()

    def sample(self) -> None:
        rss = self.server.rss_mib()
        if rss is None:
            if not self.died:
                log("the server process is gone")
            self.died = True
            self.stop.set()
        else:
            self.samples.append((time.monotonic() - self.started_at, rss))
            self.parts.append(self.server.rss_parts_mib())

    def run(self) -> None:
        next_at = self.started_at
        while not self.finished.is_set():
            self.sample()
            next_at += self.every
            self.finished.wait(max(0.0, next_at - time.monotonic()))

    def finish(self) -> None:
        self.finished.set()
        self.join()
        if not self.samples or time.monotonic() - self.started_at - self.samples[-1][0] >= 1:
            self.sample()  # the end


# ---------------------------------------------------------------------------------------------
# The soak's world: what is loaded, what the mix picks from


@dataclass
class ConsentHolder:
    """A patient with a patient token, and the Consent they recorded last (if still active)."""

    patient_id: str
    token: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: dict | None = None
    stored: bool = False  # steady writes: their one Consent exists (a PUT answers 200, not 201)


@dataclass
class Slot:
    """Steady writes: one of a patient's fixed (Encounter, Observations) ids a transaction PUTs."""

    encounter_id: str
    observation_ids: dict[str, str]  # LOINC code -> id
    stored: bool = False


def slot_id(patient_id: str, slot: int, part: str) -> str:
    return str(uuid.uuid5(SLOT_NAMESPACE, f"{patient_id}/{slot}/{part}"))


class Soak:
    def __init__(self, client: bs.Client, dataset: bs.Dataset, patients: list[bs.PatientRef],
                 holders: list[ConsentHolder], reads_only: bool = False, ring: int = 0):
        self.client = client
        self.reads_only = reads_only
        # Steady writes (ring > 0): each patient's slots; a slot being written is taken out.
        self.free_slots: dict[str, list[Slot]] = {
            patient.id: [
                Slot(slot_id(patient.id, number, "Encounter"),
                     {code: slot_id(patient.id, number, code) for code in TRANSACTION_VITALS})
                for number in range(ring)
            ]
            for patient in patients
        } if ring > 0 else {}
        self.patients = patients
        self.holders = holders
        self.practitioners = [resource_id for kind, resource_id, _ in dataset.shared if kind == "Practitioner"]
        # Searchable LOINC codes per original patient (never one a transaction adds).
        self.search_codes = {
            bundle.facts.original_id: sorted({code for code, _ in bundle.facts.observations} - set(TRANSACTION_VITALS))
            for bundle in dataset.patient_bundles
        }
        self.lock = threading.Lock()
        self.observation_ids: list[str] = []  # read pool: loaded, then also created by transactions
        self.updatable: list[tuple[str, str]] = []  # (id, JSON text) of the loaded Observations
        self.updating: set[str] = set()
        self.stats = Stats("load")
        self.stop = threading.Event()

    # -- one request, timed and checked

    def call(self, kind: str, expected: int, method: str, path: str, body: bytes | None = None,
             token: str | None = None, check: Callable[[bytes], str | None] | None = None) -> bytes | None:
        """The answer's body when the status is `expected` and `check` finds nothing wrong;
        otherwise records an error and returns None."""
        started = time.perf_counter()
        try:
            status, data = self.client.request(method, path, body, token)
        except (OSError, http.client.HTTPException) as error:
            self.stats.error(kind, "connection", f"connection error ({type(error).__name__})", None)
            return None
        elapsed_ms = (time.perf_counter() - started) * 1000
        if status != expected:
            category = "5xx" if status >= 500 else "4xx" if status >= 400 else "other status"
            self.stats.error(kind, category, f"status {status} (expected {expected}): {bs.diagnostics(data)}", elapsed_ms)
            return None
        problem = check(data) if check else None
        if problem:
            self.stats.error(kind, "wrong answer", problem, elapsed_ms)
            return None
        self.stats.success(kind, elapsed_ms)
        return data

    # -- the mix

    def read_patient(self, rng: random.Random) -> None:
        self.call(READ_PATIENT, 200, "GET", f"/Patient/{rng.choice(self.patients).id}")

    def read_observation(self, rng: random.Random) -> None:
        self.call(READ_OBSERVATION, 200, "GET", f"/Observation/{rng.choice(self.observation_ids)}")

    def search_observation(self, rng: random.Random) -> None:
        patient = rng.choice(self.patients)
        code = rng.choice(self.search_codes[patient.facts.original_id])
        query = f"/Observation?subject=Patient/{patient.id}&code={bs.encode(bs.LOINC + '|' + code)}&_count=50"
        self.call(SEARCH_OBSERVATION, 200, "GET", query, check=some_match)

    def search_patient(self, rng: random.Random) -> None:
        patient = rng.choice(self.patients)
        self.call(SEARCH_PATIENT, 200, "GET", f"/Patient?name={bs.encode(patient.family)}&_count=50", check=some_match)

    def search_encounter(self, rng: random.Random) -> None:
        query = bs.query_encounter_year(rng, rng.choice(self.patients))
        self.call(SEARCH_ENCOUNTER, 200, "GET", "/" + query, check=some_match)

    def transaction(self, rng: random.Random) -> None:
        if self.free_slots:
            self.steady_transaction(rng)
            return
        patient = rng.choice(self.patients)
        data = self.call(TRANSACTION, 200, "POST", "/", vitals_transaction(patient.id, rng), check=all_created)
        if data is not None:
            created = [
                location.split("/")[1]
                for location in entry_locations(data)
                if location.startswith("Observation/")
            ]
            with self.lock:
                self.observation_ids.extend(created)

    def steady_transaction(self, rng: random.Random) -> None:
        """PUTs one of a random patient's slots (never one another thread is writing)."""
        with self.lock:
            while True:
                patient = rng.choice(self.patients)
                slots = self.free_slots[patient.id]
                if slots:
                    slot = slots.pop(rng.randrange(len(slots)))
                    break
        try:
            body = vitals_transaction(patient.id, rng, slot)
            expected = "200" if slot.stored else "201"
            answer = self.call(TRANSACTION, 200, "POST", "/", body, check=lambda data: all_entries(data, expected))
            if answer is not None:
                if not slot.stored:
                    with self.lock:
                        self.observation_ids.extend(slot.observation_ids.values())
                slot.stored = True
        finally:
            with self.lock:
                self.free_slots[patient.id].append(slot)

    def update(self, rng: random.Random) -> None:
        with self.lock:
            # Never two updates of one resource at once: the mix sends no If-Match, and the
            # soak counts answers, not races it made itself.
            while True:
                resource_id, text = rng.choice(self.updatable)
                if resource_id not in self.updating:
                    self.updating.add(resource_id)
                    break
        try:
            resource = json.loads(text)
            resource["status"] = "amended"
            resource["note"] = [{"text": f"Value reviewed (revision {rng.randrange(1_000_000)})"}]
            self.call(UPDATE, 200, "PUT", f"/Observation/{resource_id}", json.dumps(resource).encode())
        finally:
            with self.lock:
                self.updating.discard(resource_id)

    def consent_change(self, rng: random.Random) -> None:
        holder = self.claim_holder(rng)
        try:
            if self.free_slots:
                self.steady_consent_change(holder, rng)
            elif holder.active is None:
                body = consent_resource(holder.patient_id, rng.choice(self.practitioners))
                data = self.call(CONSENT_CREATE, 201, "POST", "/Consent", body, token=holder.token, check=has_id)
                if data is not None:
                    holder.active = json.loads(data)
            else:
                withdrawn = dict(holder.active, status="inactive")
                data = self.call(CONSENT_WITHDRAW, 200, "PUT", f"/Consent/{withdrawn['id']}",
                                 json.dumps(withdrawn).encode(), token=holder.token)
                if data is not None:
                    holder.active = None
        finally:
            holder.lock.release()

    def steady_consent_change(self, holder: ConsentHolder, rng: random.Random) -> None:
        """PUTs the holder's one Consent active (recording it, 201 the first time) or inactive."""
        consent_id = slot_id(holder.patient_id, 0, "Consent")
        if holder.active is None:
            consent = json.loads(consent_resource(holder.patient_id, rng.choice(self.practitioners)))
            consent["id"] = consent_id
            expected = 200 if holder.stored else 201
            if self.call(CONSENT_CREATE, expected, "PUT", f"/Consent/{consent_id}", json.dumps(consent).encode(),
                         token=holder.token, check=has_id) is not None:
                holder.active, holder.stored = consent, True
        else:
            withdrawn = dict(holder.active, status="inactive")
            if self.call(CONSENT_WITHDRAW, 200, "PUT", f"/Consent/{consent_id}", json.dumps(withdrawn).encode(),
                         token=holder.token) is not None:
                holder.active = None

    def claim_holder(self, rng: random.Random) -> ConsentHolder:
        """A patient no other thread is changing the Consents of (waits if all are busy)."""
        order = rng.sample(self.holders, len(self.holders))
        for holder in order:
            if holder.lock.acquire(blocking=False):
                return holder
        order[0].lock.acquire()
        return order[0]

    def mix(self) -> list[tuple[Callable[[random.Random], None], int]]:
        """(operation, weight in percent); see the module docstring."""
        operations = [
            (self.read_patient, 15),
            (self.read_observation, 35),
            (self.search_observation, 10),
            (self.search_patient, 8),
            (self.search_encounter, 7),
            (self.transaction, 10),
            (self.update, 10),
            (self.consent_change, 5),
        ]
        if not self.holders:
            operations = [(operation, weight) for operation, weight in operations if operation != self.consent_change]
        if self.reads_only:
            writes = (self.transaction, self.update, self.consent_change)
            operations = [(operation, weight) for operation, weight in operations if operation not in writes]
        return operations


def some_match(body: bytes) -> str | None:
    return None if bs.matches_in(body) > 0 else "the search matched nothing (it should match a loaded resource)"


def has_id(body: bytes) -> str | None:
    try:
        return None if json.loads(body).get("id") else "the created resource has no id"
    except (ValueError, AttributeError):
        return "the answer is not a JSON resource"


def entry_answers(body: bytes) -> list[dict]:
    try:
        bundle = json.loads(body)
    except ValueError:
        return []
    if not isinstance(bundle, dict):
        return []
    return [entry.get("response", {}) for entry in bundle.get("entry", [])]


def entry_locations(body: bytes) -> list[str]:
    return [answer.get("location", "") for answer in entry_answers(body)]


def all_created(body: bytes) -> str | None:
    return all_entries(body, "201")


def all_entries(body: bytes, expected: str) -> str | None:
    """None when the transaction-response has one entry per resource, each with `expected`."""
    answers = entry_answers(body)
    if len(answers) != 1 + len(TRANSACTION_VITALS):
        return f"the transaction-response has {len(answers)} entries"
    statuses = [str(answer.get("status", "")) for answer in answers]
    if not all(status.startswith(expected) for status in statuses):
        return f"entry statuses {statuses} (expected {expected} each)"
    return None


def vitals_transaction(patient_id: str, rng: random.Random, slot: Slot | None = None) -> bytes:
    """An Encounter of the patient and one Observation per vital sign, recorded now: new ones
    (POST), or with `slot` the slot's (PUT to its fixed ids)."""
    now = datetime.now(timezone.utc)
    start = (now - timedelta(minutes=20)).isoformat(timespec="seconds")
    end = now.isoformat(timespec="seconds")
    subject = {"reference": f"Patient/{patient_id}"}

    def placed(resource: dict, kind: str, fixed_id: str | None) -> tuple[dict, str]:
        """The entry of `resource` (POSTed under a urn:uuid, or PUT at its fixed id) and how
        the other entries refer to it."""
        if fixed_id is None:
            full_url = f"urn:uuid:{uuid.uuid4()}"
            return ({"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": kind}},
                    full_url)
        return ({"resource": dict(resource, id=fixed_id), "request": {"method": "PUT", "url": f"{kind}/{fixed_id}"}},
                f"{kind}/{fixed_id}")

    encounter, encounter_reference = placed({
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": ACT_CODE, "code": "AMB"},
        "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003",
                              "display": "Encounter for check up (procedure)"}]}],
        "subject": subject,
        "period": {"start": start, "end": end},
    }, "Encounter", slot.encounter_id if slot else None)
    entries = [encounter]
    for code, (display, unit, low, high) in TRANSACTION_VITALS.items():
        entries.append(placed({
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs"}]}],
            "code": {"coding": [{"system": bs.LOINC, "code": code, "display": display}]},
            "subject": subject,
            "encounter": {"reference": encounter_reference},
            "effectiveDateTime": end,
            "valueQuantity": {"value": rng.randint(low, high), "unit": unit,
                              "system": "http://unitsofmeasure.org", "code": unit},
        }, "Observation", slot.observation_ids[code] if slot else None)[0])
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}).encode()


def consent_resource(patient_id: str, denied_practitioner: str) -> bytes:
    """A patient-privacy Consent of the patient denying one practitioner access to the record."""
    return json.dumps({
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": bs.LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTIN"}]},
        "provision": {
            "type": "deny",
            "actor": [{
                "role": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "code": "IRCP"}]},
                "reference": {"reference": f"Practitioner/{denied_practitioner}"},
            }],
        },
    }).encode()


# ---------------------------------------------------------------------------------------------
# Loading


def transaction_of_puts(resources) -> bytes:
    """A transaction Bundle of one PUT entry per (type, id, JSON) item."""
    entries = [
        {"resource": json.loads(text), "request": {"method": "PUT", "url": f"{kind}/{resource_id}"}}
        for kind, resource_id, text in resources
    ]
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}).encode()


def load(soak: Soak, dataset: bs.Dataset, copies: int) -> int:
    """Loads the shared resources, then every patient copy, each as one transaction; fills the
    read and update pools. Returns the number of resources loaded."""
    replicator = bs.Replicator(dataset)

    def send(resources: list[tuple[str, str, str]]) -> None:
        status, data = soak.client.request("POST", "/", transaction_of_puts(resources))
        if status != 200:
            raise bs.RequestFailed(f"a loading transaction answered {status}: {bs.diagnostics(data)}")
        statuses = [str(answer.get("status", "")) for answer in entry_answers(data)]
        if len(statuses) != len(resources) or not all(s.startswith(("200", "201")) for s in statuses):
            raise bs.RequestFailed("a loading transaction did not store every entry")

    def load_copy(unit: tuple[int, bs.PatientBundle]) -> list[tuple[str, str, str]]:
        copy, bundle = unit
        resources = [(kind, resource_id, body.decode()) for kind, resource_id, body in replicator.copy(bundle, copy)]
        send(resources)
        return resources

    send(dataset.shared)
    loaded = len(dataset.shared)
    units = [(copy, bundle) for copy in range(1, copies + 1) for bundle in dataset.patient_bundles]
    with ThreadPoolExecutor(max_workers=LOAD_WORKERS) as pool:
        for resources in pool.map(load_copy, units):
            loaded += len(resources)
            for kind, resource_id, text in resources:
                if kind == "Observation":
                    soak.observation_ids.append(resource_id)
                    soak.updatable.append((resource_id, text))
    return loaded


# ---------------------------------------------------------------------------------------------
# The phases


def calibrate(soak: Soak, clients: int, seconds: float, seed: int) -> float:
    """Closed loop: `clients` threads send the mix back-to-back; completed requests per second."""
    soak.stats = Stats("calibration")
    operations, weights = zip(*soak.mix())
    deadline = time.monotonic() + seconds

    def worker(number: int) -> None:
        rng = random.Random(seed * 1_000 + number)
        while time.monotonic() < deadline and not soak.stop.is_set():
            rng.choices(operations, weights)[0](rng)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return soak.stats.requests() / (time.monotonic() - started)


@dataclass
class SoakResult:
    rate: float
    seconds: float
    elapsed: float
    scheduled: int  # requests due within the soak
    sent: int
    stats: Stats
    rss: RssSampler


def run_soak(soak: Soak, server: ServerProcess, rate: float, seconds: float, workers: int,
             sample_secs: float, seed: int) -> SoakResult:
    """Open loop: request i is due at start + i / rate, sent by the next free worker when due."""
    stats = soak.stats = Stats("soak")
    operations, weights = zip(*soak.mix())
    next_slot = [0]
    sent = [0]
    slot_lock = threading.Lock()
    sampler = RssSampler(server, sample_secs, soak.stop)
    started = sampler.started_at
    deadline = started + seconds

    def worker(number: int) -> None:
        rng = random.Random(seed * 1_000 + 500 + number)
        while not soak.stop.is_set():
            with slot_lock:
                slot = next_slot[0]
                next_slot[0] += 1
            due = started + slot / rate
            if due >= deadline:
                return
            wait = due - time.monotonic()
            if wait > 0:
                if soak.stop.wait(wait):
                    return
            elif time.monotonic() >= deadline:
                return  # behind schedule at the end: the rest is counted as not sent
            lag_ms = (time.monotonic() - due) * 1000
            with slot_lock:
                sent[0] += 1
            with stats.lock:
                stats.lags_ms.append(lag_ms)
            rng.choices(operations, weights)[0](rng)

    def progress() -> None:
        while not soak.stop.wait(PROGRESS_EVERY_SECS) and time.monotonic() < deadline:
            elapsed = time.monotonic() - started
            rss = sampler.samples[-1][1] if sampler.samples else float("nan")
            log(f"[soak] {elapsed:.0f}/{seconds:.0f} s: {stats.requests()} requests "
                f"({stats.requests() / elapsed:.1f}/s), {stats.errors()} errors, RSS {rss:.1f} MiB")

    sampler.start()
    reporter = threading.Thread(target=progress, daemon=True)
    reporter.start()
    threads = [threading.Thread(target=worker, args=(number,)) for number in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    sampler.finish()
    soak.stop.set()
    reporter.join()
    scheduled = min(next_slot[0], math.ceil(seconds * rate))
    return SoakResult(rate, seconds, elapsed, scheduled, sent[0], stats, sampler)


# ---------------------------------------------------------------------------------------------
# The report


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return None
    mean_t = sum(t for t, _ in samples) / len(samples)
    mean_m = sum(m for _, m in samples) / len(samples)
    variance = sum((t - mean_t) ** 2 for t, _ in samples)
    if variance == 0:
        return None
    return sum((t - mean_t) * (m - mean_m) for t, m in samples) / variance * 60


def error_breakdown(stats: Stats) -> str:
    totals: dict[str, int] = {}
    for type_stats in stats.types.values():
        for category, count in type_stats.errors.items():
            totals[category] = totals.get(category, 0) + count
    return ", ".join(f"{count} {category}" for category, count in sorted(totals.items())) or "none"


def print_types(stats: Stats, weights: dict[str, str]) -> None:
    print(f"  {'request type':<34} {'weight':>6} {'count':>7} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    everything: list[float] = []
    for name in REQUEST_TYPES:
        type_stats = stats.types[name]
        latencies = type_stats.latencies_ms
        everything += latencies
        count = len(latencies) + type_stats.errors.get("connection", 0)
        print(f"  {name:<34} {weights.get(name, ''):>6} {count:>7} {type_stats.error_count:>6} "
              f"{ms(bs.percentile(latencies, 50)):>8} {ms(bs.percentile(latencies, 95)):>8} "
              f"{ms(bs.percentile(latencies, 99)):>8}")
    print(f"  {'all':<34} {'100%':>6} {stats.requests():>7} {stats.errors():>6} "
          f"{ms(bs.percentile(everything, 50)):>8} {ms(bs.percentile(everything, 95)):>8} "
          f"{ms(bs.percentile(everything, 99)):>8}")


def report(arguments, loaded: int, load_secs: float, rss_after_load: float | None, capacity: float,
           calibration: Stats, result: SoakResult, connections: int) -> dict:
    stats = result.stats
    rss = result.rss
    samples = rss.samples
    second_half = [(t, m) for t, m in samples if t >= result.seconds / 2]
    slope = slope_mib_per_min(second_half)
    weights = {
        READ_PATIENT: "15%", READ_OBSERVATION: "35%", SEARCH_OBSERVATION: "10%", SEARCH_PATIENT: "8%",
        SEARCH_ENCOUNTER: "7%", TRANSACTION: "10%", UPDATE: "10%", CONSENT_CREATE: "5% *", CONSENT_WITHDRAW: "*",
    }
    errors = calibration.errors() + stats.errors()
    not_sent = result.scheduled - result.sent
    lags = stats.lags_ms

    window = min(result.elapsed, result.seconds)
    print(f"== soak: {arguments.backend}, {arguments.patients} patients ({loaded} resources, loaded in "
          f"{load_secs:.1f} s), {len(arguments.patient_ids)} of them changing their Consents")
    print(f"capacity: {capacity:.1f} requests/s (calibration: {arguments.calibrate_secs:.0f} s, "
          f"{arguments.clients} clients back-to-back, {calibration.requests()} requests, "
          f"{calibration.errors()} errors)")
    print(f"target:   {result.rate:.1f} requests/s ({arguments.load * 100:.0f} % of capacity) "
          f"for {result.seconds:.0f} s, open loop, {arguments.workers} workers")
    print(f"achieved: {result.sent / window:.1f} requests/s ({result.sent} sent in {window:.1f} s; "
          f"{not_sent} of {result.scheduled} scheduled not sent in time)")
    print(f"start lag (due -> sent): p50 {ms(bs.percentile(lags, 50))} ms, p99 {ms(bs.percentile(lags, 99))} ms, "
          f"max {ms(max(lags) if lags else None)} ms")
    print(f"errors:   {errors} (goal 0): soak {stats.errors()} ({error_breakdown(stats)}), "
          f"calibration {calibration.errors()} ({error_breakdown(calibration)})")
    print(f"connections opened: {connections} (threads: {1 + LOAD_WORKERS} loading, {arguments.clients} "
          f"calibration, {arguments.workers} soak; more: the server closed some)")
    print("soak requests:")
    print_types(stats, weights)
    print("  (* the consent weight covers both consent rows; latencies: send to answer, errors included)")
    if arguments.mix == "reads":
        print("  (--mix reads: transactions, updates and Consent changes left out; weights relative to 75 %)")
    else:
        print(f"  (--writes {arguments.writes}" + (f", {arguments.ring} slots per patient)" if arguments.writes == "steady"
                                                else ": new resources)"))
    start = samples[0][1] if samples else None
    end = samples[-1][1] if samples else None
    peak = max((m for _, m in samples), default=None)
    print(f"RSS (VmRSS, MiB): after loading {ms(rss_after_load)}; soak start (after load and "
          f"calibration) {ms(start)}; end {ms(end)}; max {ms(peak)}")
    slope_text = "-" if slope is None else f"{slope:+.3f} MiB/min"
    print(f"RSS slope over the second half ({len(second_half)} samples): {slope_text} (goal: flat)")
    if rss.parts:
        first_parts, last_parts = rss.parts[0], rss.parts[-1]
        print("RSS parts (MiB), start -> end: " + ", ".join(
            f"{name} {ms(first_parts.get(name))} -> {ms(last_parts.get(name))}"
            for name in ("RssAnon", "RssFile", "RssShmem")))
    print(f"RSS series (s: MiB), every {arguments.sample_secs:.0f} s:")
    for row in range(0, len(samples), 6):
        print("  " + " | ".join(f"{t:5.0f}: {m:7.1f}" for t, m in samples[row:row + 6]))
    if rss.died:
        print("SERVER DIED during the soak")
    verdict = "PASSED" if errors == 0 and not rss.died else "FAILED"
    print(f"== {verdict}: {errors} errors, server {'died' if rss.died else 'alive'}, RSS {ms(start)} -> {ms(end)} MiB "
          f"(max {ms(peak)}), second-half slope {slope_text}", flush=True)

    def type_record(type_stats: TypeStats) -> dict:
        latencies = type_stats.latencies_ms
        return {"count": len(latencies) + type_stats.errors.get("connection", 0), "errors": dict(type_stats.errors),
                "p50_ms": bs.percentile(latencies, 50), "p95_ms": bs.percentile(latencies, 95),
                "p99_ms": bs.percentile(latencies, 99)}

    return {
        "backend": arguments.backend, "patients": arguments.patients, "resources": loaded,
        "mix": arguments.mix, "writes": arguments.writes, "ring": arguments.ring,
        "capacity_per_sec": capacity, "target_per_sec": result.rate,
        "achieved_per_sec": result.sent / window, "seconds": window,
        "scheduled": result.scheduled, "sent": result.sent, "errors": errors,
        "calibration_errors": calibration.errors(), "server_died": rss.died,
        "types": {name: type_record(stats.types[name]) for name in REQUEST_TYPES},
        "rss_after_load_mib": rss_after_load, "rss_start_mib": start, "rss_end_mib": end, "rss_max_mib": peak,
        "rss_second_half_slope_mib_per_min": slope, "rss_series": samples,
        "rss_parts_start_mib": rss.parts[0] if rss.parts else None,
        "rss_parts_end_mib": rss.parts[-1] if rss.parts else None,
    }


# ---------------------------------------------------------------------------------------------


def command_patients(arguments) -> int:
    dataset = bs.read_dataset(Path(arguments.synthea_dir))
    for patient in patient_refs(dataset, copies_for(arguments.patients))[:arguments.count]:
        print(patient.id)
    return 0


def command_run(arguments) -> int:
    copies = copies_for(arguments.patients)
    dataset = bs.read_dataset(Path(arguments.synthea_dir))
    patients = patient_refs(dataset, copies)
    token = Path(arguments.token_file).read_text().strip()
    holders = []
    token_dir = Path(arguments.patient_token_dir) if arguments.patient_token_dir else None
    arguments.patient_ids = sorted(path.name for path in token_dir.iterdir()) if token_dir else []
    known = {patient.id for patient in patients}
    for patient_id in arguments.patient_ids:
        if patient_id not in known:
            raise SystemExit(f"a patient token is for {patient_id}, which is not in the data set")
        holders.append(ConsentHolder(patient_id, (token_dir / patient_id).read_text().strip()))
    server = ServerProcess(arguments.server_pid)
    if server.rss_mib() is None:
        raise SystemExit(f"no server process {arguments.server_pid}")
    soak = Soak(bs.Client(arguments.base_url, token), dataset, patients, holders,
                reads_only=arguments.mix == "reads", ring=arguments.ring if arguments.writes == "steady" else 0)

    log(f"loading {arguments.patients} patients ({dataset.resources_for(copies)} resources) as transactions")
    started = time.monotonic()
    try:
        loaded = load(soak, dataset, copies)
    except (bs.RequestFailed, OSError, http.client.HTTPException) as error:
        log(f"loading failed: {error}")
        return 1
    load_secs = time.monotonic() - started
    rss_after_load = server.rss_mib()
    log(f"loaded {loaded} resources in {load_secs:.1f} s; server RSS {ms(rss_after_load)} MiB")
    if arguments.analyze_database_url:
        # Statistics as autovacuum gathers them in time: right after a bulk load the planner
        # would still assume near-empty tables (see scripts/bench-search).
        log("ANALYZE")
        bs.Psql(arguments.analyze_database_url).run("ANALYZE;")

    log(f"calibrating: {arguments.calibrate_secs:.0f} s, {arguments.clients} clients back-to-back")
    capacity = calibrate(soak, arguments.clients, arguments.calibrate_secs, arguments.seed)
    calibration = soak.stats
    log(f"capacity {capacity:.1f} requests/s ({calibration.errors()} errors)")
    if server.rss_mib() is None:
        log("the server died during calibration")
        return 1
    if capacity <= 0:
        log("no request completed during calibration")
        return 1

    rate = capacity * arguments.load
    log(f"soaking: {rate:.1f} requests/s for {arguments.seconds:.0f} s (RSS every {arguments.sample_secs:.0f} s)")
    result = run_soak(soak, server, rate, arguments.seconds, arguments.workers, arguments.sample_secs, arguments.seed)
    record = report(arguments, loaded, load_secs, rss_after_load, capacity, calibration, result,
                    soak.client.connections_opened)
    if arguments.results:
        with open(arguments.results, "a", encoding="utf-8") as results_file:
            results_file.write(json.dumps(record) + "\n")
    return 0 if record["errors"] == 0 and not record["server_died"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    patients = commands.add_parser("patients", help="ids of the first --count patients")
    patients.add_argument("--synthea-dir", required=True)
    patients.add_argument("--patients", type=int, required=True)
    patients.add_argument("--count", type=int, required=True)
    run = commands.add_parser("run", help="load, calibrate, soak, report")
    run.add_argument("--base-url", required=True)
    run.add_argument("--server-pid", type=int, required=True, help="the server process (its RSS is sampled)")
    run.add_argument("--token-file", required=True, help="an ehr-system token")
    run.add_argument("--patient-token-dir", help="one patient token per file, named by the patient id")
    run.add_argument("--synthea-dir", required=True)
    run.add_argument("--backend", default="sqlite", help="shown in the report")
    run.add_argument("--patients", type=int, default=48)
    run.add_argument("--clients", type=int, default=8, help="calibration threads")
    run.add_argument("--workers", type=int, default=32, help="soak threads (the open loop's senders)")
    run.add_argument("--calibrate-secs", type=float, default=30)
    run.add_argument("--seconds", type=float, default=600)
    run.add_argument("--load", type=float, default=0.8, help="the soak's rate, a fraction of the capacity")
    run.add_argument("--sample-secs", type=float, default=10)
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--mix", choices=["full", "reads"], default="full",
                     help="reads: only the reads and searches (same relative weights), so the data does not grow")
    run.add_argument("--writes", choices=["steady", "growing"], default="steady",
                     help="steady: transactions and Consent changes write fixed ids (new versions); growing: new resources")
    run.add_argument("--ring", type=int, default=4, help="steady writes: slots of (Encounter, Observations) per patient")
    run.add_argument("--results", help="append a JSON line of the results to this file")
    run.add_argument("--analyze-database-url", help="PostgreSQL to ANALYZE after loading")
    arguments = parser.parse_args()
    if arguments.command == "run" and not (arguments.load > 0 and arguments.seconds > 0 and arguments.workers > 0
                                           and arguments.ring > 0):
        raise SystemExit("--load, --seconds, --workers and --ring must be positive")
    handlers = {"patients": command_patients, "run": command_run}
    return handlers[arguments.command](arguments)


if __name__ == "__main__":
    sys.exit(main())
