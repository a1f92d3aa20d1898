"""Validates FHIR R4 resources with the independent models of PyPI fhir.resources 6.1.0 (R4
4.0.1, pydantic<2). Used by the integration suite as an oracle for what the server returns.

Input (stdin): a JSON list of [label, resource] pairs. Output (stdout): a JSON list of
"label: error" strings, empty when every resource is valid.
"""
import json
import sys

from fhir.resources import construct_fhir_element


def main():
    failures = []
    for label, resource in json.load(sys.stdin):
        try:
            construct_fhir_element(resource["resourceType"], resource)
        except Exception as error:  # the oracle's verdict, whatever its exception type
            failures.append(f"{label}: {error}")
    json.dump(failures, sys.stdout)


if __name__ == "__main__":
    main()
