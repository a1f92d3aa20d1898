#!/usr/bin/env python3
"""Driver of scripts/bench-export: Bulk Data $export throughput against a running server.

  run      load the Synthea set replicated to --patients patients (the loader of
           scripts/bench_search.py: the shared hospital and practitioner bundles once, the patient
           bundles copied with new deterministic ids), then for each level (system `$export`,
           `Patient/$export`) kick off an export, poll its status until the manifest, and
           download every output file; record resources exported, seconds from kick-off to
           manifest, resources/s, and the download rate. The manifest's count must equal the
           lines downloaded; at system level it must equal the resources loaded.
  summary  a table of the recorded runs.

Prints counts and rates only, never data. The token comes from CUSTODIAN_BENCH_TOKEN.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import bench_search
from bench_search import Client, diagnostics, load, read_dataset

LOG_TAG = "bench-export"
LEVELS = [("system", "/$export"), ("patient", "/Patient/$export")]
POLL_SECS = 0.5
EXPORT_TIMEOUT_SECS = 6 * 3600


def log(message: str) -> None:
    print(f"{LOG_TAG}: {message}", file=sys.stderr, flush=True)


def path_of(url: str, base_url: str) -> str:
    if not url.startswith(base_url):
        raise SystemExit("the server answered with a URL outside its base")
    return url[len(base_url.rstrip("/")):]


def export_level(client: Client, base_url: str, kick_off: str) -> dict:
    """One export, kick-off to downloaded files: counts and timings."""
    connection = client.connection()
    headers = {
        "Authorization": f"Bearer {client.token}",
        "Accept": "application/fhir+json",
        "Prefer": "respond-async",
    }
    started = time.monotonic()
    connection.request("GET", kick_off, headers=headers)
    response = connection.getresponse()
    body = response.read()
    if response.status != 202:
        raise SystemExit(f"kick-off {kick_off} answered {response.status}: {diagnostics(body)}")
    status_path = path_of(response.getheader("Content-Location"), base_url)
    polls = 0
    while True:
        status, body = client.request("GET", status_path)
        polls += 1
        if status == 200:
            break
        if status != 202:
            raise SystemExit(f"status answered {status}: {diagnostics(body)}")
        if time.monotonic() - started > EXPORT_TIMEOUT_SECS:
            raise SystemExit("the export did not finish in time")
        time.sleep(POLL_SECS)
    exported_secs = time.monotonic() - started
    manifest = json.loads(body)
    declared = sum(output["count"] for output in manifest["output"])
    download_started = time.monotonic()
    downloaded = 0
    download_bytes = 0
    for output in manifest["output"]:
        status, data = client.request("GET", path_of(output["url"], base_url))
        if status != 200:
            raise SystemExit(f"file download answered {status}: {diagnostics(data)}")
        lines = data.count(b"\n")
        if lines != output["count"]:
            raise SystemExit(f"a file has {lines} lines, its manifest entry says {output['count']}")
        downloaded += lines
        download_bytes += len(data)
    download_secs = time.monotonic() - download_started
    client.request("DELETE", status_path)
    return {
        "resources": declared,
        "files": len(manifest["output"]),
        "export_secs": exported_secs,
        "polls": polls,
        "resources_per_sec": declared / exported_secs if exported_secs > 0 else None,
        "download_secs": download_secs,
        "download_mb": download_bytes / 1e6,
        "downloaded": downloaded,
    }


def command_run(arguments) -> int:
    bench_search.LOG_TAG = LOG_TAG
    token = os.environ.get("CUSTODIAN_BENCH_TOKEN")
    if not token:
        raise SystemExit("CUSTODIAN_BENCH_TOKEN is not set")
    dataset = read_dataset(Path(arguments.synthea_dir))
    copies = arguments.patients // bench_search.PATIENTS_PER_COPY
    client = Client(arguments.base_url, token)
    label = f"{arguments.backend} {arguments.patients} patients"
    loaded, load_secs = load(client, dataset, copies, arguments.load_workers, label)
    log(f"[{label}] loaded {loaded} resources in {load_secs:.1f}s")
    for level, kick_off in LEVELS:
        result = export_level(client, arguments.base_url.rstrip("/"), kick_off)
        if level == "system" and result["resources"] != loaded:
            raise SystemExit(f"the system export has {result['resources']} resources, {loaded} were loaded")
        record = {"backend": arguments.backend, "patients": arguments.patients, "level": level,
                  "loaded": loaded, **result}
        log(f"[{label}] {level}: {result['resources']} resources in {result['export_secs']:.1f}s "
            f"= {result['resources_per_sec']:.0f} resources/s; download {result['download_mb']:.1f} MB "
            f"in {result['download_secs']:.1f}s")
        with open(arguments.results, "a", encoding="utf-8") as results:
            results.write(json.dumps(record) + "\n")
    return 0


def command_summary(arguments) -> int:
    records = [json.loads(line) for line in Path(arguments.results).read_text().splitlines() if line]
    print(f"{'backend':<10} {'patients':>8} {'level':<8} {'resources':>9} {'export s':>9} "
          f"{'res/s':>8} {'download s':>10} {'MB':>7}")
    for record in records:
        print(f"{record['backend']:<10} {record['patients']:>8} {record['level']:<8} "
              f"{record['resources']:>9} {record['export_secs']:>9.1f} {record['resources_per_sec']:>8.0f} "
              f"{record['download_secs']:>10.1f} {record['download_mb']:>7.1f}")
    return 0 if records else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("--base-url", required=True)
    run.add_argument("--synthea-dir", required=True)
    run.add_argument("--patients", type=int, required=True)
    run.add_argument("--backend", required=True)
    run.add_argument("--load-workers", type=int, default=16)
    run.add_argument("--results", required=True)
    summary = commands.add_parser("summary")
    summary.add_argument("--results", required=True)
    arguments = parser.parse_args()
    return command_run(arguments) if arguments.command == "run" else command_summary(arguments)


if __name__ == "__main__":
    sys.exit(main())
